"""The transformer layer shared by BinaryViT and the fully-binary DeiT-S (docs/architecture.md, "One layer").

Tokens are ``(B, N, C)`` with ``N = H * W`` in row-major order (token ``n`` is row
``n // W``, column ``n % W``), as a convolution's ``flatten(2)`` gives
(:func:`~timm_binaryvit.layers.tokens_to_grid`).

The modules here: the binary unit ``U(x, r) = BN(BinaryLinear(x + b)) + r``, the binary attention
(BiT's elastic binariser on the probabilities), the binary FFN with its repeat and pool shortcuts,
the paper's multi-branch average pooling, the layer that joins them, the full-precision patch stem
and activation checkpointing of a layer. Every module with more than one part has two forward paths
that compute the same values, the module-by-module path and a fused one; :mod:`timm_binaryvit.fused`
says when the fused path runs and holds its autograd functions. In eval mode the layer runs as its
folded inference twin where :mod:`timm_binaryvit.folded_eval` allows it.
"""
import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, register_notrace_module

from .batchnorm import TokenBatchNorm, frozen_batchnorm_stats, norm_add_rprelu
from .dispatch import sign_product
from .folded_eval import foldable, folded_twin, forget_twin
from .fused import FusedPath, binary_attention_product, binary_ffn, binary_ffn_operator, compiled_fusable, pool_branches
from .layers import (
    Affine, BinaryActivation, BinaryLinear, ElasticBinarizer, RPReLU, binary_linear, grid_to_tokens, tokens_to_grid)

__all__ = ['BinaryUnit', 'BinaryAttention', 'BinaryMlp', 'MultiBranchPool', 'Block', 'PatchEmbed', 'checkpoint_block']


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

    @torch.jit.unused
    def forward_act(self, x: torch.Tensor, act: RPReLU, sign: Optional[BinaryActivation] = None,
                    affine: Optional[Affine] = None):
        """Fused ``act(self(x, x))`` (then ``sign``, or ``affine``), see
        :func:`~timm_binaryvit.batchnorm.norm_add_rprelu`. The caller checks :func:`~timm_binaryvit.fused.fusable`."""
        y = binary_linear(x, self.linear.shift, self.linear.weight)
        return norm_add_rprelu(y, x, self.norm, act, sign=sign, affine=affine)

    @torch.jit.unused
    def fused_structure(self) -> bool:
        return type(self.linear) is BinaryLinear and type(self.norm) is TokenBatchNorm


def _is(module, cls) -> bool:
    return type(module) is cls


class BinaryAttention(FusedPath):
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
        if self.use_fused(x):
            return self._forward_fused(x, feat_size)
        return self.forward_modules(x, feat_size)

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        # TorchScript compiles the signature of what forward calls even where unused: this one names no
        # module type (Affine), which a model without affines would never have compiled.
        return self.forward_fused(x, feat_size)

    @torch.jit.unused
    def fused_structure(self) -> bool:
        units = [self.q, self.k, self.v, self.proj] + ([self.kv_reduce] if self.kv_reduce is not None else [])
        acts = [self.act_q, self.act_k, self.act_v, self.act_ctx, self.act_proj] + (
            [self.act_kv_reduce] if self.kv_reduce is not None else [])
        return (all(_is(u, BinaryUnit) and u.fused_structure() for u in units)
                and all(_is(a, RPReLU) for a in acts)
                and all(_is(s, BinaryActivation) for s in (self.sign_q, self.sign_k, self.sign_v))
                and _is(self.prob_binarizer, ElasticBinarizer) and _is(self.norm_ctx, TokenBatchNorm))

    @torch.jit.unused
    def forward_fused(self, x: torch.Tensor, feat_size: Tuple[int, int], affine: Optional[Affine] = None,
                      residual: Optional[torch.Tensor] = None):
        """The fused path (the caller checks fusability): the same values and gradients as
        ``residual + affine(self(x, feat_size))`` (each part optional) with far fewer saved tensors."""
        B, N, C = x.shape
        qa, q = self.q.forward_act(x, self.act_q, sign=self.sign_q)
        if self.kv_reduce is not None and self.act_kv_reduce is not None:
            pooled = grid_to_tokens(F.avg_pool2d(tokens_to_grid(x, feat_size), self.sr_ratio))
            kv = self.kv_reduce.forward_act(pooled, self.act_kv_reduce)
        else:
            kv = x
        ka, k = self.k.forward_act(kv, self.act_k, sign=self.sign_k)
        va, v = self.v.forward_act(kv, self.act_v, sign=self.sign_v)
        ctx = binary_attention_product(q, k, v, self.prob_binarizer.scale, self.num_heads)
        if self.kv_reduce is not None:
            # Nearest upsampling by R is a broadcast over R x R blocks of the grid.
            R = self.sr_ratio
            h, w = feat_size[0] // R, feat_size[1] // R
            shortcut = (qa.view(B, h, R, w, R, C) + (ka + va).view(B, h, 1, w, 1, C)).view(B, N, C)
        else:
            shortcut = torch.add(qa, ka).add_(va)
        m = norm_add_rprelu(ctx, shortcut, self.norm_ctx, self.act_ctx)
        y = binary_linear(m, self.proj.linear.shift, self.proj.linear.weight)
        return norm_add_rprelu(y, m, self.proj.norm, self.act_proj, affine=affine, residual=residual)

    def forward_modules(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
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
        attn = sign_product('matmul', q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        attn = self.prob_binarizer(attn.softmax(dim=-1))
        ctx = sign_product('matmul', attn, v).transpose(1, 2).reshape(B, N, C)

        if self.kv_reduce is not None:
            # Nearest upsampling is a copy, so upsampling the sum equals summing the upsampled.
            kv_grid = tokens_to_grid(ka + va, (feat_size[0] // self.sr_ratio, feat_size[1] // self.sr_ratio))
            kv_shortcut = grid_to_tokens(F.interpolate(kv_grid, size=feat_size, mode='nearest'))
            m = self.norm_ctx(ctx) + qa + kv_shortcut
        else:
            m = self.norm_ctx(ctx) + qa + ka + va
        m = self.act_ctx(m)
        return self.act_proj(self.proj(m, m))


class BinaryMlp(FusedPath):
    """Binary FFN with channel-repeat and channel-pool shortcuts (section 2, FFN).

    ``t = RPReLU(U_1(w, [w, w, ..., w]))`` expands ``C -> E*C`` with ``E`` copies of the input
    as shortcut; ``z = RPReLU(U_2(t, pool_E(t)))`` contracts back, the shortcut averaging
    consecutive groups of ``E`` channels. Both shortcuts are computed as broadcasting views,
    never as concatenated copies. The fused path is :func:`~timm_binaryvit.fused.binary_ffn`.
    """
    #: fused path on the CPU: up to this many hidden values (tokens x E * C) the FFN runs in one
    #: piece, with larger (faster) matrix products and a few transient hidden-sized tensors: DeiT-S
    #: at batch 16 (4.8M) trains faster this way than in chunks, for more peak memory (see the
    #: README's `benchmarks/bench.py` figures).
    #: Beyond, in chunks of about ``chunk_elements`` hidden values (2 MiB of float32, so that a
    #: chunk's temporaries stay in the caches and are reused rather than freshly allocated: fresh
    #: memory costs page faults, which two threads take in turn)
    unchunked_elements = 1 << 23
    chunk_elements = 1 << 19

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
        if self.use_fused(x):
            return self.forward_fused(x)
        if self.use_operator(x):
            return self.forward_operator(x)
        return self.forward_modules(x)

    @torch.jit.unused
    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path: the same values and gradients as :meth:`forward_modules`."""
        return binary_ffn(x, self)

    def use_operator(self, x: torch.Tensor) -> bool:
        if torch.jit.is_scripting():
            return False
        return self._operator_allowed(x)

    @torch.jit.unused
    def _operator_allowed(self, x: torch.Tensor) -> bool:
        return self.fused_structure() and compiled_fusable(x, self)

    @torch.jit.unused
    def forward_operator(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path as one custom operator, which ``torch.compile`` keeps whole (training mode)."""
        return binary_ffn_operator(x, self)

    @torch.jit.unused
    def fused_structure(self) -> bool:
        return (_is(self.fc1, BinaryUnit) and self.fc1.fused_structure() and _is(self.fc2, BinaryUnit)
                and self.fc2.fused_structure() and _is(self.act1, RPReLU) and _is(self.act2, RPReLU))

    def forward_modules(self, x: torch.Tensor) -> torch.Tensor:
        t = self.fc1(x).unflatten(-1, (self.expansion, self.dim)) + x.unsqueeze(-2)
        t = self.act1(t.flatten(-2))
        pooled = t.unflatten(-1, (self.dim, self.expansion)).mean(-1)
        return self.act2(self.fc2(t, pooled))


class MultiBranchPool(FusedPath):
    """Multi-branch average pooling (the paper's convolutional inductive bias for binary ViTs).

    Four stride-1 average pools over the token grid, ``3x1``, ``1x3``, ``5x1`` and ``1x5``
    (``kH x kW``), zero padding that keeps the size and counts in the average, each through
    its own :class:`Affine` initialised to zero, summed. The fused path is
    :func:`~timm_binaryvit.fused.pool_branches`.
    """
    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.h3 = Affine(dim, init_alpha=0., **dd)
        self.w3 = Affine(dim, init_alpha=0., **dd)
        self.h5 = Affine(dim, init_alpha=0., **dd)
        self.w5 = Affine(dim, init_alpha=0., **dd)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        if self.use_fused(x):
            return self.forward_fused(x, feat_size)
        return self.forward_modules(x, feat_size)

    @torch.jit.unused
    def forward_fused(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        """The fused path: the same values and gradients as :meth:`forward_modules`."""
        return pool_branches(None, x, feat_size, self)

    @torch.jit.unused
    def fused_structure(self) -> bool:
        return all(_is(a, Affine) for a in (self.h3, self.w3, self.h5, self.w5))

    def forward_modules(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        grid = tokens_to_grid(x, feat_size)
        out = self.h3(grid_to_tokens(F.avg_pool2d(grid, (3, 1), 1, (1, 0))))
        out = out + self.w3(grid_to_tokens(F.avg_pool2d(grid, (1, 3), 1, (0, 1))))
        out = out + self.h5(grid_to_tokens(F.avg_pool2d(grid, (5, 1), 1, (2, 0))))
        out = out + self.w5(grid_to_tokens(F.avg_pool2d(grid, (1, 5), 1, (0, 2))))
        return out


# FX keeps the layer whole, so a traced model runs the same path at run time as eager mode does (the
# folded twin in eval mode, the fused functions in training) and gives the same numbers.
@register_notrace_module
class Block(FusedPath):
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
        if self.use_fused(x):
            return self.forward_fused(x, feat_size)
        if self.use_folded(x):
            return self.forward_folded(x, feat_size)
        return self.forward_modules(x, feat_size)

    def use_folded(self, x: torch.Tensor) -> bool:
        if torch.jit.is_scripting():
            return False
        return self._folded_allowed(x)

    @torch.jit.unused
    def _folded_allowed(self, x: torch.Tensor) -> bool:
        return self.fused_structure() and foldable(x, self)

    @torch.jit.unused
    def forward_folded(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        """Eval mode without gradients: the layer's deployed twin (:mod:`timm_binaryvit.folded_eval`)."""
        # deploy builds on this module, so it is imported when first needed
        from .deploy.block import DeployedBlock
        from .deploy.runtime import Workspace
        twin = folded_twin(self, x, lambda: DeployedBlock(self, x.dtype, x.device))
        out = x.clone(memory_format=torch.contiguous_format)  # the twin works in place; x may be kept by the caller
        return twin(out, feat_size, Workspace(out))

    def train(self, mode: bool = True):
        if mode:
            forget_twin(self)
        return super().train(mode)

    @torch.jit.unused
    def fused_structure(self) -> bool:
        return (_is(self.norm1, TokenBatchNorm) and _is(self.norm2, TokenBatchNorm)
                and _is(self.attn, BinaryAttention) and self.attn.fused_structure()
                and _is(self.mlp, BinaryMlp) and self.mlp.fused_structure()
                and all(_is(a, Affine) or _is(a, nn.Identity) for a in (self.affine1, self.affine2))
                and all(_is(d, DropPath) or _is(d, nn.Identity) for d in (self.drop_path1, self.drop_path2))
                and (self.pool is None or (_is(self.pool, MultiBranchPool) and self.pool.fused_structure())))

    @torch.jit.unused
    def forward_fused(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        affine1 = self.affine1 if isinstance(self.affine1, Affine) else None
        affine2 = self.affine2 if isinstance(self.affine2, Affine) else None
        if isinstance(self.drop_path1, nn.Identity):
            x = self.attn.forward_fused(self.norm1(x), feat_size, affine1, residual=x)
        else:
            x = x + self.drop_path1(self.attn.forward_fused(self.norm1(x), feat_size, affine1))
        w = self.norm2(x)
        if isinstance(self.drop_path2, nn.Identity):
            x = binary_ffn(w, self.mlp, affine2, residual=x)
        else:
            x = x + self.drop_path2(binary_ffn(w, self.mlp, affine2))
        if self.pool is not None:
            x = pool_branches(x, w, feat_size, self.pool)
        return x

    def forward_modules(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
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

    The recomputation in the backward pass runs with
    :func:`~timm_binaryvit.batchnorm.frozen_batchnorm_stats`, so the token BatchNorms update their
    running statistics once per step, as without checkpointing.
    """
    return torch.utils.checkpoint.checkpoint(
        block, x, feat_size, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), frozen_batchnorm_stats()))
