"""Fully-binary DeiT-S: the ablation models of BinaryViT's Table 3 (Le & Li, CVPR 2023 Workshops).

Row 1 is the baseline, the ReActNet recipe applied to DeiT-S (class token, every
LayerNorm replaced by a token BatchNorm). Each later row adds one of the paper's
changes: global average pooling instead of the class token (row 2), multi-branch
pooling (row 3), an affine transformation before each main residual addition (row 4).
"""
from typing import Any, Dict, Tuple, Union

import torch
from torch import nn

from timm.layers import to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from .blocks import Block, PatchEmbed, checkpoint_block
from .layers import tokens_to_grid
from .model_api import TimmModelApi, build_model, default_cfg

__all__ = ['BinaryDeiT']


class BinaryDeiT(TimmModelApi):
    """Fully-binary DeiT: a full-precision 16x16 patch stem, binary transformer layers, token BatchNorms.

    Args:
        img_size: input size (a multiple of ``patch_size``).
        patch_size: stem patch size.
        in_chans: input channels.
        num_classes: classes of the full-precision linear head (0 for none).
        global_pool: ``'token'`` (class token), ``'avg'`` (mean over patch tokens) or ``''``.
        embed_dim, depth, num_heads, mlp_ratio: width, layers, heads, FFN expansion (a whole number).
        class_token: prepend a class token (Table 3 row 1).
        multi_branch_pool: add the four average-pooling branches (row 3 on); needs ``class_token=False``.
        affine: affine transformation before the main residual additions (row 4).
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth, rising linearly over the layers.
    """
    global_pools = ('token', 'avg', '')
    intermediate_fmts = ('NCHW', 'NLC')

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: int = 4,
            class_token: bool = True,
            multi_branch_pool: bool = False,
            affine: bool = False,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.img_size = to_2tuple(img_size)
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f'img_size {self.img_size} is not a multiple of patch_size {patch_size}')
        self.num_prefix_tokens = 1 if class_token else 0
        self._check_global_pool(global_pool)
        if multi_branch_pool and class_token:
            raise ValueError('multi-branch pooling works on the patch grid; use it with class_token=False')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.multi_branch_pool = multi_branch_pool
        self.affine = affine
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim, **dd))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, sr_ratio=1, affine=affine,
                  multi_branch_pool=multi_branch_pool, drop_path=dpr[i], **dd)
            for i in range(depth)])
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self._build_head(embed_dim, drop_rate, **dd)
        if not self.pos_embed.is_meta:
            self.init_weights()

    def init_weights(self):
        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self._init_head()

    def _check_global_pool(self, global_pool: str) -> None:
        super()._check_global_pool(global_pool)
        if global_pool == 'token' and not self.num_prefix_tokens:
            raise ValueError("global_pool='token' needs a model built with class_token=True")

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^cls_token|pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def _architecture_args(self) -> Dict[str, Any]:
        return dict(
            embed_dim=int(self.embed_dim), depth=len(self.blocks), num_heads=int(self.num_heads),
            mlp_ratio=int(self.mlp_ratio), class_token=self.num_prefix_tokens > 0,
            multi_branch_pool=bool(self.multi_branch_pool), affine=bool(self.affine),
        )

    def _stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        self._check_input(x)
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed, self.grid_size

    @torch.jit.unused
    def _block_ckpt(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_block(blk, x, self.grid_size)

    def _feature_units(self) -> nn.ModuleList:
        return self.blocks

    def _run_unit(self, blk: nn.Module, x: torch.Tensor, feat_size: Tuple[int, int]):
        if self.grad_checkpointing:
            return self._block_ckpt(blk, x), feat_size
        return blk(x, feat_size), feat_size

    def _tap(self, x: torch.Tensor, feat_size: Tuple[int, int], index: int, norm: bool, output_fmt: str):
        # The class token, if any, is dropped; ``norm`` applies the final token BatchNorm to every tap.
        y = (self.norm(x) if norm else x)[:, self.num_prefix_tokens:]
        return tokens_to_grid(y, feat_size) if output_fmt == 'NCHW' else y

    def _final_features(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        return x

    def _truncate_units(self, count: int) -> bool:
        self.blocks = self.blocks[:count]
        return False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N (+1 class token), C)`` after the final token BatchNorm."""
        x, feat_size = self._stem(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = self._block_ckpt(blk, x)
            else:
                x = blk(x, feat_size)
        return self.norm(x)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == 'token':
            return x[:, 0]
        if self.global_pool == 'avg':
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x


def _create_binary_deit(variant: str, pretrained: bool = False, **kwargs) -> BinaryDeiT:
    return build_model(BinaryDeiT, variant, pretrained, 3, **kwargs)


def _cfg(**kwargs):
    # No spatial pool_size: DeiT's features are tokens.
    return default_cfg(**dict(dict(pool_size=None), **kwargs))


default_cfgs = generate_default_cfgs({
    'binary_deit_small_patch16_224': _cfg(),
    'binary_deit_small_gap_patch16_224': _cfg(),
    'binary_deit_small_gap_mb_patch16_224': _cfg(),
    'binary_deit_small_gap_mb_affine_patch16_224': _cfg(),
})

_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4)


@register_model
def binary_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> BinaryDeiT:
    """Table 3 row 1: the ReActNet recipe on DeiT-S, class token, no pooling branches, no affine."""
    model_args = dict(_SMALL, class_token=True, global_pool='token')
    return _create_binary_deit('binary_deit_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def binary_deit_small_gap_patch16_224(pretrained: bool = False, **kwargs) -> BinaryDeiT:
    """Table 3 row 2: global average pooling instead of the class token."""
    model_args = dict(_SMALL, class_token=False, global_pool='avg')
    return _create_binary_deit(
        'binary_deit_small_gap_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def binary_deit_small_gap_mb_patch16_224(pretrained: bool = False, **kwargs) -> BinaryDeiT:
    """Table 3 row 3: + multi-branch average pooling."""
    model_args = dict(_SMALL, class_token=False, global_pool='avg', multi_branch_pool=True)
    return _create_binary_deit(
        'binary_deit_small_gap_mb_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def binary_deit_small_gap_mb_affine_patch16_224(pretrained: bool = False, **kwargs) -> BinaryDeiT:
    """Table 3 row 4: + affine transformation before each main residual addition."""
    model_args = dict(_SMALL, class_token=False, global_pool='avg', multi_branch_pool=True, affine=True)
    return _create_binary_deit(
        'binary_deit_small_gap_mb_affine_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))
