"""Binary building blocks of BinaryViT (Le & Li, CVPR 2023 Workshops, arXiv 2306.16678).

Every block states its forward rule and the pseudo-gradient it trains with, and
names the paper it comes from. The exact rules are those of
``shared/design/ARCHITECTURE.md`` section 1, which follow the authors' code.

The heavy primitives are custom autograd functions rather than compositions of
stock operators: they save only the real-valued input and recompute signs,
masks and binarised weights in the backward pass, where the stock composition
would keep a float copy of every intermediate. The arithmetic is unchanged.

Each module has a plain-operator path used under TorchScript, which cannot
compile ``torch.autograd.Function``; it computes the same forward values.
"""
import contextlib
import math
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module

__all__ = [
    'approx_sign', 'shifted_sign', 'binarize_linear_weight', 'binarize_conv_weight',
    'binary_linear', 'binary_conv2d', 'elastic_binarize', 'rprelu',
    'BinaryActivation', 'BinaryLinear', 'BinaryConv2d', 'ElasticBinarizer', 'RPReLU',
    'TokenBatchNorm', 'Affine', 'frozen_batchnorm_stats',
]


def _approx_sign_derivative(x: torch.Tensor) -> torch.Tensor:
    # d/dx of Bi-Real Net's piecewise quadratic: 2 - 2|x| inside [-1, 1], 0 outside.
    return (2 - 2 * x.abs()).clamp_(min=0)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Reduce a broadcast gradient to the shape of a per-channel parameter.
    return grad.reshape(-1, grad.shape[-1]).sum(0).reshape(shape) if len(shape) == 1 else grad.sum_to_size(shape)


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
        grad_x = grad * _approx_sign_derivative(x + shift)
        return grad_x, _sum_to(grad_x, shift.shape)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """Activation sign with the ApproxSign pseudo-gradient of Bi-Real Net (Liu et al., ECCV 2018).

    Forward: ``sign(x)``, with ``sign(0) = 0``.
    Backward: ``g * (2 + 2x)`` for ``-1 <= x <= 0``, ``g * (2 - 2x)`` for ``0 < x <= 1``, ``0`` elsewhere.
    """
    return _ShiftedSign.apply(x, x.new_zeros(x.shape[-1:]))


def shifted_sign(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``approx_sign(x + shift)`` in one step: ReActNet's RSign (Liu et al., ECCV 2020).

    Forward: ``sign(x + shift)``, ``shift`` broadcast over the last (channel) axis or any
    broadcastable shape.
    Backward: ApproxSign of ``x + shift`` for ``x``; the same summed over the broadcast axes
    for ``shift``. Only ``x`` is kept for the backward pass.
    """
    return _ShiftedSign.apply(x, shift)


def binarize_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """Effective weight of a binary linear layer: ``a * sign(W - mean_in(W))``.

    ``a = mean_in(|W|)`` per output row, taken from the uncentred weight (as in the
    authors' code). This is the forward value only; :func:`binary_linear` trains it.
    """
    scale = weight.abs().mean(dim=1, keepdim=True)
    return scale * torch.sign(weight - weight.mean(dim=1, keepdim=True))


def binarize_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """Effective weight of a binary convolution: ``a * sign(W)``, ``a = mean over (in, kh, kw) of |W|``."""
    scale = weight.abs().mean(dim=(1, 2, 3), keepdim=True)
    return scale * torch.sign(weight)


def _linear_weight_grad(weight: torch.Tensor, grad_binary: torch.Tensor) -> torch.Tensor:
    # Straight-through through clamp(W - mean_in(W), -1, 1), then through the centring.
    centred = weight - weight.mean(dim=1, keepdim=True)
    grad_centred = grad_binary * (centred.abs() <= 1)
    return grad_centred - grad_centred.mean(dim=1, keepdim=True)


class _BinaryLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, weight):
        ctx.save_for_backward(x, shift, weight)
        return F.linear(torch.sign(x + shift), binarize_linear_weight(weight))

    @staticmethod
    def backward(ctx, grad):
        x, shift, weight = ctx.saved_tensors
        shifted = x + shift
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x = grad @ binarize_linear_weight(weight)
            grad_x.mul_(_approx_sign_derivative(shifted))
        if ctx.needs_input_grad[2]:
            signs = torch.sign(shifted)
            grad_binary = grad.reshape(-1, grad.shape[-1]).t() @ signs.reshape(-1, signs.shape[-1])
            grad_weight = _linear_weight_grad(weight, grad_binary)
        grad_shift = _sum_to(grad_x, shift.shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_shift, grad_weight


def binary_linear(x: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Binary linear layer of ReActNet / BiT style: ``sign(x + shift) @ binarize_linear_weight(W)^T``, no bias.

    Backward: ApproxSign (Bi-Real Net) for the activation and the shift; for the weight,
    straight-through through ``clamp(W - mean_in(W), -1, 1)`` with the centring differentiated
    and the scale ``a`` held constant (ReActNet, Liu et al. 2020; BiT, Liu et al. NeurIPS 2022).
    Only ``x`` is kept for the backward pass; signs and binary weights are recomputed.
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
            grad_x = grad_signs * _approx_sign_derivative(shifted)
            grad_shift = grad_x.sum_to_size(shift.shape) if ctx.needs_input_grad[1] else None
        if grad_binary is not None:
            grad_weight = grad_binary * (weight.abs() <= 1)
        return grad_x, grad_shift, grad_weight, None, None


def binary_conv2d(
        x: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0,
) -> torch.Tensor:
    """Binary convolution (ReActNet): conv of ``sign(x + shift)`` with ``binarize_conv_weight(W)``, no bias.

    ``x`` is ``(B, C, H, W)``, ``shift`` is ``(1, C, 1, 1)``.
    Backward: ApproxSign (Bi-Real Net) for the activation and the shift; straight-through
    through ``clamp(W, -1, 1)`` for the weight, the scale held constant.
    """
    return _BinaryConv2d.apply(x, shift, weight, stride, padding)


class _ElasticBinarize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, scale):
        ctx.save_for_backward(p, scale)
        return scale * torch.clamp(torch.round(p / scale), 0, 1)

    @staticmethod
    def backward(ctx, grad):
        p, scale = ctx.saved_tensors
        q = p / scale
        inside = (q >= 0) & (q <= 1)
        grad_p = grad * inside
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * torch.where(inside, torch.round(q) - q, (q > 1).to(q.dtype))).sum()
            grad_scale = grad_scale.reshape(scale.shape)
        return grad_p, grad_scale


def elastic_binarize(p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elastic binariser for attention probabilities of BiT (Liu et al., NeurIPS 2022).

    Forward: ``s * clamp(round(p / s), 0, 1)`` with a learnable scalar ``s``.
    Backward: ``g`` passes where ``0 <= p/s <= 1``; ``ds = sum(g * (round(p/s) - p/s))`` over that
    region plus ``sum(g)`` where ``p/s > 1``, summed over the whole tensor, with no gradient scale.
    """
    return _ElasticBinarize.apply(p, scale)


class _RPReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift_in, slope, shift_out):
        ctx.save_for_backward(x, shift_in, slope)
        z = x - shift_in
        return torch.where(z > 0, z, z * slope) + shift_out

    @staticmethod
    def backward(ctx, grad):
        x, shift_in, slope = ctx.saved_tensors
        z = x - shift_in
        positive = z > 0
        grad_x = torch.where(positive, grad, grad * slope)
        grad_slope = _sum_to(torch.where(positive, 0, grad * z), slope.shape) if ctx.needs_input_grad[2] else None
        grad_shift_in = -_sum_to(grad_x, shift_in.shape) if ctx.needs_input_grad[1] else None
        grad_shift_out = _sum_to(grad, shift_in.shape) if ctx.needs_input_grad[3] else None
        return grad_x, grad_shift_in, grad_slope, grad_shift_out


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
        if torch.jit.is_scripting():
            return torch.sign(x + self.shift)
        return self._forward_train(x)

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
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

    def binary_input(self, x: torch.Tensor) -> torch.Tensor:
        """The signs the layer multiplies: ``sign(x + shift)``."""
        return torch.sign(x + self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.linear(self.binary_input(x), self.binary_weight())
        return self._forward_train(x)

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
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

    def binary_input(self, x: torch.Tensor) -> torch.Tensor:
        """The signs the layer convolves: ``sign(x + shift)``."""
        return torch.sign(x + self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.conv2d(self.binary_input(x), self.binary_weight(), stride=self.stride, padding=self.padding)
        return self._forward_train(x)

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
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
        if torch.jit.is_scripting():
            return self.scale * torch.clamp(torch.round(p / self.scale), 0, 1)
        return self._forward_train(p)

    @torch.jit.unused
    def _forward_train(self, p: torch.Tensor) -> torch.Tensor:
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
        if torch.jit.is_scripting():
            z = x - self.shift_in
            return torch.where(z > 0, z, z * self.slope) + self.shift_out
        return self._forward_train(x)

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        return rprelu(x, self.shift_in, self.slope, self.shift_out)


_stats_frozen = threading.local()


@contextlib.contextmanager
def frozen_batchnorm_stats():
    """Within this context, :class:`TokenBatchNorm` in training mode normalises with batch
    statistics as usual but leaves its running statistics untouched.

    Gradient checkpointing runs a block's forward twice; without this, the recomputation
    would update every running mean and variance a second time.
    """
    previous = getattr(_stats_frozen, 'value', False)
    _stats_frozen.value = True
    try:
        yield
    finally:
        _stats_frozen.value = previous


class TokenBatchNorm(nn.Module):
    """BatchNorm over the channel (last) axis of tokens ``(..., C)``, statistics over all other axes.

    The BinaryViT paper replaces every LayerNorm of its binary models with it. The
    normalisation itself is an ordinary :class:`torch.nn.BatchNorm1d` (``self.bn``), so
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` converts it; tokens are flattened to
    ``(M, C)``, a view for contiguous input.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, device=None, dtype=None):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum, **_dd(device, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.training and getattr(_stats_frozen, 'value', False):
            return self._forward_frozen_stats(x)
        return self.bn(x.reshape(-1, x.shape[-1])).view(x.shape)

    @torch.jit.unused
    def _forward_frozen_stats(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        momentum, tracked = bn.momentum, bn.num_batches_tracked
        bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged, exactly
        try:
            y = bn(x.reshape(-1, x.shape[-1])).view(x.shape)
        finally:
            bn.momentum = momentum
            if tracked is not None:
                tracked.sub_(1)
        return y


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
