"""BinaryViT: the pyramid binary vision transformer of Le & Li (CVPR 2023 Workshops).

Paper: "BinaryViT: Pushing Binary Vision Transformers Towards Convolutional Models",
arXiv 2306.16678, supplementary Table 1 (architecture) and section 2 (recipe).

Four stages of binary transformer layers (widths 64-128-256-512, depths 3-4-8-4) on a
4x4 patchify stem, joined by stage transitions that halve the grid: binary (a binary
2x2 convolution with a pooled, channel-repeated shortcut) or full-precision. The exact
computation is ``shared/design/ARCHITECTURE.md``.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from .batchnorm import TokenBatchNorm
from .blocks import Block, PatchEmbed, checkpoint_block
from .layers import BinaryConv2d, RPReLU, grid_to_tokens, tokens_to_grid
from .model_api import TimmModelApi, build_model, default_cfg

__all__ = ['BinaryViT', 'BinaryDownsample', 'FullPrecisionDownsample', 'BinaryViTStage']


class BinaryDownsample(nn.Module):
    """Binary stage transition ``C_in -> C_out`` that halves the grid.

    ``t = BN_0(x)``; main branch: binary 2x2 stride-2 convolution of ``t`` (with its shift);
    shortcut: 2x2 average pool of ``t`` repeated ``C_out / C_in`` times along channels
    (``[s, s, ..., s]``); ``y = RPReLU(BN(main) + shortcut)``.
    """

    def __init__(self, dim_in: int, dim_out: int, device=None, dtype=None):
        super().__init__()
        if dim_out % dim_in:
            raise ValueError(f'a binary stage transition needs the width to grow by a whole factor, '
                             f'got {dim_in} -> {dim_out}')
        dd = {'device': device, 'dtype': dtype}
        self.dim_in = dim_in
        self.repeats = dim_out // dim_in
        self.norm_in = TokenBatchNorm(dim_in, **dd)
        self.conv = BinaryConv2d(dim_in, dim_out, 2, stride=2, **dd)
        self.norm = TokenBatchNorm(dim_out, **dd)
        self.act = RPReLU(dim_out, **dd)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        t = tokens_to_grid(self.norm_in(x), feat_size)
        shortcut = grid_to_tokens(F.avg_pool2d(t, 2))
        y = self.norm(grid_to_tokens(self.conv(t)))
        y = y.unflatten(-1, (self.repeats, self.dim_in)) + shortcut.unsqueeze(-2)
        return self.act(y.flatten(-2))


class FullPrecisionDownsample(nn.Module):
    """Full-precision stage transition (the "FP patch embedding" variant): ``BN(conv2x2_s2(BN_0(x)))``."""

    def __init__(self, dim_in: int, dim_out: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm_in = TokenBatchNorm(dim_in, **dd)
        self.conv = nn.Conv2d(dim_in, dim_out, 2, stride=2, bias=False, **dd)
        self.norm = TokenBatchNorm(dim_out, **dd)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        return self.norm(grid_to_tokens(self.conv(tokens_to_grid(self.norm_in(x), feat_size))))


class BinaryViTStage(nn.Module):
    """One pyramid stage: optional stage transition, its learned position embedding, binary layers."""

    def __init__(
            self,
            dim_in: int,
            dim: int,
            depth: int,
            grid_size: Tuple[int, int],
            num_heads: int,
            mlp_ratio: int,
            sr_ratio: int,
            downsample: Optional[str] = None,
            drop_path: Sequence[float] = (),
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        if downsample == 'binary':
            self.downsample = BinaryDownsample(dim_in, dim, **dd)
        elif downsample == 'fp':
            self.downsample = FullPrecisionDownsample(dim_in, dim, **dd)
        else:
            self.downsample = None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], dim, **dd))
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio=mlp_ratio, sr_ratio=sr_ratio, affine=True, multi_branch_pool=True,
                  drop_path=drop_path[i] if drop_path else 0., **dd)
            for i in range(depth)])

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        if self.downsample is not None:
            x = self.downsample(x, feat_size)
            feat_size = (feat_size[0] // 2, feat_size[1] // 2)
        x = x + self.pos_embed
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_block(blk, x, feat_size)
            else:
                x = blk(x, feat_size)
        return x, feat_size


class BinaryViT(TimmModelApi):
    """BinaryViT (Le & Li, CVPR 2023 Workshops): a four-stage pyramid of binary transformer layers.

    Args:
        img_size: input size; a multiple of 32 (the pyramid halves the 4x4-patch grid three times).
        in_chans: input channels.
        num_classes: classes of the full-precision linear head (0 for none).
        global_pool: ``'avg'`` (mean over tokens) or ``''`` (no pooling).
        embed_dims, depths, num_heads, mlp_ratios, sr_ratios: per-stage width, number of layers,
            attention heads, FFN expansion ``E`` (a whole number) and key/value reduction ``R``.
        fp_transitions: full-precision instead of binary stage transitions.
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth, rising linearly over all layers.
    """
    prune_norm_drops_head = True

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (3, 4, 8, 4),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            mlp_ratios: Sequence[int] = (8, 8, 4, 4),
            sr_ratios: Sequence[int] = (8, 4, 1, 1),
            patch_size: int = 4,
            fp_transitions: bool = False,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        per_stage = dict(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, sr_ratios=sr_ratios)
        for name, value in per_stage.items():
            if len(value) != num_stages:
                raise ValueError(f'{name} has {len(value)} entries but depths has {num_stages} stages')
        self._check_global_pool(global_pool)
        self.img_size = to_2tuple(img_size)
        stride = patch_size * 2 ** (num_stages - 1)
        if self.img_size[0] % stride or self.img_size[1] % stride:
            raise ValueError(
                f'BinaryViT needs img_size to be a multiple of {stride} (patch {patch_size}, '
                f'{num_stages - 1} halvings), got {self.img_size}')
        grids = [(self.img_size[0] // (patch_size * 2 ** i), self.img_size[1] // (patch_size * 2 ** i))
                 for i in range(num_stages)]
        for i, (grid, ratio) in enumerate(zip(grids, sr_ratios)):
            if grid[0] % ratio or grid[1] % ratio:
                raise ValueError(f'stage {i + 1} grid {grid} is not divisible by its key/value reduction {ratio}; '
                                 f'choose img_size or sr_ratios so that it is')

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.patch_size = patch_size
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.mlp_ratios = tuple(mlp_ratios)
        self.sr_ratios = tuple(sr_ratios)
        self.fp_transitions = fp_transitions
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dims[0], norm=True, **dd)
        _dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        dpr = [_dpr[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            self.stages.append(BinaryViTStage(
                embed_dims[i - 1] if i else embed_dims[0],
                embed_dims[i],
                depths[i],
                grids[i],
                num_heads[i],
                mlp_ratios[i],
                sr_ratios[i],
                downsample=None if i == 0 else ('fp' if fp_transitions else 'binary'),
                drop_path=dpr[i],
                **dd,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}'))
        self._build_head(embed_dims[-1], drop_rate, **dd)
        self._grids = grids
        if not self.norm.bn.weight.is_meta:
            self.init_weights()

    def init_weights(self):
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=.02)
        self._init_head()

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f'stages.{i}.pos_embed' for i in range(len(self.stages))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^patch_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.(?:downsample|pos_embed)', (0,)),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _architecture_args(self) -> Dict[str, Any]:
        if len(self.stages) != len(self.depths):
            raise ValueError(
                f'this BinaryViT was pruned to {len(self.stages)} of {len(self.depths)} stages '
                f'(prune_intermediate_layers); a pruned model cannot be rebuilt from its arguments')
        return dict(
            embed_dims=[int(v) for v in self.embed_dims], depths=[int(v) for v in self.depths],
            num_heads=[int(v) for v in self.num_heads], mlp_ratios=[int(v) for v in self.mlp_ratios],
            sr_ratios=[int(v) for v in self.sr_ratios], fp_transitions=bool(self.fp_transitions),
        )

    def _stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        self._check_input(x)
        return self.patch_embed(x), self._grids[0]

    def _feature_units(self) -> nn.ModuleList:
        return self.stages

    def _run_unit(self, stage: nn.Module, x: torch.Tensor, feat_size: Tuple[int, int]):
        return stage(x, feat_size)

    def _tap(self, x: torch.Tensor, feat_size: Tuple[int, int], index: int, norm: bool, output_fmt: str):
        # Stage outputs as (B, C_i, H / s_i, W / s_i) maps (strides 4, 8, 16, 32); ``norm`` applies the
        # final token BatchNorm to the last stage's output only.
        y = self.norm(x) if norm and index == len(self.stages) - 1 else x
        return tokens_to_grid(y, feat_size)

    def _final_features(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        return tokens_to_grid(x, feat_size)

    def _truncate_units(self, count: int) -> bool:
        if count >= len(self.stages):
            return False
        self.stages = self.stages[:count]
        self.num_features = self.head_hidden_size = self.embed_dims[count - 1]
        return True

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features ``(B, C_4, H / 32, W / 32)`` after the final token BatchNorm."""
        x, feat_size = self._stem(x)
        for stage in self.stages:
            x, feat_size = stage(x, feat_size)
        return self._final_features(self.norm(x), feat_size)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1)) if self.global_pool == 'avg' else x


def _create_binaryvit(variant: str, pretrained: bool = False, **kwargs) -> BinaryViT:
    all_stages = tuple(range(len(kwargs.get('depths', (3, 4, 8, 4)))))
    return build_model(BinaryViT, variant, pretrained, all_stages, **kwargs)


def _cfg(**kwargs):
    return default_cfg(**dict(dict(pool_size=(7, 7)), **kwargs))


default_cfgs = generate_default_cfgs({
    'binaryvit_small_patch4_224': _cfg(),
    'binaryvit': _cfg(),
    'binaryvit_small_fpembed_patch4_224': _cfg(),
})

_SMALL = dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 8, 4), num_heads=(1, 2, 4, 8),
              mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 1, 1))


@register_model
def binaryvit_small_patch4_224(pretrained: bool = False, **kwargs) -> BinaryViT:
    """BinaryViT, supplementary Table 1: fully binary, including the stage transitions."""
    return _create_binaryvit('binaryvit_small_patch4_224', pretrained=pretrained, **dict(_SMALL, **kwargs))


@register_model
def binaryvit(pretrained: bool = False, **kwargs) -> BinaryViT:
    """BinaryViT under its short name; the same model as ``binaryvit_small_patch4_224``."""
    return _create_binaryvit('binaryvit', pretrained=pretrained, **dict(_SMALL, **kwargs))


@register_model
def binaryvit_small_fpembed_patch4_224(pretrained: bool = False, **kwargs) -> BinaryViT:
    """BinaryViT with full-precision stage transitions (the paper's "FP patch embedding" variant)."""
    return _create_binaryvit(
        'binaryvit_small_fpembed_patch4_224', pretrained=pretrained, **dict(_SMALL, **dict(dict(fp_transitions=True), **kwargs)))
