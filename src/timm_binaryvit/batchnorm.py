"""The token BatchNorm of BinaryViT, and BatchNorm as the fused autograd functions compute it.

BinaryViT (Le & Li, CVPR 2023 Workshops, arXiv 2306.16678) replaces every LayerNorm of its binary
models with a BatchNorm over the channels of the tokens, :class:`TokenBatchNorm`: an ordinary
``nn.BatchNorm1d`` (so timm's ``--sync-bn`` converts it), whose running statistics can be held still
with :func:`frozen_batchnorm_stats` (gradient checkpointing runs a forward pass twice).

The fused autograd functions (:func:`norm_add_rprelu` here, the tail of every binary unit, and those
of :mod:`timm_binaryvit.fused`) compute the BatchNorm themselves: :func:`batchnorm_forward` normalises
and updates the running statistics exactly as the module's own forward would, and
:func:`batchnorm_backward` is its exact gradient.
"""
import contextlib
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import _raised
from .layers import Affine, BinaryActivation, RPReLU, _dd, _prelu_backward, _rows
from .quantizers import approx_sign_backward_

__all__ = [
    'TokenBatchNorm', 'frozen_batchnorm_stats', 'norm_add_rprelu', 'batchnorm_forward', 'batchnorm_backward',
    'batchnorm_uses_batch_stats',
]


# ---------------------------------------------------------------------------------------------
# The module


_stats_frozen = threading.local()


def _stats_are_frozen() -> bool:
    return getattr(_stats_frozen, 'value', False)


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


# ---------------------------------------------------------------------------------------------
# BatchNorm inside fused autograd functions, and BatchNorm + shortcut + RPReLU in one step


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
        grad_v, grad_slope, grad_v_sum, scratch = _prelu_backward(grad, v, slope, need[5], return_scratch=True,
                                                                  need_sum=True)
        del v
        grad_y, grad_weight, grad_bias = batchnorm_backward(
            grad_v, y2, mean, invstd, weight, ctx.batch, need[2], grad_v_sum, scratch=scratch)
        return (grad_y.view(y.shape), grad_v.view(shortcut.shape) if need[1] else None, grad_weight,
                grad_bias if need[3] else None, -grad_v_sum if need[4] else None, grad_slope,
                grad.sum(0) if need[6] else None, grad_sign_shift, grad_alpha, grad_beta,
                grad_out.view(y.shape) if ctx.has_residual and need[10] else None, None)


def norm_add_rprelu(
        y: torch.Tensor,
        shortcut: torch.Tensor,
        norm: TokenBatchNorm,
        act: RPReLU,
        sign: Optional[BinaryActivation] = None,
        affine: Optional[Affine] = None,
        residual: Optional[torch.Tensor] = None,
):
    """``RPReLU(BN(y) + shortcut)`` (the tail of every binary unit of BinaryViT) as one autograd step.

    Forward: exactly ``act(norm(y) + shortcut)``, with ``norm``'s running statistics updated as its
    own forward would. With ``sign`` it returns ``(out, sign(out + sign.shift))`` (the attention's
    second shift and activation sign, ApproxSign backward); with ``affine`` it returns
    ``affine(out)`` instead of ``out``; with ``residual``, ``residual`` plus that. Backward: exact
    (BatchNorm, RPReLU, affine), ApproxSign for the sign. Only ``y`` and ``shortcut`` are kept for the
    backward pass; the rest is recomputed. ``norm.bn`` must be a plain ``nn.BatchNorm1d`` (callers
    check :func:`~timm_binaryvit.fused.fusable`). RPReLU is ReActNet's (Liu et al., ECCV 2020).
    """
    bn = norm.bn
    return _NormAddRPReLU.apply(
        y, shortcut, bn.weight, bn.bias, act.shift_in, act.slope, act.shift_out,
        sign.shift if sign is not None else None,
        affine.alpha if affine is not None else None, affine.beta if affine is not None else None, residual, bn)
