"""The fused training path of the transformer layer: when it may run, and the autograd functions it runs.

Every module of :mod:`timm_binaryvit.blocks` (attention, FFN, pooling branches, the layer) is a
:class:`FusedPath` with two forward paths that compute the same values. The module-by-module path
calls each submodule in turn; it is what TorchScript compiles, and it runs whenever a submodule
carries hooks, a token BatchNorm was converted to ``SyncBatchNorm``, in eval mode (where
:mod:`timm_binaryvit.folded_eval` may stand in instead), under autocast, FX
or TorchScript tracing, a TorchDispatchMode, or for dtypes other than float32 / float64 (see
:func:`fusable`). Otherwise a fused path runs a few custom autograd functions instead, which keep far
fewer tensors for the backward pass and make far fewer passes over memory:

* every binary unit with its RPReLU (and the attention's second shift and sign, or the affine before
  a residual addition) is :func:`~timm_binaryvit.layers.binary_linear` followed by
  :func:`~timm_binaryvit.batchnorm.norm_add_rprelu`, which keep only the unit's input and the linear
  output;
* the attention product (``sign(Q) sign(K)^T``, softmax, BiT's elastic binariser, ``P_b sign(V)``) is
  one function (:func:`binary_attention_product`) keeping the probabilities and 1-byte copies of the
  signs;
* the whole FFN is one function (:func:`binary_ffn`) that never holds its ``E * C``-wide hidden
  activations: it works through the tokens in chunks, takes the first BatchNorm's batch statistics
  exactly from the Gram matrix of the 1-bit input signs, and recomputes the hidden activations chunk
  by chunk in the backward pass, which it finishes in one sweep;
* the four pooling branches with their affines and the residual addition are one function
  (:func:`pool_branches`) that keeps only its input.

Each computes the same values as the module path and trains with the same pseudo-gradients:
ApproxSign (Bi-Real Net) for activation signs, the clipped straight-through gradient of the centred
weight sign (ReActNet / BiT), BiT's elastic pseudo-gradient for the attention probabilities, all
written once in :mod:`timm_binaryvit.quantizers`, and exact gradients for everything real-valued.
"""
import math
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .batchnorm import (
    TokenBatchNorm, _check_batch_size, _running_stats_target, _shifted_bias, _stats_are_frozen, batchnorm_backward,
    batchnorm_forward, batchnorm_uses_batch_stats)
from .dispatch import _custom_autograd_allowed, custom_operator_allowed, sign_mm_kind
from .layers import Affine, _prelu_backward, _rows, grid_to_tokens, tokens_to_grid
from .quantizers import approx_sign_backward_, centred_sign_backward, centred_sign_factors, elastic_backward

if TYPE_CHECKING:
    from .blocks import BinaryMlp, MultiBranchPool

__all__ = ['fusable', 'compiled_fusable', 'plain_modules', 'FusedPath', 'binary_attention_product', 'binary_ffn',
           'binary_ffn_operator', 'pool_branches']


# ---------------------------------------------------------------------------------------------
# When the fused path runs


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, '_backward_pre_hooks', None))


def _global_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or getattr(m, '_global_backward_pre_hooks', None))


def fusable(x, *modules: nn.Module) -> bool:
    """Whether a fused autograd path may stand in for the forward calls of ``modules`` (and all their
    submodules) on input ``x``.

    True in training mode where :func:`plain_modules` holds. Otherwise the modules run one by one
    (same values), so hooks fire, ``SyncBatchNorm`` synchronises and op-level profilers see every
    module; eval mode has its own stand-in (:mod:`timm_binaryvit.folded_eval`).
    """
    return all(m.training for m in modules) and plain_modules(x, *modules)


def plain_modules(x, *modules: nn.Module) -> bool:
    """Whether ``modules`` run on ``x`` as nothing but their own arithmetic, so that one function may
    compute them all at once: :func:`~timm_binaryvit.dispatch.use_custom_autograd` holds (eager
    float32 / float64, no autocast, no tracing or compiling), no TorchDispatchMode is active, no
    module involved carries hooks and every token BatchNorm still holds a plain ``nn.BatchNorm1d``.
    """
    if not isinstance(x, torch.Tensor) or not _custom_autograd_allowed(x):
        return False
    return not kernels.dispatch_mode_active() and _plain_structure(modules)


def compiled_fusable(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether, while ``torch.compile`` traces, a fused custom operator (:func:`binary_ffn_operator`) may
    stand in for ``modules``: training mode, :func:`~timm_binaryvit.dispatch.custom_operator_allowed`
    and the conditions of :func:`plain_modules` on hooks and BatchNorms (the compiler cannot trace the
    query for a TorchDispatchMode)."""
    return all(m.training for m in modules) and custom_operator_allowed(x) and _plain_structure(modules)


def _plain_structure(modules) -> bool:
    # no hooks on any module involved, every token BatchNorm a plain nn.BatchNorm1d
    if _global_hooks():
        return False
    for module in modules:
        for m in module.modules():
            if _has_hooks(m):
                return False
            if isinstance(m, TokenBatchNorm) and type(m.bn) is not nn.BatchNorm1d:
                return False
    return True


class FusedPath(nn.Module):
    """Base of the modules with a fused autograd path (attention, FFN, pooling branches, block).

    ``forward`` asks :meth:`use_fused` and runs either ``forward_fused`` (custom autograd functions over
    the whole module) or ``forward_modules`` (each submodule in turn, which TorchScript compiles). The
    fused path runs only when every submodule is of the type it fuses (:meth:`fused_structure`; a
    subclass or replacement module falls back to the modules path) and :func:`fusable` allows it.
    """

    def use_fused(self, x: torch.Tensor) -> bool:
        if torch.jit.is_scripting():
            return False
        return self._fused_allowed(x)

    @torch.jit.unused
    def _fused_allowed(self, x: torch.Tensor) -> bool:
        return self.fused_structure() and fusable(x, self)

    @torch.jit.unused
    def fused_structure(self) -> bool:
        """Whether the submodules are exactly those the fused path computes."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Fused functions


class _BinaryAttentionProduct(torch.autograd.Function):
    # Heads are laid out (B, h, N, d) contiguously once; no product takes a transposed
    # attention-sized operand (that would cost a copy of it).
    @staticmethod
    def forward(ctx, q, k, v, scale, num_heads: int):
        B, N, C = q.shape
        Nk = k.shape[1]
        d = C // num_heads
        qh = _heads(q, num_heads)
        kh = _heads(k, num_heads)
        vh = _heads(v, num_heads)
        # Q K^T / sqrt(d) as (Q / sqrt(d)) K^T: the division on the (B, h, N, d) side.
        attn = torch.matmul(torch.div(qh, math.sqrt(d)), kh.transpose(-2, -1))
        p = attn.softmax(dim=-1)
        # P_b / s = clamp(round(p / s), 0, 1) is 1 exactly where p / s > 0.5 (round half to even).
        binary = torch.div(p, scale, out=attn).gt_(0.5)
        out = torch.matmul(binary, vh).mul_(scale)
        ctx.save_for_backward(p, qh.to(torch.int8), kh.to(torch.int8), vh.to(torch.int8), scale)
        ctx.num_heads = num_heads
        return out.transpose(1, 2).reshape(B, N, C)

    @staticmethod
    def backward(ctx, grad):
        p, qh, kh, vh, scale = ctx.saved_tensors
        B, h, N, d = qh.shape
        Nk = kh.shape[2]
        dtype = p.dtype
        need = ctx.needs_input_grad
        gh = _heads(grad, h)
        q = torch.div(p, scale)
        binary = torch.gt(q, 0.5, out=torch.empty_like(q))  # P_b / s = clamp(round(q), 0, 1)
        grad_v = None
        if need[2]:
            # (P_b^T g)^T = g^T P_b
            grad_v = torch.matmul(gh.transpose(-2, -1), binary).mul_(scale)  # (B, h, d, Nk)
            grad_v = grad_v.permute(0, 3, 1, 2).reshape(B, Nk, h * d)
        grad_binary = torch.matmul(gh, vh.to(dtype).transpose(-2, -1))  # gradient w.r.t. P_b
        # The elastic binariser's pseudo-gradient, reusing the attention-sized buffers.
        grad_p, grad_scale = elastic_backward(grad_binary, p, scale, need[3], binary=binary, q=q, out=binary)
        del grad_binary
        grad_attn = torch._softmax_backward_data(grad_p, p, -1, dtype, grad_input=q)
        del grad_p
        grad_q = grad_k = None
        # The gradient w.r.t. Q K^T, divided by sqrt(d) on the (B, h, N, d) side.
        if need[0]:
            grad_q = torch.matmul(grad_attn, kh.to(dtype).div_(math.sqrt(d))).transpose(1, 2).reshape(B, N, h * d)
        if need[1]:
            # (S^T Q)^T = Q^T S
            grad_k = torch.matmul(qh.to(dtype).div_(math.sqrt(d)).transpose(-2, -1), grad_attn)  # (B, h, d, Nk)
            grad_k = grad_k.permute(0, 3, 1, 2).reshape(B, Nk, h * d)
        return grad_q, grad_k, grad_v, grad_scale, None


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    # (B, N, C) -> contiguous (B, h, N, d)
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2).contiguous()


def binary_attention_product(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head ``P_b V`` with ``P = softmax(Q K^T / sqrt(d))`` binarised by BiT's elastic binariser.

    ``q`` ``(B, N, C)``, ``k`` and ``v`` ``(B, N_kv, C)`` are the signs (``-1, 0, 1``) after the
    attention's second shift; ``scale`` is the binariser's scalar ``s``. Forward: exactly the
    module-by-module computation; backward: exact through the softmax, BiT's elastic
    pseudo-gradient for ``P`` and ``s`` (see :func:`~timm_binaryvit.layers.elastic_binarize`).
    Keeps ``P`` and 1-byte copies of the signs for the backward pass.
    """
    return _BinaryAttentionProduct.apply(q, k, v, scale, num_heads)


def _sign_gram(signs: torch.Tensor, signs_int8: torch.Tensor, int8: bool):
    # Gram matrix S^T S and column sums of a (M, C) matrix of signs, exactly, in float64.
    if int8:
        gram = torch._int_mm(signs_int8.t().contiguous(), signs_int8).double()
    else:
        s = signs.double()
        gram = s.t() @ s
    return gram, signs.sum(0, dtype=torch.float64)


def _ffn_plan(rows: int, hidden: int, device: torch.device, mlp: 'BinaryMlp') -> Tuple[bool, int]:
    # (whole, rows per chunk): small problems (and any device but the CPU) run as one chunk; the sizes
    # are BinaryMlp's unchunked_elements and chunk_elements.
    if device.type != 'cpu' or rows * hidden <= mlp.unchunked_elements:
        return True, rows
    return False, max(16, min(rows, mlp.chunk_elements // hidden))


class _BinaryFFN(torch.autograd.Function):
    # See binary_ffn. Notation: w (M, C) input rows; s1 = sign(w + b1); fc1 weight a1 * S1 (H, C),
    # H = E * C; y1 = s1 @ (a1 * S1)^T; z = BN1(y1) + repeat(w) - g1 (pre-PReLU); t = PReLU(z) + o1;
    # s2 = sign(t + b2); y2 = s2 @ (a2 * S2)^T; v2 = BN2(y2) + pool(t) - g2; out = PReLU(v2) + o2.
    #
    # Small problems ("whole") run as one chunk with y1 in memory and BN1 done as usual. Larger
    # ones run in chunks of rows without ever holding y1, z or t whole: BN1's batch statistics come
    # from the Gram matrix G = s1^T s1 (y1 / a1 is the integer matrix s1 S1^T, so its column sums
    # are S1 colsum(s1) and its column sums of squares diag(S1 G S1^T), exactly), and the backward
    # pass accumulates gz^T s1 and gz (D a1 S1) chunk by chunk and applies BN1's mean corrections
    # afterwards through small (C x C, H x C) products.
    @staticmethod
    def forward(ctx, w, shift1, weight1, bn1_weight, bn1_bias, act1_in, act1_slope, act1_out,
                shift2, weight2, bn2_weight, bn2_bias, act2_in, act2_slope, act2_out, alpha, beta, residual, mlp):
        inputs = (w, shift1, weight1, bn1_weight, bn1_bias, act1_in, act1_slope, act1_out,
                  shift2, weight2, bn2_weight, bn2_bias, act2_in, act2_slope, act2_out, alpha, beta, residual)
        out, computed, ctx.config = _ffn_forward(inputs, _FFNSetting.of(mlp))
        ctx.save_for_backward(*_ffn_kept_inputs(inputs), *computed)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        kept = len(saved) - len(_FFN_COMPUTED)
        grads = _ffn_backward(grad, saved[:kept], saved[kept:], ctx.config, ctx.needs_input_grad)
        return (*grads, None)


class _NormState(NamedTuple):
    # What the fused FFN reads of a BatchNorm1d (the attribute names are nn.BatchNorm1d's), so that the
    # custom operator below can run it from plain tensors and numbers.
    training: bool
    track_running_stats: bool
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]
    momentum: Optional[float]
    eps: float


class _FFNSetting(NamedTuple):
    # The non-trainable part of a BinaryMlp: expansion, its two BatchNorms (modules or _NormState) and
    # its chunk sizes.
    expansion: int
    bn1: object
    bn2: object
    unchunked_elements: int
    chunk_elements: int

    @staticmethod
    def of(mlp: 'BinaryMlp') -> '_FFNSetting':
        return _FFNSetting(mlp.expansion, mlp.fc1.norm.bn, mlp.fc2.norm.bn, mlp.unchunked_elements, mlp.chunk_elements)


# The tensors _ffn_forward computes for the backward pass, in order.
_FFN_COMPUTED = ('s1_int8', 'y2', 'v2', 'mean1', 'invstd1', 'signs_gram', 'colsum', 'mean2', 'invstd2')


def _ffn_kept_inputs(inputs):
    # The inputs the backward pass reads: all but beta and the residual (keeping the residual would keep
    # the block's input alive for nothing).
    return inputs[:16] + (None, None)


def _ffn_forward(inputs, setting: _FFNSetting):
    """The fused FFN's forward pass: ``(out, computed, config)``, ``computed`` the tensors named by
    ``_FFN_COMPUTED`` (None where unused) and ``config`` the numbers the backward pass needs."""
    (w, shift1, weight1, bn1_weight, bn1_bias, act1_in, act1_slope, act1_out,
     shift2, weight2, bn2_weight, bn2_bias, act2_in, act2_slope, act2_out, alpha, beta, residual) = inputs
    E, bn1, bn2 = setting.expansion, setting.bn1, setting.bn2
    w2 = _rows(w)
    M, C = w2.shape
    H = E * C
    dtype = w2.dtype
    int8 = sign_mm_kind(w2, M, C, H) == 'int8'
    whole, rows = _ffn_plan(M, H, w.device, setting)

    s1 = (w2 + shift1).sign_()
    s1_int8 = s1.to(torch.int8)
    signs1, a1 = centred_sign_factors(weight1)
    signs2, a2 = centred_sign_factors(weight2)
    mm_signs1 = signs1.to(torch.int8) if int8 else signs1
    mm_signs2 = signs2.to(torch.int8) if int8 else signs2
    mm_s1 = s1_int8 if int8 else s1

    batch1 = batchnorm_uses_batch_stats(bn1)
    if batch1:
        _check_batch_size(M, tuple(w.shape[:-1]) + (H,))
    signs_gram = colsum = mean1 = invstd1 = None
    if batch1 and not whole:
        gram, colsum = _sign_gram(s1, s1_int8, int8)
        # Integers below 2 ** 24 are exact in float32 products: S1 G is at most C * M.
        exact = torch.float64 if C * M >= 1 << 24 or dtype == torch.float64 else dtype
        signs_gram = (signs1.to(exact) @ gram.to(exact)).double()
        a1_d = a1.double()
        sums = signs1.double() @ colsum
        squares = (signs_gram * signs1).sum(1, dtype=torch.float64)
        mean1_d = a1_d * (sums / M)
        var1_d = a1_d * a1_d * ((squares * M - sums * sums) / (M * M))
        mean1 = mean1_d.to(dtype)
        invstd1 = (var1_d + bn1.eps).sqrt_().reciprocal_().to(dtype)
        running_mean, running_var, factor = _running_stats_target(bn1)
        if running_mean is not None:
            running_mean.mul_(1 - factor).add_((factor * mean1_d).to(running_mean.dtype))
            running_var.mul_(1 - factor).add_((factor * M / (M - 1) * var1_d).to(running_var.dtype))
        signs_gram, colsum = signs_gram.to(dtype), colsum.to(dtype)
    elif not batch1:
        mean1 = bn1.running_mean
        invstd1 = torch.sqrt(bn1.running_var + bn1.eps).reciprocal_()
    threshold2 = act1_out + shift2
    pooled_out1 = act1_out.view(C, E).mean(-1)

    y2 = torch.empty(M, C, dtype=torch.int32 if int8 else dtype, device=w.device)
    pooled = torch.empty(M, C, dtype=dtype, device=w.device)
    bias1 = None
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        m = r1 - r0
        prod = torch._int_mm(mm_s1[r0:r1], mm_signs1.t()) if int8 else torch.mm(mm_s1[r0:r1], mm_signs1.t())
        if mean1 is None:  # whole, batch statistics: BN1 as usual, on y1 = prod * a1
            prod = torch.mul(prod, a1) if int8 else prod.mul_(a1)
            z, mean1, invstd1, _ = batchnorm_forward(bn1, prod, bn1_weight, _shifted_bias(bn1_bias, act1_in))
        else:
            if bias1 is None:
                gain1 = invstd1 if bn1_weight is None else invstd1 * bn1_weight
                bias1 = _shifted_bias(bn1_bias, act1_in) - mean1 * gain1
                coef1 = a1 * gain1
            z = torch.addcmul(bias1, prod, coef1)
        del prod
        z.view(m, E, C).add_(w2[r0:r1].unsqueeze(1))
        t = F.prelu(z, act1_slope)
        del z
        torch.sum(t.view(m, C, E), -1, out=pooled[r0:r1])
        s2 = t.add_(threshold2).sign_()
        if int8:
            torch._int_mm(s2.to(torch.int8), mm_signs2.t(), out=y2[r0:r1])
        else:
            torch.mm(s2, mm_signs2.t(), out=y2[r0:r1])
        del t, s2
    y2 = torch.mul(y2, a2) if int8 else y2.mul_(a2)

    v2, mean2, invstd2, batch2 = batchnorm_forward(
        bn2, y2, bn2_weight, _shifted_bias(bn2_bias, act2_in) + pooled_out1)
    v2.add_(pooled, alpha=1. / E)
    del pooled
    out = F.prelu(v2, act2_slope).add_(act2_out)

    computed = (s1_int8, y2, v2, mean1, invstd1, signs_gram, colsum, mean2, invstd2)
    config = (E, int8, batch1, batch2, bn1.eps, residual is not None, whole, rows)
    if alpha is not None:
        out.mul_(alpha).add_(beta)
    if residual is not None:
        out.add_(_rows(residual))
    return out.view(w.shape), computed, config


def _ffn_backward(grad, inputs, computed, config, need):
    """The fused FFN's backward pass from what :func:`_ffn_forward` kept: the gradients of ``inputs``
    (None where ``need`` says so)."""
    (w, shift1, weight1, bn1_weight, bn1_bias, act1_in, act1_slope, act1_out,
     shift2, weight2, bn2_weight, bn2_bias, act2_in, act2_slope, act2_out, alpha, _, _) = inputs
    s1_int8, y2, v2, mean1, invstd1, signs_gram, colsum, mean2, invstd2 = computed
    E, int8, batch1, batch2, eps1, has_residual, whole, rows = config
    bn1_bias_in = _shifted_bias(bn1_bias, act1_in)
    w2 = _rows(w)
    M, C = w2.shape
    H = E * C
    dtype = w2.dtype
    device = w.device
    grad = grad_out = _rows(grad)

    # Output affine, RPReLU2 and BN2.
    grad_alpha = grad_beta = None
    if alpha is not None:
        if need[15]:
            grad_alpha = (grad * F.prelu(v2, act2_slope).add_(act2_out)).sum(0)
        grad_beta = grad.sum(0) if need[16] else None
        grad = grad * alpha
    grad_act2_out = grad.sum(0) if need[14] else None
    grad_v2, grad_slope2, sum_v2 = _prelu_backward(grad, v2, act2_slope, need[13], need_sum=True)
    del grad
    grad_y2, grad_bn2_weight, grad_bn2_bias = batchnorm_backward(
        grad_v2, y2, mean2, invstd2, bn2_weight, batch2, need[10], sum_v2)

    # Recompute the hidden activations chunk by chunk; back through fc2, RPReLU1 and the shortcuts.
    signs1, a1 = centred_sign_factors(weight1)
    signs2, a2 = centred_sign_factors(weight2)
    mm_signs1 = signs1.to(torch.int8) if int8 else signs1
    gain1 = invstd1 if bn1_weight is None else invstd1 * bn1_weight
    y1_whole = whole and batch1  # the whole-mode forward normalised y1 = prod * a1 with BatchNorm itself
    coef1 = a1 * gain1
    bias1 = bn1_bias_in - mean1 * gain1
    threshold2 = act1_out + shift2
    weight2_x2 = signs2 * (2 * a2).unsqueeze(1)  # 2 * binary fc2 weight (ApproxSign's factor 2)
    zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
    grad_weight2_binary = zeros(C, H)
    grad_shift2, grad_slope1, sum_z = zeros(H), zeros(H), zeros(H)
    grad_repeat = torch.empty(M, C, dtype=dtype, device=device)
    if not whole:
        weight1_bn = signs1 * (a1 * gain1).unsqueeze(1)  # BN1 gain times binary fc1 weight
        grad_s1_signs = zeros(H, C)  # sum over rows of gz^T s1
        grad_s1 = torch.empty(M, C, dtype=dtype, device=device)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        m = r1 - r0
        s1c = s1_int8[r0:r1]
        s1f = s1c.to(dtype)
        prod = torch._int_mm(s1c, mm_signs1.t()) if int8 else torch.mm(s1f, mm_signs1.t())
        if y1_whole:
            y1 = torch.mul(prod, a1) if int8 else prod.mul_(a1)
            # The same computation as the forward pass (batch statistics recomputed, nothing updated).
            z = torch.native_batch_norm(y1, bn1_weight, bn1_bias_in, None, None, True, 0., eps1)[0]
        else:
            z = torch.addcmul(bias1, prod, coef1)
        del prod
        z.view(m, E, C).add_(w2[r0:r1].unsqueeze(1))
        u = F.prelu(z, act1_slope).add_(threshold2)  # t + b2
        gy2 = grad_y2[r0:r1]
        grad_weight2_binary.addmm_(gy2.t(), torch.sign(u))
        gt = approx_sign_backward_(torch.mm(gy2, weight2_x2), u, doubled=True)  # through sign(t + b2)
        del u
        grad_shift2.add_(gt.sum(0))
        gt.view(m, C, E).add_(grad_v2[r0:r1].unsqueeze(-1), alpha=1. / E)  # through pool(t)
        gz, gslope, gz_sum = _prelu_backward(gt, z, act1_slope, need[6], need_sum=True)
        del gt, z
        if gslope is not None:
            grad_slope1.add_(gslope)
        sum_z.add_(gz_sum)
        torch.sum(gz.view(m, E, C), 1, out=grad_repeat[r0:r1])
        if not whole:
            grad_s1_signs.addmm_(gz.t(), s1f)
            torch.mm(gz, weight1_bn, out=grad_s1[r0:r1])
            del gz

    # t = PReLU(z) + o1 feeds sign(t + b2) and pool(t): sum over rows of both gradients.
    grad_act1_out = grad_shift2 + (sum_v2 / E).repeat_interleave(E)
    weight1_binary = signs1 * a1.unsqueeze(1)
    if whole:
        if not y1_whole:
            y1 = torch.mm(s1_int8.to(dtype), weight1_binary.t())
        grad_y1, grad_bn1_weight, _ = batchnorm_backward(
            gz, y1, mean1, invstd1, bn1_weight, batch1, need[3], sum_z)
        del gz, y1
        grad_s1 = grad_y1 @ weight1_binary
        grad_weight1_binary = grad_y1.t() @ s1_int8.to(dtype) if need[2] else None
        del grad_y1
    else:
        # BN1 backward from the accumulated sums (gz itself is gone): with D = gamma * invstd,
        # grad_y1 = gz D - y1 diag(e) + 1 k^T, e = D * invstd * sum(gz * xhat) / M, k = mean * e - D * sum(gz) / M.
        grad_xhat = invstd1 * (a1 * (signs1 * grad_s1_signs).sum(1) - mean1 * sum_z)  # sum(gz * xhat)
        grad_bn1_weight = grad_xhat if need[3] and bn1_weight is not None else None
        grad_weight1_binary = gain1.unsqueeze(1) * grad_s1_signs
        if batch1:
            e = gain1 * invstd1 * grad_xhat / M
            k = mean1 * e - gain1 * sum_z / M
            # y1^T s1 = W1 G = a1 * (S1 G), saved by the forward pass.
            grad_weight1_binary.sub_((e * a1).unsqueeze(1) * signs_gram).add_(k.unsqueeze(1) * colsum)
            kmat = weight1_binary.t() @ (e.unsqueeze(1) * weight1_binary)
            grad_s1.addmm_(s1_int8.to(dtype), kmat, alpha=-1).add_(weight1_binary.t() @ k)
    # Through sign(w + b1) (ApproxSign) and the repeat shortcut.
    approx_sign_backward_(grad_s1.mul_(2), w2 + shift1, doubled=True)
    grad_shift1 = grad_s1.sum(0) if need[1] else None
    grad_w = grad_s1.add_(grad_repeat).view(w.shape)
    return (grad_w, grad_shift1,
            centred_sign_backward(weight1, grad_weight1_binary) if need[2] else None,
            grad_bn1_weight, sum_z if need[4] else None, -sum_z if need[5] else None,
            grad_slope1 if need[6] else None, grad_act1_out if need[7] else None,
            grad_shift2 if need[8] else None,
            centred_sign_backward(weight2, grad_weight2_binary) if need[9] else None,
            grad_bn2_weight, grad_bn2_bias if need[11] else None, -sum_v2 if need[12] else None,
            grad_slope2, grad_act2_out, grad_alpha, grad_beta,
            grad_out.view(w.shape) if has_residual and need[17] else None)


def binary_ffn(w: torch.Tensor, mlp: 'BinaryMlp', affine: Optional[Affine] = None,
               residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mlp(w)`` (and ``affine`` after it) as one autograd function; see :class:`~timm_binaryvit.blocks.BinaryMlp`.

    Forward: the same values as the module-by-module path, BatchNorm running statistics updated
    the same way; backward: the same gradients (exact BatchNorm, RPReLU, affine; ApproxSign and
    the clipped straight-through weight gradient of the binary layers). The ``E * C``-wide hidden
    activations are never stored: the tokens are processed in chunks of about
    ``BinaryMlp.chunk_elements`` hidden values, the first BatchNorm's batch statistics come
    exactly from the Gram matrix of the input signs, and the backward pass recomputes each
    chunk's hidden activations (one more int8 product) and finishes BN1 from accumulated sums.
    Keeps the input, its signs (1 byte each) and two ``C``-wide tensors for the backward pass.
    With ``residual``, returns ``residual`` plus all that.
    """
    l1, n1, a1 = mlp.fc1.linear, mlp.fc1.norm.bn, mlp.act1
    l2, n2, a2 = mlp.fc2.linear, mlp.fc2.norm.bn, mlp.act2
    return _BinaryFFN.apply(
        w, l1.shift, l1.weight, n1.weight, n1.bias, a1.shift_in, a1.slope, a1.shift_out,
        l2.shift, l2.weight, n2.weight, n2.bias, a2.shift_in, a2.slope, a2.shift_out,
        affine.alpha if affine is not None else None, affine.beta if affine is not None else None, residual, mlp)


# ---------------------------------------------------------------------------------------------
# The fused FFN as a custom operator, for torch.compile
#
# The compiler cannot trace _BinaryFFN (its chunk loop depends on the token count, its products on the
# kernel chosen for this machine) and would otherwise compile the module path, which keeps every
# E * C-wide hidden activation for the backward pass. As the operators timm_binaryvit::binary_ffn and
# binary_ffn_backward the compiled graph runs the very same forward and backward passes. Operators
# with an autograd formula must not mutate their inputs, so the forward operator returns the updated
# BatchNorm running statistics and binary_ffn_operator copies them back. The operators cover the FFN
# alone (BinaryMlp.forward); the affine and the residual after it stay in the compiled graph.

_FFN_OP_INPUTS = 15  # the tensors of _ffn_forward's inputs up to act2_out (alpha, beta, residual: None)


def _fresh(tensors, inputs):
    # Operator outputs must neither alias an input nor each other: copy any tensor whose memory is taken.
    taken = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    fresh = []
    for t in tensors:
        if t.numel():
            if t.untyped_storage().data_ptr() in taken:
                t = t.clone()
            taken.add(t.untyped_storage().data_ptr())
        fresh.append(t)
    return fresh


def _stat_copy(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t.clone()


@torch.library.custom_op('timm_binaryvit::binary_ffn', mutates_args=())
def _binary_ffn_op(
        w: torch.Tensor, shift1: torch.Tensor, weight1: torch.Tensor, bn1_weight: Optional[torch.Tensor],
        bn1_bias: Optional[torch.Tensor], act1_in: torch.Tensor, act1_slope: torch.Tensor, act1_out: torch.Tensor,
        shift2: torch.Tensor, weight2: torch.Tensor, bn2_weight: Optional[torch.Tensor],
        bn2_bias: Optional[torch.Tensor], act2_in: torch.Tensor, act2_slope: torch.Tensor, act2_out: torch.Tensor,
        running_mean1: Optional[torch.Tensor], running_var1: Optional[torch.Tensor],
        batches_tracked1: Optional[torch.Tensor], running_mean2: Optional[torch.Tensor],
        running_var2: Optional[torch.Tensor], batches_tracked2: Optional[torch.Tensor],
        modes: List[bool], momentum1: Optional[float], momentum2: Optional[float], eps: List[float],
        sizes: List[int]) -> List[torch.Tensor]:
    # modes: (training, track_running_stats) of both BatchNorms; sizes: expansion, unchunked and chunk
    # elements. Returns out, the _FFN_COMPUTED tensors, the plan (int8 kernel, whole, rows per chunk,
    # batch statistics in BN1, in BN2) and the six running statistics after the step (empty where absent).
    inputs = (w, shift1, weight1, bn1_weight, bn1_bias, act1_in, act1_slope, act1_out,
              shift2, weight2, bn2_weight, bn2_bias, act2_in, act2_slope, act2_out, None, None, None)
    stats = [_stat_copy(t, w) for t in (running_mean1, running_var1, batches_tracked1,
                                         running_mean2, running_var2, batches_tracked2)]
    norms = [_NormState(modes[2 * i], modes[2 * i + 1], *[t if t.numel() else None for t in stats[3 * i:3 * i + 3]],
                        momentum, eps[i]) for i, momentum in enumerate((momentum1, momentum2))]
    out, computed, config = _ffn_forward(inputs, _FFNSetting(sizes[0], norms[0], norms[1], sizes[1], sizes[2]))
    M, C = _rows(w).shape
    H = sizes[0] * C
    placeholders = (None, None, None, w.new_empty(H), w.new_empty(H), w.new_empty(H, C), w.new_empty(C),
                    w.new_empty(C), w.new_empty(C))
    computed = [t if t is not None else placeholders[i] for i, t in enumerate(computed)]
    _, int8, batch1, batch2, _, _, whole, rows = config
    plan = torch.tensor([int(int8), int(whole), rows, int(batch1), int(batch2)], dtype=torch.int64)
    return _fresh([out] + computed + [plan] + stats, inputs)


@_binary_ffn_op.register_fake
def _(w, shift1, weight1, bn1_weight, bn1_bias, act1_in, act1_slope, act1_out, shift2, weight2, bn2_weight, bn2_bias,
      act2_in, act2_slope, act2_out, running_mean1, running_var1, batches_tracked1, running_mean2, running_var2,
      batches_tracked2, modes, momentum1, momentum2, eps, sizes):
    C = w.shape[-1]
    M = w.numel() // C
    H = sizes[0] * C
    stats = [w.new_empty(0) if t is None else torch.empty_like(t) for t in (
        running_mean1, running_var1, batches_tracked1, running_mean2, running_var2, batches_tracked2)]
    return [torch.empty_like(w, memory_format=torch.contiguous_format), w.new_empty(M, C, dtype=torch.int8),
            w.new_empty(M, C), w.new_empty(M, C), w.new_empty(H), w.new_empty(H), w.new_empty(H, C), w.new_empty(C),
            w.new_empty(C), w.new_empty(C), w.new_empty(5, dtype=torch.int64, device='cpu')] + stats


@torch.library.custom_op('timm_binaryvit::binary_ffn_backward', mutates_args=())
def _binary_ffn_backward_op(
        grad: torch.Tensor, w: torch.Tensor, shift1: torch.Tensor, weight1: torch.Tensor,
        bn1_weight: Optional[torch.Tensor], bn1_bias: Optional[torch.Tensor], act1_in: torch.Tensor,
        act1_slope: torch.Tensor, act1_out: torch.Tensor, shift2: torch.Tensor, weight2: torch.Tensor,
        bn2_weight: Optional[torch.Tensor], bn2_bias: Optional[torch.Tensor], act2_in: torch.Tensor,
        act2_slope: torch.Tensor, act2_out: torch.Tensor,
        s1_int8: torch.Tensor, y2: torch.Tensor, v2: torch.Tensor, mean1: torch.Tensor, invstd1: torch.Tensor,
        signs_gram: torch.Tensor, colsum: torch.Tensor, mean2: torch.Tensor, invstd2: torch.Tensor,
        plan: torch.Tensor, eps1: float, need: List[bool]) -> List[torch.Tensor]:
    # Returns the gradients of the forward operator's first 15 inputs, empty where need says no.
    int8, whole, rows, batch1, batch2 = plan.tolist()
    inputs = (w, shift1, weight1, bn1_weight, bn1_bias, act1_in, act1_slope, act1_out,
              shift2, weight2, bn2_weight, bn2_bias, act2_in, act2_slope, act2_out, None, None, None)
    computed = (s1_int8, y2, v2, mean1, invstd1, signs_gram, colsum, mean2, invstd2)
    expansion = act1_in.shape[0] // w.shape[-1]
    config = (expansion, bool(int8), bool(batch1), bool(batch2), eps1, False, bool(whole), rows)
    grads = _ffn_backward(grad, inputs, computed, config, need + [False] * 3)
    grads = [(g if g is not None else w.new_zeros(shape)) if wanted else w.new_empty(0)
             for g, shape, wanted in zip(grads, _ffn_op_input_shapes(w, act1_in.shape[0]), need)]
    return _fresh(grads, inputs + computed + (grad,))


def _ffn_op_input_shapes(w: torch.Tensor, hidden: int):
    # The shapes of the forward operator's first 15 inputs.
    C = w.shape[-1]
    return (w.shape, (C,), (hidden, C), (hidden,), (hidden,), (hidden,), (hidden,), (hidden,),
            (hidden,), (C, hidden), (C,), (C,), (C,), (C,), (C,))


@_binary_ffn_backward_op.register_fake
def _(grad, w, shift1, weight1, bn1_weight, bn1_bias, act1_in, act1_slope, act1_out, shift2, weight2, bn2_weight,
      bn2_bias, act2_in, act2_slope, act2_out, s1_int8, y2, v2, mean1, invstd1, signs_gram, colsum, mean2,
      invstd2, plan, eps1, need):
    shapes = _ffn_op_input_shapes(w, act1_in.shape[0])
    return [w.new_empty(shape) if wanted else w.new_empty(0) for shape, wanted in zip(shapes, need)]


def _binary_ffn_op_setup(ctx, inputs, output):
    # output: out, the nine _FFN_COMPUTED tensors, the plan, the running statistics
    ctx.save_for_backward(*inputs[:_FFN_OP_INPUTS], *output[1:11])
    ctx.eps1 = inputs[-2][0]  # eps: [BN1's, BN2's]
    ctx.mark_non_differentiable(*output[1:])


def _binary_ffn_op_backward(ctx, grads):
    # the operator returns one list of tensors, so its gradients come as one list: only out's is used
    need = [bool(n) for n in ctx.needs_input_grad[:_FFN_OP_INPUTS]]
    grads = _binary_ffn_backward_op(grads[0], *ctx.saved_tensors, ctx.eps1, need)
    # none for the running statistics and the five non-tensor arguments
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 11


_binary_ffn_op.register_autograd(_binary_ffn_op_backward, setup_context=_binary_ffn_op_setup)


def binary_ffn_operator(w: torch.Tensor, mlp: 'BinaryMlp') -> torch.Tensor:
    """``mlp(w)`` (:func:`binary_ffn` without affine and residual) as the custom operator
    ``timm_binaryvit::binary_ffn``, which ``torch.compile`` keeps whole: the same forward and backward
    passes, the running statistics updated the same way."""
    l1, n1, a1 = mlp.fc1.linear, mlp.fc1.norm.bn, mlp.act1
    l2, n2, a2 = mlp.fc2.linear, mlp.fc2.norm.bn, mlp.act2
    frozen = _stats_are_frozen()
    outputs = _binary_ffn_op(
        w, l1.shift, l1.weight, n1.weight, n1.bias, a1.shift_in, a1.slope, a1.shift_out,
        l2.shift, l2.weight, n2.weight, n2.bias, a2.shift_in, a2.slope, a2.shift_out,
        n1.running_mean, n1.running_var, n1.num_batches_tracked, n2.running_mean, n2.running_var,
        n2.num_batches_tracked, [n1.training, n1.track_running_stats and not frozen,
                                 n2.training, n2.track_running_stats and not frozen],
        n1.momentum, n2.momentum, [n1.eps, n2.eps], [mlp.expansion, mlp.unchunked_elements, mlp.chunk_elements])
    with torch.no_grad():
        for bn, new in ((n1, outputs[11:14]), (n2, outputs[14:17])):
            if bn.training and bn.track_running_stats and not frozen:
                for stat, value in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), new):
                    if stat is not None:
                        stat.copy_(value)
    return outputs[0]


_POOL_KERNELS = (((3, 1), (1, 0)), ((1, 3), (0, 1)), ((5, 1), (2, 0)), ((1, 5), (0, 2)))


def _pool_tokens(grid: torch.Tensor, kernel, padding) -> torch.Tensor:
    return grid_to_tokens(F.avg_pool2d(grid, kernel, 1, padding))


def _pool_branches_kernel(a_h3, a_w3, a_h5, a_w5) -> torch.Tensor:
    # sum_k alpha_k * avgpool_k as one depthwise 5x5 kernel (C, 1, 5, 5): a cross, symmetric in
    # both directions, so it is its own adjoint (flipped) kernel as well.
    kernel = a_h3.new_zeros(a_h3.shape[0], 5, 5)
    kernel[:, 1:4, 2] += (a_h3 / 3).unsqueeze(1)
    kernel[:, 2, 1:4] += (a_w3 / 3).unsqueeze(1)
    kernel[:, :, 2] += (a_h5 / 5).unsqueeze(1)
    kernel[:, 2, :] += (a_w5 / 5).unsqueeze(1)
    return kernel.unsqueeze(1)


def _depthwise_tokens(x: torch.Tensor, kernel: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
    grid = tokens_to_grid(x, feat_size)
    return grid_to_tokens(F.conv2d(grid, kernel, padding=2, groups=kernel.shape[0]))


class _PoolBranches(torch.autograd.Function):
    # residual + sum_k (alpha_k * avgpool_k(x) + beta_k). The four stride-1 average pools with
    # (counted) zero padding are one depthwise convolution with a cross-shaped 5x5 kernel.
    @staticmethod
    def forward(ctx, residual, x, feat_size, a_h3, b_h3, a_w3, b_w3, a_h5, b_h5, a_w5, b_w5):
        alphas = (a_h3, a_w3, a_h5, a_w5)
        out = _depthwise_tokens(x, _pool_branches_kernel(*alphas), feat_size)
        if not out.is_contiguous():
            out = out.contiguous()
        if residual is not None:
            out.add_(residual)
        out.add_(b_h3 + b_w3 + b_h5 + b_w5)
        ctx.save_for_backward(x, *alphas)
        ctx.feat_size = feat_size
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, *alphas = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_sum = _rows(grad).sum(0)
        grad_x = _depthwise_tokens(grad, _pool_branches_kernel(*alphas), ctx.feat_size) if need[1] else None
        grid = tokens_to_grid(x, ctx.feat_size)
        grad_params = []
        for i, (kernel, padding) in enumerate(_POOL_KERNELS):
            grad_alpha = None
            if need[3 + 2 * i]:
                grad_alpha = _rows(grad * _pool_tokens(grid, kernel, padding)).sum(0)
            grad_params += [grad_alpha, grad_sum]
        return (grad if ctx.has_residual and need[0] else None, grad_x, None, *grad_params)


def pool_branches(residual: Optional[torch.Tensor], x: torch.Tensor, feat_size: Tuple[int, int],
                  pool: 'MultiBranchPool') -> torch.Tensor:
    """``residual + pool(x, feat_size)`` (the four pooling branches with their affines) as one autograd
    function that keeps only ``x`` for the backward pass. ``residual`` may be None (then just the branches)."""
    return _PoolBranches.apply(
        residual, x, feat_size, pool.h3.alpha, pool.h3.beta, pool.w3.alpha, pool.w3.beta,
        pool.h5.alpha, pool.h5.beta, pool.w5.alpha, pool.w5.beta)
