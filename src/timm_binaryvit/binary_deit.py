"""Fully-binary DeiT-S: the ablation models of BinaryViT's Table 3 (Le & Li, CVPR 2023 Workshops).

Row 1 is the baseline, the ReActNet recipe applied to DeiT-S (class token, every
LayerNorm replaced by a token BatchNorm). Each later row adds one of the paper's
changes: global average pooling instead of the class token (row 2), multi-branch
pooling (row 3), an affine transformation before each main residual addition (row 4).
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .blocks import Block, PatchEmbed, check_image_input, checkpoint_block, tokens_to_grid, with_input_size_cfg
from .binaryvit import _cfg as _pyramid_cfg
from .convert import checkpoint_filter_fn
from .layers import TokenBatchNorm

__all__ = ['BinaryDeiT']


class BinaryDeiT(nn.Module):
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
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == 'token' and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
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
        self.num_prefix_tokens = 1 if class_token else 0
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_features = self.head_hidden_size = embed_dim
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
        self.norm = TokenBatchNorm(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if not self.pos_embed.is_meta:
            self.init_weights()

    def init_weights(self):
        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^cls_token|pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def model_args(self) -> Dict[str, Any]:
        """The JSON-serialisable constructor arguments that rebuild this architecture (drop rates aside:
        they do not change it). Read from the model, so they follow ``reset_classifier``."""
        return dict(
            img_size=[int(v) for v in self.img_size], in_chans=int(self.in_chans),
            num_classes=int(self.num_classes), global_pool=str(self.global_pool), patch_size=int(self.patch_size),
            embed_dim=int(self.embed_dim), depth=len(self.blocks), num_heads=int(self.num_heads),
            mlp_ratio=int(self.mlp_ratio), class_token=self.num_prefix_tokens > 0,
            multi_branch_pool=bool(self.multi_branch_pool), affine=bool(self.affine),
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', 'avg', ''):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            if global_pool == 'token' and self.cls_token is None:
                raise ValueError("global_pool='token' needs a model built with class_token=True")
            self.global_pool = global_pool
        weight = self.pos_embed
        self.head = nn.Linear(self.embed_dim, num_classes, device=weight.device, dtype=weight.dtype) \
            if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear) and not weight.is_meta:
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)
        self.head.train(self.training)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.img_size, 'BinaryDeiT')
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    @torch.jit.unused
    def _block_ckpt(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_block(blk, x, self.grid_size)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the requested layers, as ``(B, C, H/16, W/16)`` maps (``'NCHW'``) or ``(B, N, C)`` patch tokens (``'NLC'``).

        The class token, if any, is dropped from the intermediates; ``norm`` applies the final
        token BatchNorm to each of them.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        intermediates = []
        x = self._embed(x)
        for i, blk in enumerate(self.blocks):
            if stop_early and i > max_index:
                break
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = self._block_ckpt(blk, x)
            else:
                x = blk(x, self.grid_size)
            if i in take_indices:
                y = self.norm(x) if norm else x
                y = y[:, self.num_prefix_tokens:]
                intermediates.append(tokens_to_grid(y, self.grid_size) if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the layers (and, as asked, the final norm and head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N (+1 class token), C)`` after the final token BatchNorm."""
        x = self._embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = self._block_ckpt(blk, x)
            else:
                x = blk(x, self.grid_size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_binary_deit(variant: str, pretrained: bool = False, **kwargs) -> BinaryDeiT:
    out_indices = kwargs.pop('out_indices', 3)
    kwargs = with_input_size_cfg(kwargs)
    return build_model_with_cfg(
        BinaryDeiT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs):
    # The pyramid's defaults, less its final 7x7 map: DeiT's features are tokens.
    return _pyramid_cfg(**dict(dict(pool_size=None), **kwargs))


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
