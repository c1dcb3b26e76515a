"""How the binary layers run: the one choice between custom autograd functions and stock operators.

Every binary layer of :mod:`timm_binaryvit.layers`, and every fused function of
:mod:`timm_binaryvit.batchnorm` and :mod:`timm_binaryvit.fused`, runs one of two ways, chosen here by
:func:`use_custom_autograd`:

* custom autograd functions (eager float32 / float64 on the CPU or CUDA): they save only the
  real-valued input and recompute signs and binarised weights in the backward pass, and run each
  product of signs with the kernel :mod:`timm_binaryvit.kernels` chose for this machine
  (:func:`sign_mm_kind`, :func:`_sign_mm`);
* the straight-through compositions of stock operators of :mod:`timm_binaryvit.quantizers`
  (TorchScript, ``torch.compile``, autocast, tracing and ONNX export, other dtypes, and anything
  inside :func:`stock_operators`): the same values and the same pseudo-gradients, in operators every
  tool understands. Under autocast the products of signs run in float32, where they are exact for
  any fan-in (see :func:`sign_product`).

Whole modules (attention, FFN, pooling branches, the layer) have a third, fused path, allowed where
this dispatch allows custom autograd and more holds (:func:`timm_binaryvit.fused.fusable`).
"""
import contextlib
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from . import kernels

__all__ = ['stock_operators', 'use_custom_autograd', 'sign_mm_kind', 'sign_product']


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
