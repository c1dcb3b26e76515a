"""The transformer layer shared by BinaryViT and the fully-binary DeiT-S (ARCHITECTURE.md section 2).

Tokens are ``(B, N, C)`` with ``N = H * W`` in row-major order (token ``n`` is row
``n // W``, column ``n % W``), as a convolution's ``flatten(2)`` gives.
"""
import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, register_notrace_function

from .layers import (
    Affine, BinaryActivation, BinaryLinear, ElasticBinarizer, RPReLU, TokenBatchNorm, frozen_batchnorm_stats)

__all__ = [
    'BinaryUnit', 'BinaryAttention', 'BinaryMlp', 'MultiBranchPool', 'Block', 'PatchEmbed',
    'checkpoint_block', 'check_image_input', 'tokens_to_grid', 'grid_to_tokens',
]


def tokens_to_grid(x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, C)`` tokens -> ``(B, C, H, W)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], feat_size[0], feat_size[1])


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` tokens."""
    return x.flatten(2).transpose(1, 2)


class BinaryUnit(nn.Module):
    """The paper's binary unit ``U(x, shortcut) = BN(BinaryLinear(x + b)) + shortcut``.

    Every binary linear layer of the model is one: its own shift ``b`` (inside ``linear``),
    its own token BatchNorm and a real-valued shortcut that keeps the information the
    1-bit product throws away.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.linear = BinaryLinear(in_features, out_features, **dd)
        self.norm = TokenBatchNorm(out_features, **dd)

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.norm(self.linear(x))
        if shortcut is None:
            return y
        return y + shortcut


class BinaryAttention(nn.Module):
    """Binary multi-head self-attention with optional key/value reduction (steps 1-9 of section 2).

    Queries, keys and values are binary units followed by RPReLU; their signs (after a second
    shift) enter the attention product, the attention probabilities are binarised with BiT's
    elastic binariser, and the real-valued ``q``, ``k``, ``v`` activations are added back to
    the context as shortcuts. With ``sr_ratio > 1`` keys and values come from an
    ``R x R``-average-pooled grid and are upsampled back (nearest) for the shortcut.
    """

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 1, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'width {dim} is not divisible by num_heads {num_heads}')
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = BinaryUnit(dim, dim, **dd)
        self.k = BinaryUnit(dim, dim, **dd)
        self.v = BinaryUnit(dim, dim, **dd)
        if sr_ratio > 1:
            self.kv_reduce = BinaryUnit(dim, dim, **dd)
            self.act_kv_reduce = RPReLU(dim, **dd)
        else:
            self.kv_reduce = None
            self.act_kv_reduce = None
        self.act_q = RPReLU(dim, **dd)
        self.act_k = RPReLU(dim, **dd)
        self.act_v = RPReLU(dim, **dd)
        self.sign_q = BinaryActivation(dim, **dd)
        self.sign_k = BinaryActivation(dim, **dd)
        self.sign_v = BinaryActivation(dim, **dd)
        self.prob_binarizer = ElasticBinarizer(**dd)
        self.norm_ctx = TokenBatchNorm(dim, **dd)
        self.act_ctx = RPReLU(dim, **dd)
        self.proj = BinaryUnit(dim, dim, **dd)
        self.act_proj = RPReLU(dim, **dd)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        qa = self.act_q(self.q(x, x))
        if self.kv_reduce is not None and self.act_kv_reduce is not None:
            pooled = grid_to_tokens(F.avg_pool2d(tokens_to_grid(x, feat_size), self.sr_ratio))
            kv = self.act_kv_reduce(self.kv_reduce(pooled, pooled))
        else:
            kv = x
        ka = self.act_k(self.k(kv, kv))
        va = self.act_v(self.v(kv, kv))

        q = self._split_heads(self.sign_q(qa))
        k = self._split_heads(self.sign_k(ka))
        v = self._split_heads(self.sign_v(va))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        attn = self.prob_binarizer(attn.softmax(dim=-1))
        ctx = (attn @ v).transpose(1, 2).reshape(B, N, C)

        if self.kv_reduce is not None:
            # Nearest upsampling is a copy, so upsampling the sum equals summing the upsampled.
            kv_grid = tokens_to_grid(ka + va, (feat_size[0] // self.sr_ratio, feat_size[1] // self.sr_ratio))
            kv_shortcut = grid_to_tokens(F.interpolate(kv_grid, size=feat_size, mode='nearest'))
            m = self.norm_ctx(ctx) + qa + kv_shortcut
        else:
            m = self.norm_ctx(ctx) + qa + ka + va
        m = self.act_ctx(m)
        return self.act_proj(self.proj(m, m))


class BinaryMlp(nn.Module):
    """Binary FFN with channel-repeat and channel-pool shortcuts (section 2, FFN).

    ``t = RPReLU(U_1(w, [w, w, ..., w]))`` expands ``C -> E*C`` with ``E`` copies of the input
    as shortcut; ``z = RPReLU(U_2(t, pool_E(t)))`` contracts back, the shortcut averaging
    consecutive groups of ``E`` channels. Both shortcuts are computed as broadcasting views,
    never as concatenated copies.
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, device=None, dtype=None):
        super().__init__()
        if int(mlp_ratio) != mlp_ratio or mlp_ratio < 1:
            raise ValueError(f'mlp_ratio must be a positive whole number for the repeat/pool shortcuts, got {mlp_ratio}')
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.expansion = int(mlp_ratio)
        hidden = dim * self.expansion
        self.fc1 = BinaryUnit(dim, hidden, **dd)
        self.act1 = RPReLU(hidden, **dd)
        self.fc2 = BinaryUnit(hidden, dim, **dd)
        self.act2 = RPReLU(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.fc1(x).unflatten(-1, (self.expansion, self.dim)) + x.unsqueeze(-2)
        t = self.act1(t.flatten(-2))
        pooled = t.unflatten(-1, (self.dim, self.expansion)).mean(-1)
        return self.act2(self.fc2(t, pooled))


class MultiBranchPool(nn.Module):
    """Multi-branch average pooling (the paper's convolutional inductive bias for binary ViTs).

    Four stride-1 average pools over the token grid, ``3x1``, ``1x3``, ``5x1`` and ``1x5``
    (``kH x kW``), zero padding that keeps the size and counts in the average, each through
    its own :class:`Affine` initialised to zero, summed.
    """
    kernels = {'h3': (3, 1), 'w3': (1, 3), 'h5': (5, 1), 'w5': (1, 5)}

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.h3 = Affine(dim, init_alpha=0., **dd)
        self.w3 = Affine(dim, init_alpha=0., **dd)
        self.h5 = Affine(dim, init_alpha=0., **dd)
        self.w5 = Affine(dim, init_alpha=0., **dd)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        grid = tokens_to_grid(x, feat_size)
        out = self.h3(grid_to_tokens(F.avg_pool2d(grid, (3, 1), 1, (1, 0))))
        out = out + self.w3(grid_to_tokens(F.avg_pool2d(grid, (1, 3), 1, (0, 1))))
        out = out + self.h5(grid_to_tokens(F.avg_pool2d(grid, (5, 1), 1, (2, 0))))
        out = out + self.w5(grid_to_tokens(F.avg_pool2d(grid, (1, 5), 1, (0, 2))))
        return out


class Block(nn.Module):
    """One binary transformer layer: attention and FFN, each behind a token BatchNorm, with the
    optional affine before each main residual addition and the optional pooling branches."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: int = 4,
            sr_ratio: int = 1,
            affine: bool = True,
            multi_branch_pool: bool = True,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = TokenBatchNorm(dim, **dd)
        self.attn = BinaryAttention(dim, num_heads=num_heads, sr_ratio=sr_ratio, **dd)
        self.affine1 = Affine(dim, **dd) if affine else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = TokenBatchNorm(dim, **dd)
        self.mlp = BinaryMlp(dim, mlp_ratio=mlp_ratio, **dd)
        self.affine2 = Affine(dim, **dd) if affine else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.pool = MultiBranchPool(dim, **dd) if multi_branch_pool else None

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.affine1(self.attn(self.norm1(x), feat_size)))
        w = self.norm2(x)
        x = x + self.drop_path2(self.affine2(self.mlp(w)))
        if self.pool is not None:
            x = x + self.pool(w, feat_size)
        return x


class PatchEmbed(nn.Module):
    """Full-precision patchify stem: ``patch x patch`` convolution with stride ``patch`` and bias,
    flattened to tokens, optionally followed by a token BatchNorm (the pyramid stem)."""

    def __init__(
            self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = False, device=None, dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, **dd)
        self.norm = TokenBatchNorm(embed_dim, **dd) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(grid_to_tokens(self.proj(x)))


def checkpoint_block(block: nn.Module, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
    """Run ``block(x, feat_size)`` under activation checkpointing.

    The recomputation in the backward pass runs with :func:`frozen_batchnorm_stats`, so the
    token BatchNorms update their running statistics once per step, as without checkpointing.
    """
    return torch.utils.checkpoint.checkpoint(
        block, x, feat_size, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), frozen_batchnorm_stats()))


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int], model_name: str) -> None:
    """Raise a ValueError naming the expected and received shape when ``x`` does not fit the model."""
    expected = (in_chans, img_size[0], img_size[1])
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        hint = ''
        if x.ndim == 4 and x.shape[1] != in_chans:
            hint = f' The model was built with in_chans={in_chans}.'
        elif x.ndim == 4:
            hint = (f' Its position embeddings are fixed to img_size={img_size[0]}x{img_size[1]};'
                    f' build it with img_size=({x.shape[2]}, {x.shape[3]}) for that input.')
        raise ValueError(
            f'{model_name} expects input of shape (B, {expected[0]}, {expected[1]}, {expected[2]}),'
            f' got {tuple(x.shape)}.{hint}')
