"""Binary layers of BinaryViT (Le & Li, CVPR 2023 Workshops, arXiv 2306.16678) and the one dispatch
that decides how they run.

Every layer states its forward rule and the pseudo-gradient it trains with, and names the paper it
comes from; the binarisers themselves (ApproxSign, the weight signs, the elastic binariser) are
written once, in :mod:`timm_binaryvit.quantizers`. Each layer runs one of two ways, chosen by
:func:`use_custom_autograd`:

* custom autograd functions (eager float32 / float64 on the CPU or CUDA): they save only the
  real-valued input and recompute signs and binarised weights in the backward pass, and run each
  product of signs with the kernel :mod:`timm_binaryvit.kernels` chose for this machine;
* the straight-through compositions of stock operators of :mod:`timm_binaryvit.quantizers`
  (TorchScript, ``torch.compile``, autocast, tracing and ONNX export, other dtypes): the same values
  and the same pseudo-gradients, in operators every tool understands. Under autocast the products
  of signs run in float32, where they are exact for any fan-in (see :func:`sign_product`).

Whole blocks have a third, fused path (:func:`fusable`, :class:`FusedPath`, and :mod:`.blocks`).
"""
import contextlib
import math
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module

from . import kernels
from .quantizers import (
    approx_sign, approx_sign_backward_, centred_sign_backward, centred_sign_factors, centred_sign_weight,
    closed_interval_grad, elastic_backward, elastic_binarize_ste, elastic_binarize_value, scaled_sign_backward,
    scaled_sign_factors, scaled_sign_weight)

__all__ = [
    'approx_sign', 'shifted_sign', 'binarize_linear_weight', 'binarize_conv_weight',
    'binary_linear', 'binary_conv2d', 'elastic_binarize', 'rprelu', 'sign_product',
    'BinaryActivation', 'BinaryLinear', 'BinaryConv2d', 'ElasticBinarizer', 'RPReLU',
    'TokenBatchNorm', 'Affine', 'frozen_batchnorm_stats', 'FusedPath',
    'norm_add_rprelu', 'batchnorm_forward', 'batchnorm_backward', 'batchnorm_uses_batch_stats',
    'fusable', 'use_custom_autograd', 'stock_operators', 'sign_mm_kind',
]


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Reduce a broadcast gradient to the shape of a per-channel parameter.
    return grad.reshape(-1, grad.shape[-1]).sum(0).reshape(shape) if len(shape) == 1 else grad.sum_to_size(shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    # (..., C) -> (M, C); a view for contiguous input.
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# The dispatch


@contextlib.contextmanager
def _raised(flag: threading.local):
    # Set a thread-local flag for the duration of a ``with`` block, restoring what it was (blocks nest).
    previous = getattr(flag, 'value', False)
    flag.value = True
    try:
        yield
    finally:
        flag.value = previous


_stock_only = threading.local()


@contextlib.contextmanager
def stock_operators():
    """Within this context every binary layer runs the straight-through compositions of stock operators:
    no custom autograd function, no fused path. The tests compare the custom functions with this
    reference; it is also what TorchScript, ``torch.compile`` and autocast run."""
    with _raised(_stock_only):
        yield


@torch.jit.unused
def _custom_autograd_allowed(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if getattr(_stock_only, 'value', False):
        return False
    if x.dtype not in (torch.float32, torch.float64) or x.device.type not in ('cpu', 'cuda'):
        return False
    return not torch.is_autocast_enabled(x.device.type)


def use_custom_autograd(x: torch.Tensor) -> bool:
    """Whether the binary layers run their custom autograd functions on ``x`` (eager float32 / float64
    on the CPU or CUDA, no autocast), rather than the straight-through compositions of stock
    operators (TorchScript, ``torch.compile``, tracing, ONNX export, autocast, other dtypes)."""
    if torch.jit.is_scripting():
        return False
    return _custom_autograd_allowed(x)


def sign_mm_kind(x: torch.Tensor, rows: int, fan_in: int, fan_out: int) -> str:
    """The kernel (``'float'`` or ``'int8'``) that multiplies ``rows x fan_in`` signs by
    ``fan_out x fan_in`` signs on ``x``'s device, as :func:`timm_binaryvit.kernels.choose` decides."""
    return kernels.choose('sign_mm', (rows, fan_in, fan_out), x.device, x.dtype)


def _sign_mm(signs: torch.Tensor, sign_weight: torch.Tensor, scale: torch.Tensor, kind: str,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``signs @ (scale[:, None] * sign_weight)^T`` for ``signs`` (M, K) and ``sign_weight`` (N, K) in
    {-1, 0, 1}; with ``kind == 'int8'`` both are int8 and the product is exact before the scaling."""
    if kind == 'int8':
        product = torch._int_mm(signs, sign_weight.t())
        return torch.mul(product, scale, out=out) if out is not None else torch.mul(product, scale)
    weight = sign_weight * scale.unsqueeze(1)
    return torch.mm(signs, weight.t(), out=out) if out is not None else torch.mm(signs, weight.t())


@torch.jit.unused
def _outside_autocast(op, *operands: torch.Tensor) -> torch.Tensor:
    if not isinstance(operands[0], torch.Tensor):  # an FX proxy: record the plain operator
        return op(*operands)
    device = operands[0].device.type
    if device not in ('cpu', 'cuda', 'xpu') or not torch.is_autocast_enabled(device):
        return op(*operands)
    with torch.autocast(device, enabled=False):
        return op(*[t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in operands])


def sign_product(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.linear(a, b)`` (``op='linear'``) or ``a @ b`` (``op='matmul'``) for products of signs on the
    stock-operator path, in float32 under autocast.

    A sum of ``K`` signs is an integer of at most ``K``: exact in float32 for any fan-in here, in
    bfloat16 only up to 256 and in float16 up to 2048. Rather than lose exactness for the wide layers
    (fan-in 1,536 and 2,048), every product of signs leaves autocast; the full-precision layers
    (stem, head, softmax) follow it as usual.
    """
    if torch.jit.is_scripting():
        return F.linear(a, b) if op == 'linear' else torch.matmul(a, b)
    return _outside_autocast(F.linear if op == 'linear' else torch.matmul, a, b)


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
    binary weights are recomputed. The product runs with the kernel of :func:`sign_mm_kind`.
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
                    return_scratch: bool = False):
    # PReLU(z) = z (z > 0), slope * z (z <= 0), on (M, C) rows: (grad_z, grad_slope). Uses neither
    # torch.where nor aten's prelu backward, both slow on the CPU with a broadcast slope. With
    # return_scratch, also a spare tensor of z's shape that the caller may overwrite.
    grad_z = torch.ops.aten.hardtanh_backward(grad, z, 0., math.inf)  # grad where z > 0
    grad_neg = grad - grad_z
    grad_z.addcmul_(grad_neg, slope)  # exactly grad (z > 0) or slope * grad (z <= 0)
    grad_slope = grad_neg.mul_(z).sum(0) if need_slope else None
    if return_scratch:
        return grad_z, grad_slope, grad_neg
    return grad_z, grad_slope


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
        grad_x, grad_slope = _prelu_backward(grad, _rows(x) - shift_in, slope, ctx.needs_input_grad[2])
        grad_shift_in = -grad_x.sum(0) if ctx.needs_input_grad[1] else None
        grad_shift_out = grad.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x.view(x.shape), grad_shift_in, grad_slope, grad_shift_out


def rprelu(x: torch.Tensor, shift_in: torch.Tensor, slope: torch.Tensor, shift_out: torch.Tensor) -> torch.Tensor:
    """RPReLU of ReActNet (Liu et al., ECCV 2020): ``PReLU(x - shift_in) + shift_out``, per channel (last axis).

    Backward: the exact gradient of that expression (PReLU's gradient at 0 is the slope).
    """
    return _RPReLU.apply(x, shift_in, slope, shift_out)


# ---------------------------------------------------------------------------------------------
# BatchNorm + shortcut + RPReLU in one step


_stats_frozen = threading.local()


def _stats_are_frozen() -> bool:
    return getattr(_stats_frozen, 'value', False)


def batchnorm_uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` normalises with batch statistics in its current mode (as ``nn.BatchNorm1d`` decides)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _running_stats_target(bn: nn.modules.batchnorm._BatchNorm):
    """For a batch-statistics step: ``(running_mean, running_var, factor)`` to update, exactly as
    ``nn.BatchNorm1d.forward`` would (incrementing ``num_batches_tracked``), or ``(None, None, 0.)``
    when nothing is to be updated (no running statistics, or :func:`frozen_batchnorm_stats`)."""
    if not (bn.training and bn.track_running_stats) or _stats_are_frozen() or bn.running_mean is None:
        return None, None, 0.
    factor = 0. if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1. / float(bn.num_batches_tracked)
    return bn.running_mean, bn.running_var, factor


def _check_batch_size(rows: int, shape) -> None:
    if rows <= 1:
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {shape}')


def batchnorm_forward(bn: nn.modules.batchnorm._BatchNorm, y: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``bn`` applied to ``y`` (M, C) in its current mode, with ``weight`` and ``bias`` in place of its own:
    ``(out, mean, invstd, batch)``. Updates the running statistics as ``bn``'s own forward would (not
    under :func:`frozen_batchnorm_stats`). ``batch`` says whether ``mean`` / ``invstd`` are batch
    statistics (whose gradient flows back into ``y``)."""
    if batchnorm_uses_batch_stats(bn):
        _check_batch_size(y.shape[0], tuple(y.shape))
        running_mean, running_var, factor = _running_stats_target(bn)
        out, mean, invstd = torch.native_batch_norm(y, weight, bias, running_mean, running_var, True, factor, bn.eps)
        return out, mean, invstd, True
    out = torch.native_batch_norm(y, weight, bias, bn.running_mean, bn.running_var, False, 0., bn.eps)[0]
    return out, bn.running_mean, torch.sqrt(bn.running_var + bn.eps).reciprocal_(), False


def batchnorm_backward(grad: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                       weight: Optional[torch.Tensor], batch: bool, need_weight: bool,
                       grad_sum: Optional[torch.Tensor] = None, scratch: Optional[torch.Tensor] = None):
    """Gradients of ``BN(y) = (y - mean) * invstd * weight + bias`` on (M, C) rows: ``(grad_y, grad_weight,
    grad_bias)``; with ``batch``, ``mean`` and ``invstd`` are the statistics of ``y`` and are differentiated.
    ``scratch``, a spare tensor of ``y``'s shape, saves an allocation."""
    grad_bias = grad.sum(0) if grad_sum is None else grad_sum
    scale = invstd if weight is None else invstd * weight
    centred = torch.sub(y, mean, out=scratch) if scratch is not None else y - mean
    grad_y = torch.mul(grad, centred)
    grad_xhat = grad_y.sum(0)  # sum(grad * (y - mean)) = sum(grad * xhat) / invstd
    grad_weight = grad_xhat * invstd if need_weight and weight is not None else None
    if not batch:
        return torch.mul(grad, scale, out=grad_y), grad_weight, grad_bias
    rows = y.shape[0]
    torch.addcmul(scale * grad_bias * (-1. / rows), grad, scale, out=grad_y)
    grad_y.addcmul_(centred, scale * invstd * invstd * grad_xhat * (-1. / rows))
    return grad_y, grad_weight, grad_bias


def _shifted_bias(bias: Optional[torch.Tensor], shift_in: torch.Tensor) -> torch.Tensor:
    return -shift_in if bias is None else bias - shift_in


class _NormAddRPReLU(torch.autograd.Function):
    # out = RPReLU(BN(y) + shortcut); then either a second output sign(out + sign_shift) (ApproxSign),
    # or alpha * out + beta, and + residual. Saves y and the shortcut only.
    @staticmethod
    def forward(ctx, y, shortcut, weight, bias, shift_in, slope, shift_out, sign_shift, alpha, beta, residual, bn):
        shape = y.shape
        y2 = _rows(y)
        v, mean, invstd, batch = batchnorm_forward(bn, y2, weight, _shifted_bias(bias, shift_in))
        v.add_(_rows(shortcut))
        out = F.prelu(v, slope).add_(shift_out)
        running = (bn.running_mean, bn.running_var) if not batch else (None, None)
        ctx.save_for_backward(y, shortcut, weight, bias, shift_in, slope, shift_out, sign_shift, alpha,
                              mean, invstd, *running)
        ctx.batch, ctx.eps = batch, bn.eps
        ctx.has_residual = residual is not None
        if alpha is not None:
            out.mul_(alpha).add_(beta)
        if residual is not None:
            out.add_(_rows(residual))
        if sign_shift is not None:
            return out.view(shape), torch.add(out, sign_shift, out=v).sign_().view(shape)
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad, grad_signs=None):
        (y, shortcut, weight, bias, shift_in, slope, shift_out, sign_shift, alpha, mean, invstd,
         running_mean, running_var) = ctx.saved_tensors
        need = ctx.needs_input_grad
        y2, grad_out = _rows(y), _rows(grad)
        # The same BatchNorm computation as the forward pass (batch statistics recomputed, nothing updated).
        v = torch.native_batch_norm(y2, weight, _shifted_bias(bias, shift_in), running_mean, running_var,
                                    ctx.batch, 0., ctx.eps)[0]
        v.add_(_rows(shortcut))
        grad = grad_out
        grad_alpha = grad_beta = grad_sign_shift = None
        if alpha is not None or sign_shift is not None:
            out = F.prelu(v, slope).add_(shift_out)
            if alpha is not None:
                grad_alpha = (grad * out).sum(0) if need[8] else None
                grad_beta = grad.sum(0) if need[9] else None
                grad = grad * alpha
            if sign_shift is not None and grad_signs is not None:
                g = approx_sign_backward_(_rows(grad_signs), out.add_(sign_shift))
                grad_sign_shift = g.sum(0) if need[7] else None
                grad = g.add_(grad)
            del out
        grad_v, grad_slope, scratch = _prelu_backward(grad, v, slope, need[5], return_scratch=True)
        del v
        grad_v_sum = grad_v.sum(0)
        grad_y, grad_weight, grad_bias = batchnorm_backward(
            grad_v, y2, mean, invstd, weight, ctx.batch, need[2], grad_v_sum, scratch=scratch)
        return (grad_y.view(y.shape), grad_v.view(shortcut.shape) if need[1] else None, grad_weight,
                grad_bias if need[3] else None, -grad_v_sum if need[4] else None, grad_slope,
                grad.sum(0) if need[6] else None, grad_sign_shift, grad_alpha, grad_beta,
                grad_out.view(y.shape) if ctx.has_residual and need[10] else None, None)


def norm_add_rprelu(
        y: torch.Tensor,
        shortcut: torch.Tensor,
        norm: 'TokenBatchNorm',
        act: 'RPReLU',
        sign: Optional['BinaryActivation'] = None,
        affine: Optional['Affine'] = None,
        residual: Optional[torch.Tensor] = None,
):
    """``RPReLU(BN(y) + shortcut)`` (the tail of every binary unit of BinaryViT) as one autograd step.

    Forward: exactly ``act(norm(y) + shortcut)``, with ``norm``'s running statistics updated as its
    own forward would. With ``sign`` it returns ``(out, sign(out + sign.shift))`` (the attention's
    second shift and activation sign, ApproxSign backward); with ``affine`` it returns
    ``affine(out)`` instead of ``out``; with ``residual``, ``residual`` plus that. Backward: exact
    (BatchNorm, RPReLU, affine), ApproxSign for the sign. Only ``y`` and ``shortcut`` are kept for the
    backward pass; the rest is recomputed. ``norm.bn`` must be a plain ``nn.BatchNorm1d`` (callers
    check :func:`fusable`).
    """
    bn = norm.bn
    return _NormAddRPReLU.apply(
        y, shortcut, bn.weight, bn.bias, act.shift_in, act.slope, act.shift_out,
        sign.shift if sign is not None else None,
        affine.alpha if affine is not None else None, affine.beta if affine is not None else None, residual, bn)


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

    True in training mode where :func:`use_custom_autograd` holds, outside FX tracing and any
    TorchDispatchMode, when no module involved carries hooks and every token BatchNorm still holds a
    plain ``nn.BatchNorm1d``. Otherwise the modules run one by one (same values), so hooks fire,
    ``SyncBatchNorm`` synchronises and op-level profilers see every module; in eval mode, so eager,
    FX-traced and scripted models round identically.
    """
    if not isinstance(x, torch.Tensor) or not _custom_autograd_allowed(x):
        return False
    if not all(m.training for m in modules) or kernels.dispatch_mode_active() or _global_hooks():
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


@contextlib.contextmanager
def frozen_batchnorm_stats():
    """Within this context, :class:`TokenBatchNorm` in training mode normalises with batch
    statistics as usual but leaves its running statistics untouched.

    Gradient checkpointing runs a block's forward twice; without this, the recomputation
    would update every running mean and variance a second time.
    """
    with _raised(_stats_frozen):
        yield


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
        if not torch.jit.is_scripting() and self.training and self._stats_frozen():
            return self._forward_frozen_stats(x)
        return self.bn(x.reshape(-1, x.shape[-1])).view(x.shape)

    @torch.jit.unused
    def _stats_frozen(self) -> bool:
        return _stats_are_frozen()

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
