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
  any fan-in (see :func:`sign_product`). Under ``torch.compile`` (not export) the binary linear
  products are the custom operator ``timm_binaryvit::sign_linear``, so the compiled graph keeps the
  kernel :mod:`timm_binaryvit.kernels` chose for this machine.

Whole modules (attention, FFN, pooling branches, the layer) have a third, fused path, allowed where
this dispatch allows custom autograd and more holds (:func:`timm_binaryvit.fused.fusable`).
"""
import contextlib
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from . import kernels

__all__ = ['stock_operators', 'use_custom_autograd', 'custom_operator_allowed', 'sign_mm_kind', 'sign_product']


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


def _plain_float(x: torch.Tensor) -> bool:
    # float32 / float64 on the CPU or CUDA, no autocast, outside stock_operators()
    if getattr(_stock_only, 'value', False):
        return False
    if x.dtype not in (torch.float32, torch.float64) or x.device.type not in ('cpu', 'cuda'):
        return False
    return not torch.is_autocast_enabled(x.device.type)


@torch.jit.unused
def _custom_autograd_allowed(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return _plain_float(x)


@torch.jit.unused
def custom_operator_allowed(x: torch.Tensor) -> bool:
    """Whether ``torch.compile`` is tracing (not ``torch.export`` or ONNX export, whose graphs must hold
    stock operators) for ``x`` on which the custom autograd functions would run in eager mode: then the
    fused custom operators (``timm_binaryvit::binary_ffn``) may stand in for them."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return False
    return _plain_float(x)


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


@torch.library.custom_op('timm_binaryvit::sign_linear', mutates_args=())
def _sign_linear(signs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # F.linear(signs, weight) for signs in {-1, 0, 1} and weight rows a * {-1, 0, 1}, with the kernel
    # kernels.choose picks for this machine. Under torch.compile the compiler would otherwise run it
    # in float32 even where int8 (VNNI) is several times faster.
    rows = signs.reshape(-1, signs.shape[-1])
    if sign_mm_kind(signs, rows.shape[0], weight.shape[1], weight.shape[0]) != 'int8':
        return F.linear(signs, weight)
    scale = weight.abs().amax(dim=1)  # exact: each row is a times signs
    out = _sign_mm(rows.to(torch.int8), torch.sign(weight).to(torch.int8), scale, 'int8')
    return out.view(signs.shape[:-1] + (weight.shape[0],))


@_sign_linear.register_fake
def _(signs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return signs.new_empty(signs.shape[:-1] + (weight.shape[0],))


def _sign_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sign_linear_backward(ctx, grad):
    signs, weight = ctx.saved_tensors
    rows = grad.reshape(-1, grad.shape[-1])
    return (grad @ weight if ctx.needs_input_grad[0] else None,
            rows.t() @ signs.reshape(-1, signs.shape[-1]) if ctx.needs_input_grad[1] else None)


_sign_linear.register_autograd(_sign_linear_backward, setup_context=_sign_linear_setup)


@torch.jit.unused
def _compiled_sign_linear(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    # Only while torch.compile traces (not torch.export / ONNX, whose graphs must hold stock operators).
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return None
    if a.device.type != 'cpu' or a.dtype != torch.float32 or b.dtype != torch.float32:
        return None
    if torch.is_autocast_enabled('cpu'):
        return None
    return torch.ops.timm_binaryvit.sign_linear(a, b)


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
    if op == 'linear':
        compiled = _compiled_sign_linear(a, b)
        if compiled is not None:
            return compiled
    return _outside_autocast(F.linear if op == 'linear' else torch.matmul, a, b)
