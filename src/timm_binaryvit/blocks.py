"""The transformer layer shared by BinaryViT and the fully-binary DeiT-S (ARCHITECTURE.md section 2).

Tokens are ``(B, N, C)`` with ``N = H * W`` in row-major order (token ``n`` is row
``n // W``, column ``n % W``), as a convolution's ``flatten(2)`` gives.

Every module here has two forward paths that compute the same values. The module-by-module
path calls each submodule in turn; it is what TorchScript compiles, and it runs whenever a
submodule carries hooks, a token BatchNorm was converted to ``SyncBatchNorm``, under autocast,
FX or TorchScript tracing, a TorchDispatchMode, or for dtypes other than float32 / float64
(see :func:`timm_binaryvit.layers.fusable`). Otherwise a fused path runs a few custom autograd
functions instead, which keep far fewer tensors for the backward pass and make far fewer passes
over memory:

* every binary unit with its RPReLU (and the attention's second shift and sign, or the
  affine before a residual addition) is :func:`~timm_binaryvit.layers.binary_linear` followed by
  :func:`~timm_binaryvit.layers.norm_add_rprelu`, which keep only the unit's input and the
  linear output;
* the attention product (``sign(Q) sign(K)^T``, softmax, elastic binariser, ``P_b sign(V)``) is
  one function keeping the probabilities and 1-byte copies of the signs;
* the whole FFN is one function (:func:`binary_ffn`) that never holds its ``E * C``-wide hidden
  activations: it works through the tokens in chunks, takes the first BatchNorm's batch
  statistics exactly from the Gram matrix of the 1-bit input signs, and recomputes the hidden
  activations chunk by chunk in the backward pass, which it finishes in one sweep;
* the four pooling branches with their affines and the residual addition are one function
  (:func:`pool_branches`) that keeps only its input.
"""
import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, register_notrace_function

from .layers import (
    Affine, BinaryActivation, BinaryLinear, ElasticBinarizer, FusedPath, RPReLU, TokenBatchNorm,
    frozen_batchnorm_stats, binary_linear, norm_add_rprelu, batchnorm_forward, batchnorm_backward,
    batchnorm_uses_batch_stats, sign_mm_kind, sign_product)
from .layers import _check_batch_size, _prelu_backward, _rows, _running_stats_target, _shifted_bias
from .quantizers import approx_sign_backward_, centred_sign_backward, centred_sign_factors, elastic_backward

__all__ = [
    'BinaryUnit', 'BinaryAttention', 'BinaryMlp', 'MultiBranchPool', 'Block', 'PatchEmbed',
    'checkpoint_block', 'check_image_input', 'with_input_size_cfg', 'tokens_to_grid', 'grid_to_tokens',
    'binary_attention_product', 'binary_ffn', 'pool_branches',
]


def tokens_to_grid(x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, C)`` tokens -> ``(B, C, H, W)`` (a channels-last view for contiguous tokens)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], feat_size[0], feat_size[1])


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` tokens (a view for a channels-last grid)."""
    return x.flatten(2).transpose(1, 2)


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


def _ffn_plan(rows: int, hidden: int, device: torch.device) -> Tuple[bool, int]:
    # (whole, rows per chunk): small problems (and any device but the CPU) run as one chunk.
    if device.type != 'cpu' or rows * hidden <= BinaryMlp.unchunked_elements:
        return True, rows
    return False, max(16, min(rows, BinaryMlp.chunk_elements // hidden))


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
        E = mlp.expansion
        bn1, bn2 = mlp.fc1.norm.bn, mlp.fc2.norm.bn
        w2 = _rows(w)
        M, C = w2.shape
        H = E * C
        dtype = w2.dtype
        int8 = sign_mm_kind(w2, M, C, H) == 'int8'
        whole, rows = _ffn_plan(M, H, w.device)

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

        ctx.save_for_backward(
            w, s1_int8, y2, v2, weight1, weight2, _shifted_bias(bn1_bias, act1_in), act1_slope, act1_out,
            shift1, shift2, bn1_weight, bn2_weight, act2_slope, act2_out, alpha, mean1, invstd1, signs_gram,
            colsum, mean2, invstd2)
        ctx.config = (E, int8, batch1, batch2, bn1.eps, residual is not None)
        if alpha is not None:
            out.mul_(alpha).add_(beta)
        if residual is not None:
            out.add_(_rows(residual))
        return out.view(w.shape)

    @staticmethod
    def backward(ctx, grad):
        (w, s1_int8, y2, v2, weight1, weight2, bn1_bias_in, act1_slope, act1_out, shift1, shift2,
         bn1_weight, bn2_weight, act2_slope, act2_out, alpha, mean1, invstd1, signs_gram, colsum, mean2,
         invstd2) = ctx.saved_tensors
        E, int8, batch1, batch2, eps1, has_residual = ctx.config
        need = ctx.needs_input_grad
        w2 = _rows(w)
        M, C = w2.shape
        H = E * C
        dtype = w2.dtype
        device = w.device
        whole, rows = _ffn_plan(M, H, device)
        grad = grad_out = _rows(grad)

        # Output affine, RPReLU2 and BN2.
        grad_alpha = grad_beta = None
        if alpha is not None:
            if need[15]:
                grad_alpha = (grad * F.prelu(v2, act2_slope).add_(act2_out)).sum(0)
            grad_beta = grad.sum(0) if need[16] else None
            grad = grad * alpha
        grad_act2_out = grad.sum(0) if need[14] else None
        grad_v2, grad_slope2 = _prelu_backward(grad, v2, act2_slope, need[13])
        del grad
        sum_v2 = grad_v2.sum(0)
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
            gz, gslope = _prelu_backward(gt, z, act1_slope, need[6])
            del gt, z
            if gslope is not None:
                grad_slope1.add_(gslope)
            sum_z.add_(gz.sum(0))
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
                grad_out.view(w.shape) if has_residual and need[17] else None, None)


def binary_ffn(w: torch.Tensor, mlp: 'BinaryMlp', affine: Optional[Affine] = None,
               residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mlp(w)`` (and ``affine`` after it) as one autograd function; see :class:`BinaryMlp`.

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


# ---------------------------------------------------------------------------------------------
# Modules


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
        """Fused ``act(self(x, x))`` (then ``sign``, or ``affine``), see :func:`~timm_binaryvit.layers.norm_add_rprelu`.
        The caller checks :func:`~timm_binaryvit.layers.fusable`."""
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
            return self.forward_fused(x, feat_size, None, None)
        return self.forward_modules(x, feat_size)

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
    never as concatenated copies. The fused path is :func:`binary_ffn`.
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
        return self.forward_modules(x)

    @torch.jit.unused
    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path: the same values and gradients as :meth:`forward_modules`."""
        return binary_ffn(x, self)

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
    its own :class:`Affine` initialised to zero, summed. The fused path is :func:`pool_branches`.
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
        return self.forward_modules(x, feat_size)

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
            hint = (f' The model was built with img_size=({img_size[0]}, {img_size[1]}) and its position embeddings'
                    f' are fixed to it: resize the input to {img_size[0]}x{img_size[1]} (timm scripts:'
                    f' --input-size {in_chans} {img_size[0]} {img_size[1]}), or build the model with'
                    f' img_size=({x.shape[2]}, {x.shape[3]}) for this input.')
        raise ValueError(
            f'{model_name} expects input of shape (B, {expected[0]}, {expected[1]}, {expected[2]}),'
            f' got {tuple(x.shape)}.{hint}')


def with_input_size_cfg(kwargs: dict) -> dict:
    """``kwargs`` for timm's ``build_model_with_cfg`` with ``pretrained_cfg['input_size']`` following the
    ``img_size`` and ``in_chans`` the model is built with, so that timm's ``resolve_data_config`` (and so
    ``train.py``, ``validate.py``, ``inference.py``) feeds it images of that size by itself."""
    if kwargs.get('img_size') is None and kwargs.get('in_chans') is None:
        return kwargs
    img_size = kwargs.get('img_size') or 224
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    overlay.setdefault('input_size', (int(kwargs.get('in_chans') or 3), int(height), int(width)))
    return dict(kwargs, pretrained_cfg_overlay=overlay)
