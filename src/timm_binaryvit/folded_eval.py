"""Eval mode of the training model through the folded layers of :mod:`timm_binaryvit.deploy`.

In eval mode, with nothing asking for a gradient, a transformer layer is a fixed function of its
parameters and running statistics: every BatchNorm is a per-channel affine, every RPReLU shift can
be carried through to the sign that reads it, and every product of signs can run on packed bits.
That is exactly what :func:`timm_binaryvit.deploy` folds a whole model into, and it runs the layer
several times faster than the module-by-module path, which makes about ten passes over memory per
binary unit. So a :class:`~timm_binaryvit.blocks.Block` in eval mode runs as its deployed twin
(:class:`~timm_binaryvit.deploy.block.DeployedBlock`): built on first use and kept while the block's
parameters and buffers stay as they were; any change (an optimiser step, ``load_state_dict``, an
EMA update, ``.to()``) is seen through the tensors' version counters and addresses, and the twin is
folded again on the next call. Switching the block to training mode drops it.

The twin computes the same function (equal in float64 to about 1e-15, the deploy tests); in
float32 it rounds differently from the module path, as the fused training path does. Where it may
not stand in (:func:`foldable`), the module path runs: gradients wanted, hooks, ``SyncBatchNorm``,
a BatchNorm without running statistics, a device other than the CPU, and everything
:func:`~timm_binaryvit.fused.plain_modules` excludes (TorchScript, ``torch.compile``, ONNX
export, autocast, other dtypes, profilers that dispatch per operator) and inside :func:`unfolded`.
FX tracing keeps the layer whole (a notrace module), so a traced model runs it as eager mode does.
"""
import contextlib
import itertools
import threading
import weakref
from typing import Callable, Tuple

import torch
from torch import nn

from .batchnorm import TokenBatchNorm, batchnorm_uses_batch_stats
from .dispatch import _custom_autograd_allowed, _raised
from .fused import plain_modules

__all__ = ['unfolded', 'foldable', 'folded_twin', 'forget_twin']

_unfolded = threading.local()


@contextlib.contextmanager
def unfolded():
    """Within this context eval mode runs module by module, never through a folded twin (the
    reference that the folding is tested against; also what a hook or a profiler sees)."""
    with _raised(_unfolded):
        yield

# block -> (state key, folded twin); weak, so a block that goes away takes its twin with it
_twins: 'weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, nn.Module]]' = weakref.WeakKeyDictionary()


def _needs_grad(x: torch.Tensor, module: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def foldable(x, module: nn.Module) -> bool:
    """Whether ``module``'s folded twin may compute its eval-mode forward on ``x``: eval mode throughout,
    a CPU tensor, no gradient wanted (``torch.no_grad`` / ``inference_mode``, or nothing requiring one),
    every token BatchNorm normalising with running statistics, :func:`plain_modules`, and not inside
    :func:`unfolded`."""
    # first what tracing, compiling and autocast rule out, so that a tracer reads nothing else here
    if not isinstance(x, torch.Tensor) or not _custom_autograd_allowed(x) or x.device.type != 'cpu':
        return False
    if getattr(_unfolded, 'value', False):
        return False
    if any(m.training for m in module.modules()) or _needs_grad(x, module):
        return False
    for m in module.modules():
        if isinstance(m, TokenBatchNorm) and batchnorm_uses_batch_stats(m.bn):
            return False
    return plain_modules(x, module)


def _state_key(module: nn.Module, x: torch.Tensor):
    # Tensors of inference mode keep no version counter; such a module is folded on every call.
    try:
        state = tuple((t.data_ptr(), t._version) for t in itertools.chain(module.parameters(), module.buffers()))
    except RuntimeError:
        return None
    return x.dtype, x.device, state


def folded_twin(module: nn.Module, x: torch.Tensor, fold: Callable[[], nn.Module]) -> nn.Module:
    """``module``'s folded twin for inputs like ``x``: the one kept from an earlier call if no parameter
    or buffer of ``module`` changed since, otherwise ``fold()``, kept for the next call."""
    key = _state_key(module, x)
    kept = _twins.get(module)
    if key is not None and kept is not None and kept[0] == key:
        return kept[1]
    twin = fold()
    if key is not None:
        _twins[module] = (key, twin)
    return twin


def forget_twin(module: nn.Module) -> None:
    """Drop ``module``'s kept twin (its memory), e.g. when it goes back to training."""
    _twins.pop(module, None)
