"""Binary layers of BinaryViT (Le & Li, CVPR 2023 Workshops, arXiv 2306.16678), RPReLU, the affine,
and the token layout they work on.

Every layer states its forward rule and the pseudo-gradient it trains with, and names the paper it
comes from; the binarisers themselves (ApproxSign, the weight signs, the elastic binariser) are
written once, in :mod:`timm_binaryvit.quantizers`. Each layer runs one of two ways, chosen by
:func:`timm_binaryvit.dispatch.use_custom_autograd`: its custom autograd function here (which saves
only the real-valued input, recomputes signs and binarised weights in the backward pass and runs each
product of signs with the kernel :mod:`timm_binaryvit.kernels` chose), or the straight-through
composition of stock operators of :mod:`timm_binaryvit.quantizers`, with the same values and the same
pseudo-gradients.

The token BatchNorm is in :mod:`timm_binaryvit.batchnorm`; the fused paths of whole modules are in
:mod:`timm_binaryvit.fused`.
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module

from .dispatch import _outside_autocast, _sign_mm, sign_mm_kind, sign_product, use_custom_autograd
from .quantizers import (
    approx_sign, approx_sign_backward_, centred_sign_backward, centred_sign_factors, centred_sign_weight,
    elastic_backward, elastic_binarize_ste, elastic_binarize_value, one_pass_kernels, scaled_sign_backward,
    scaled_sign_factors, scaled_sign_weight)

__all__ = [
    'shifted_sign', 'binarize_linear_weight', 'binarize_conv_weight', 'binary_linear', 'binary_conv2d',
    'elastic_binarize', 'rprelu', 'BinaryActivation', 'BinaryLinear', 'BinaryConv2d', 'ElasticBinarizer',
    'RPReLU', 'Affine', 'tokens_to_grid', 'grid_to_tokens',
]


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Reduce a broadcast gradient to the shape of a per-channel parameter.
    return grad.reshape(-1, grad.shape[-1]).sum(0).reshape(shape) if len(shape) == 1 else grad.sum_to_size(shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    # (..., C) -> (M, C); a view for contiguous input.
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# Token layout: tokens are (B, N, C) with N = H * W in row-major order (token n is row n // W,
# column n % W), as a convolution's flatten(2) gives.


def tokens_to_grid(x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, C)`` tokens -> ``(B, C, H, W)`` (a channels-last view for contiguous tokens)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], feat_size[0], feat_size[1])


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` tokens (a view for a channels-last grid)."""
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Functions


class _ShiftedSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift):
        ctx.save_for_backward(x, shift)
        return torch.sign(x + shift)

    @staticmethod
    def backward(ctx, grad):
        x, shift = ctx.saved_tensors
        grad_x = approx_sign_backward_(grad, x + shift)
        return grad_x, _sum_to(grad_x, shift.shape) if ctx.needs_input_grad[1] else None


def shifted_sign(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``approx_sign(x + shift)`` in one step: ReActNet's RSign (Liu et al., ECCV 2020).

    Forward: ``sign(x + shift)``, ``shift`` broadcast over the last (channel) axis or any
    broadcastable shape.
    Backward: ApproxSign (Bi-Real Net) of ``x + shift`` for ``x``; the same summed over the broadcast
    axes for ``shift``. Only ``x`` is kept for the backward pass.
    """
    return _ShiftedSign.apply(x, shift)


def binarize_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """Effective weight of a binary linear layer: ``a * sign(W - mean_in(W))`` (forward value only)."""
    signs, scale = centred_sign_factors(weight)
    return scale.unsqueeze(1) * signs


def binarize_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """Effective weight of a binary convolution: ``a * sign(W)``, ``a = mean over (in, kh, kw) of |W|``."""
    signs, scale = scaled_sign_factors(weight)
    return scale.reshape(-1, 1, 1, 1) * signs


class _BinaryLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, weight):
        ctx.save_for_backward(x, shift, weight)
        signs = (_rows(x) + shift).sign_()
        kind = sign_mm_kind(x, signs.shape[0], weight.shape[1], weight.shape[0])
        sign_weight, scale = centred_sign_factors(weight)
        out = None
        if kind == 'int8':
            # The float signs are not needed any more: their memory takes the output if it fits.
            out = signs if weight.shape[0] == weight.shape[1] else None
            signs, sign_weight = signs.to(torch.int8), sign_weight.to(torch.int8)
        y = _sign_mm(signs, sign_weight, scale, kind, out=out)
        return y.view(x.shape[:-1] + (weight.shape[0],))

    @staticmethod
    def backward(ctx, grad):
        x, shift, weight = ctx.saved_tensors
        grad = _rows(grad)
        shifted = _rows(x) + shift
        grad_x = grad_shift = grad_weight = None
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if need_x:
            grad_x = torch.empty_like(shifted)
        if ctx.needs_input_grad[2]:
            signs = torch.sign(shifted, out=grad_x) if need_x else torch.sign(shifted)
            grad_weight = centred_sign_backward(weight, grad.t() @ signs)
            del signs
        if need_x:
            sign_weight, scale = centred_sign_factors(weight)
            # ApproxSign with its factor 2 folded into the product with the binary weight.
            torch.mm(grad, sign_weight * (2 * scale).unsqueeze(1), out=grad_x)
            approx_sign_backward_(grad_x, shifted, doubled=True)
            grad_shift = grad_x.sum(0) if ctx.needs_input_grad[1] else None
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_shift, grad_weight


def binary_linear(x: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Binary linear layer of ReActNet / BiT style: ``sign(x + shift) @ binarize_linear_weight(W)^T``, no bias.

    Backward: ApproxSign (Bi-Real Net) for the activation and the shift; for the weight, the centred
    weight sign's straight-through gradient (:func:`~timm_binaryvit.quantizers.centred_sign_backward`).
    ``shift`` is per input channel (last axis). Only ``x`` is kept for the backward pass; signs and
    binary weights are recomputed. The product runs with the kernel of
    :func:`~timm_binaryvit.dispatch.sign_mm_kind`.
    """
    return _BinaryLinear.apply(x, shift, weight)


class _BinaryConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, weight, stride: int, padding: int):
        ctx.save_for_backward(x, shift, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(torch.sign(x + shift), binarize_conv_weight(weight), stride=stride, padding=padding)

    @staticmethod
    def backward(ctx, grad):
        x, shift, weight = ctx.saved_tensors
        shifted = x + shift
        grad_signs, grad_binary, _ = torch.ops.aten.convolution_backward(
            grad, torch.sign(shifted), binarize_conv_weight(weight), None,
            [ctx.stride] * 2, [ctx.padding] * 2, [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0] or ctx.needs_input_grad[1], ctx.needs_input_grad[2], False])
        grad_x = grad_weight = grad_shift = None
        if grad_signs is not None:
            grad_x = approx_sign_backward_(grad_signs, shifted)
            grad_shift = grad_x.sum_to_size(shift.shape) if ctx.needs_input_grad[1] else None
        if grad_binary is not None:
            grad_weight = scaled_sign_backward(weight, grad_binary)
        return grad_x, grad_shift, grad_weight, None, None


def binary_conv2d(
        x: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0,
) -> torch.Tensor:
    """Binary convolution (ReActNet): conv of ``sign(x + shift)`` with ``binarize_conv_weight(W)``, no bias.

    ``x`` is ``(B, C, H, W)``, ``shift`` is ``(1, C, 1, 1)``.
    Backward: ApproxSign (Bi-Real Net) for the activation and the shift; the scaled weight sign's
    straight-through gradient through ``clamp(W, -1, 1)`` for the weight, the scale held constant.
    """
    return _BinaryConv2d.apply(x, shift, weight, stride, padding)


class _ElasticBinarize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, scale):
        ctx.save_for_backward(p, scale)
        return elastic_binarize_value(p, scale)

    @staticmethod
    def backward(ctx, grad):
        p, scale = ctx.saved_tensors
        return elastic_backward(grad, p, scale, ctx.needs_input_grad[1])


def elastic_binarize(p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elastic binariser for attention probabilities of BiT (Liu et al., NeurIPS 2022).

    Forward: ``s * clamp(round(p / s), 0, 1)`` with a learnable scalar ``s``.
    Backward: :func:`~timm_binaryvit.quantizers.elastic_backward`: ``g`` passes where ``0 <= p/s <= 1``;
    ``ds = sum(g * (round(p/s) - p/s))`` over that region plus ``sum(g)`` where ``p/s > 1``.
    """
    return _ElasticBinarize.apply(p, scale)


def _prelu_backward(grad: torch.Tensor, z: torch.Tensor, slope: torch.Tensor, need_slope: bool,
                    return_scratch: bool = False, need_sum: bool = False):
    # PReLU(z) = z (z > 0), slope * z (z <= 0), on (M, C) rows: (grad_z, grad_slope, grad_z.sum(0) if
    # need_sum else None). On the CPU one compiled pass (quantizers.one_pass_kernels); otherwise stock
    # operators, neither torch.where nor aten's prelu backward (both slow on the CPU with a broadcast
    # slope). With return_scratch, also a spare tensor of z's shape that the caller may overwrite.
    slope_fits = (grad.dim() == 2 and slope.is_contiguous() and slope.dtype == grad.dtype and slope.dim() == 1
                  and slope.numel() == grad.shape[1])
    ext = one_pass_kernels(grad, z) if slope_fits else None
    if ext is not None:
        grad_z = torch.empty_like(grad)
        grad_slope = grad.new_empty(grad.shape[1]) if need_slope else None
        grad_sum = grad.new_empty(grad.shape[1]) if need_sum else None
        ext.prelu_backward(grad, z, slope, grad_z, grad_slope, grad_sum)
        if return_scratch:
            return grad_z, grad_slope, grad_sum, torch.empty_like(grad)
        return grad_z, grad_slope, grad_sum
    grad_z = torch.ops.aten.hardtanh_backward(grad, z, 0., math.inf)  # grad where z > 0
    grad_neg = grad - grad_z
    grad_z.addcmul_(grad_neg, slope)  # exactly grad (z > 0) or slope * grad (z <= 0)
    grad_slope = grad_neg.mul_(z).sum(0) if need_slope else None
    grad_sum = grad_z.sum(0) if need_sum else None
    if return_scratch:
        return grad_z, grad_slope, grad_sum, grad_neg
    return grad_z, grad_slope, grad_sum


class _RPReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift_in, slope, shift_out):
        ctx.save_for_backward(x, shift_in, slope)
        y = F.prelu(_rows(x) - shift_in, slope)
        return y.add_(shift_out).view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, shift_in, slope = ctx.saved_tensors
        grad = _rows(grad)
        grad_x, grad_slope, grad_x_sum = _prelu_backward(grad, _rows(x) - shift_in, slope, ctx.needs_input_grad[2],
                                                         need_sum=ctx.needs_input_grad[1])
        grad_shift_in = -grad_x_sum if ctx.needs_input_grad[1] else None
        grad_shift_out = grad.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x.view(x.shape), grad_shift_in, grad_slope, grad_shift_out


def rprelu(x: torch.Tensor, shift_in: torch.Tensor, slope: torch.Tensor, shift_out: torch.Tensor) -> torch.Tensor:
    """RPReLU of ReActNet (Liu et al., ECCV 2020): ``PReLU(x - shift_in) + shift_out``, per channel (last axis).

    Backward: the exact gradient of that expression (PReLU's gradient at 0 is the slope).
    """
    return _RPReLU.apply(x, shift_in, slope, shift_out)


# ---------------------------------------------------------------------------------------------
# Modules


def _dd(device, dtype):
    return {'device': device, 'dtype': dtype}


@register_notrace_module
class BinaryActivation(nn.Module):
    """Learnable shift followed by the activation sign: ``sign(x + shift)`` (ReActNet's RSign).

    Forward: ``sign(x + shift)``; backward: ApproxSign (Bi-Real Net), see :func:`shifted_sign`.
    ``shift`` is per channel (last axis), initialised to 0.
    """

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim, **_dd(device, dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_custom_autograd(x):
            return self._forward_custom(x)
        return approx_sign(x + self.shift)

    @torch.jit.unused
    def _forward_custom(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_sign(x, self.shift)


@register_notrace_module
class BinaryLinear(nn.Module):
    """Binary linear layer with its own input shift: ``sign(x + shift) @ (a * sign(W - mean_in W))^T``.

    No bias. See :func:`binary_linear` for the pseudo-gradients (ApproxSign of Bi-Real Net for
    the activation, clipped straight-through for the centred weight as in ReActNet / BiT).
    Weight init: truncated normal, std 0.02; shift init 0.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.shift = nn.Parameter(torch.zeros(in_features, **_dd(device, dtype)))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **_dd(device, dtype)))
        if not self.weight.is_meta:
            nn.init.trunc_normal_(self.weight, std=.02)

    def binary_weight(self) -> torch.Tensor:
        """The effective weight the layer multiplies by: ``+a`` / ``-a`` per output row."""
        return binarize_linear_weight(self.weight)


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_custom_autograd(x):
            return self._forward_custom(x)
        return sign_product('linear', approx_sign(x + self.shift), centred_sign_weight(self.weight))

    @torch.jit.unused
    def _forward_custom(self, x: torch.Tensor) -> torch.Tensor:
        return binary_linear(x, self.shift, self.weight)

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}'


@register_notrace_module
class BinaryConv2d(nn.Module):
    """Binary convolution with its own input shift (ReActNet): conv of ``sign(x + shift)`` with ``a * sign(W)``.

    No bias; ``a`` is the mean of ``|W|`` per output channel. Pseudo-gradients: see
    :func:`binary_conv2d`. The weight uses PyTorch's default conv initialisation; shift init 0.
    """

    def __init__(
            self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
            device=None, dtype=None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.shift = nn.Parameter(torch.zeros(1, in_channels, 1, 1, **_dd(device, dtype)))
        self.weight = nn.Parameter(torch.empty(
            out_channels, in_channels, kernel_size, kernel_size, **_dd(device, dtype)))
        if not self.weight.is_meta:
            # PyTorch's default Conv2d initialisation, as the authors' code uses.
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def binary_weight(self) -> torch.Tensor:
        """The effective weight the layer convolves with: ``+a`` / ``-a`` per output channel."""
        return binarize_conv_weight(self.weight)


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_custom_autograd(x):
            return self._forward_custom(x)
        # A convolution of signs is a sum of at most C * k * k signs: float32 keeps it exact under autocast.
        signs, weight = approx_sign(x + self.shift), scaled_sign_weight(self.weight)
        if torch.jit.is_scripting():
            return F.conv2d(signs, weight, stride=self.stride, padding=self.padding)
        return _outside_autocast(self._conv, signs, weight)

    def _conv(self, signs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(signs, weight, stride=self.stride, padding=self.padding)

    @torch.jit.unused
    def _forward_custom(self, x: torch.Tensor) -> torch.Tensor:
        return binary_conv2d(x, self.shift, self.weight, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}')


@register_notrace_module
class ElasticBinarizer(nn.Module):
    """Elastic binariser of BiT (Liu et al., NeurIPS 2022) for attention probabilities.

    Forward: ``s * clamp(round(p / s), 0, 1)``; ``s`` is one learnable scalar, init 0.005.
    Backward: see :func:`elastic_binarize`.
    """

    def __init__(self, init_scale: float = 0.005, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.full((), init_scale, **_dd(device, dtype)))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if use_custom_autograd(p):
            return self._forward_custom(p)
        return elastic_binarize_ste(p, self.scale)

    @torch.jit.unused
    def _forward_custom(self, p: torch.Tensor) -> torch.Tensor:
        return elastic_binarize(p, self.scale)


@register_notrace_module
class RPReLU(nn.Module):
    """RPReLU of ReActNet (Liu et al., ECCV 2020): ``PReLU(x - shift_in) + shift_out``, per channel (last axis).

    ``shift_in`` is subtracted (the authors' ``move1``), ``shift_out`` added (``move2``); the
    PReLU slope starts at 0.25, both shifts at 0. Backward: exact.
    """

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(dim, **_dd(device, dtype)))
        self.slope = nn.Parameter(torch.full((dim,), 0.25, **_dd(device, dtype)))
        self.shift_out = nn.Parameter(torch.zeros(dim, **_dd(device, dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_custom_autograd(x):
            return self._forward_custom(x)
        z = x - self.shift_in
        return torch.where(z > 0, z, z * self.slope) + self.shift_out

    @torch.jit.unused
    def _forward_custom(self, x: torch.Tensor) -> torch.Tensor:
        return rprelu(x, self.shift_in, self.slope, self.shift_out)

class Affine(nn.Module):
    """Per-channel affine transformation ``alpha * x + beta`` (the paper's LayerScale-like affine).

    BinaryViT puts one before each main residual addition (``alpha`` init 0.1) and one on each
    pooling branch (``alpha`` init 0); ``beta`` starts at 0.
    """

    def __init__(self, dim: int, init_alpha: float = 0.1, device=None, dtype=None):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((dim,), init_alpha, **_dd(device, dtype)))
        self.beta = nn.Parameter(torch.zeros(dim, **_dd(device, dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, x, self.alpha)
