"""The binarisers of BinaryViT, each written once: its forward rule, its pseudo-gradient, and a
straight-through composition of stock operators.

Like Larq's quantizers, each binariser is one named thing. For each there are three functions:

* ``*_factors`` / the forward value: what the model multiplies by;
* ``*_backward``: the pseudo-gradient, called by every custom autograd function of
  :mod:`timm_binaryvit.layers`, :mod:`timm_binaryvit.batchnorm` and :mod:`timm_binaryvit.fused` (they
  never re-derive it);
* the straight-through estimator (``approx_sign``, ``centred_sign_weight``, ``scaled_sign_weight``,
  ``elastic_binarize_ste``): stock operators only, so plain autograd, TorchScript, ``torch.compile``,
  autocast and ONNX export all understand it. Its forward value is bit-exact the binarised value
  (``value.detach() + (smooth - smooth.detach())`` adds an exact zero) and its autograd gradient is
  the pseudo-gradient. The models run it wherever the custom autograd functions cannot run.

The three binarisers (see docs/architecture.md):

===================  ==============================================  ===============================================
binariser            forward                                         pseudo-gradient
===================  ==============================================  ===============================================
ApproxSign           ``sign(x)``, ``sign(0) = 0``                    ``g * (2 - 2|x|)`` on ``[-1, 1]``, 0 outside
                     (activations, Q, K, V; Bi-Real Net, Liu et al.,
                     ECCV 2018)
centred weight sign  ``a * sign(W - mean_in W)``, ``a = mean_in |W|``  ``g`` where ``|W - mean_in W| <= 1``, 0 outside,
                     per output row (linear layers; ReActNet, Liu     then through the centring (minus its row
                     et al., ECCV 2020; BiT, Liu et al., NeurIPS      mean); ``a`` is held constant
                     2022)
scaled weight sign   ``a * sign(W)``, ``a = mean |W|`` per output       ``g`` where ``|W| <= 1``, 0 outside; ``a``
                     channel (the binary convolution; ReActNet)      constant
elastic binariser    ``s * clamp(round(p / s), 0, 1)``, ``s`` a        ``g`` where ``0 <= p/s <= 1``; for ``s``:
                     learnable scalar (attention probabilities;     ``sum(g * (round(p/s) - p/s))`` there plus
                     BiT)                                            ``sum(g)`` where ``p/s > 1``
===================  ==============================================  ===============================================
"""
import functools
import math
from typing import Optional, Tuple

import torch

__all__ = [
    'approx_sign', 'approx_sign_backward_',
    'centred_sign_factors', 'centred_sign_backward', 'centred_sign_weight',
    'scaled_sign_factors', 'scaled_sign_backward', 'scaled_sign_weight',
    'elastic_binarize_value', 'elastic_backward', 'elastic_binarize_ste',
    'closed_interval_grad',
]


def _grad_wanted(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


# ---------------------------------------------------------------------------------------------
# ApproxSign


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """Activation sign with the ApproxSign pseudo-gradient of Bi-Real Net (Liu et al., ECCV 2018).

    Forward: ``sign(x)``, with ``sign(0) = 0``.
    Backward: ``g * (2 - 2|x|)`` for ``-1 <= x <= 1`` (``2 + 2x`` below 0, ``2 - 2x`` above), 0 elsewhere:
    the derivative of the piecewise quadratic ``F(x) = 2 c - c |c|``, ``c = clamp(x, -1, 1)``.
    Straight-through composition of stock operators: ``sign(x) + (F(x) - F(x))`` with the sign and the
    second ``F`` detached.
    """
    signs = torch.sign(x)
    if not _grad_wanted(x):
        return signs
    c = x.clamp(-1., 1.)
    smooth = c * (2. - c.abs())
    return signs.detach() + (smooth - smooth.detach())


def one_pass_kernels(*tensors: torch.Tensor):
    """The compiled extension's one-pass element-wise kernels where they apply to ``tensors`` (CPU,
    contiguous, one shape, float32 or float64, extension available), else None: the stock operators
    then compute the same values in several passes."""
    first = tensors[0]
    if first.device.type != 'cpu' or first.dtype not in (torch.float32, torch.float64):
        return None
    if any(t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous() for t in tensors):
        return None
    from . import packed_ops  # the extension is built on first use
    return packed_ops.extension()


def approx_sign_backward_(grad: torch.Tensor, x: torch.Tensor, doubled: bool = False,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ApproxSign's pseudo-gradient ``grad * (2 - 2|clamp(x, -1, 1)|)``, for the custom autograd functions.

    ``x`` is scratch and may be overwritten. With ``doubled``, ``grad`` already carries the factor 2
    (folded into a preceding matrix product by the caller) and is scaled in place by ``1 - |x|``;
    otherwise the result goes to ``out`` (or a new tensor) and ``grad`` is left unchanged. On the CPU
    one compiled pass computes it (:func:`one_pass_kernels`; the same rule, checked against this one).
    """
    ext = one_pass_kernels(grad, x) if out is None or out.is_contiguous() else None
    if ext is not None:
        if doubled:
            ext.approx_sign_backward(grad, x, grad, 1.0)
            return grad
        result = out if out is not None else torch.empty_like(grad)
        ext.approx_sign_backward(grad, x, result, 2.0)
        return result
    h = x.clamp_(-1., 1.).abs_()
    if doubled:
        return grad.addcmul_(grad, h, value=-1)
    g2 = torch.mul(grad, 2, out=out) if out is not None else torch.mul(grad, 2)
    return g2.addcmul_(g2, h, value=-1)


# ---------------------------------------------------------------------------------------------
# Weight binarisers


def centred_sign_factors(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sign(W - mean_in W), a)`` with ``a = mean_in |W|`` per output row (the uncentred ``W``, as the
    authors' code takes it): the binary linear weight is ``a[:, None] * signs``."""
    return torch.sign(weight - weight.mean(dim=1, keepdim=True)), weight.abs().mean(dim=1)


def centred_sign_backward(weight: torch.Tensor, grad_binary: torch.Tensor) -> torch.Tensor:
    """Pseudo-gradient of the centred weight sign: ``grad_binary`` straight through
    ``clamp(W - mean_in W, -1, 1)`` (bounds included), then through the centring; ``a`` constant."""
    centred = weight - weight.mean(dim=1, keepdim=True)
    grad_centred = closed_interval_grad(grad_binary, centred, -1., 1.)
    return grad_centred - grad_centred.mean(dim=1, keepdim=True)


def centred_sign_weight(weight: torch.Tensor) -> torch.Tensor:
    """The binary linear weight ``a * sign(W - mean_in W)`` as a straight-through composition of stock
    operators: the forward value is exact, the gradient that of :func:`centred_sign_backward`."""
    signs, scale = centred_sign_factors(weight)
    value = (scale.unsqueeze(1) * signs).detach()
    if not _grad_wanted(weight):
        return value
    clipped = _straight_through_inside(weight - weight.mean(dim=1, keepdim=True), -1., 1.)
    return value + (clipped - clipped.detach())


def scaled_sign_factors(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sign(W), a)`` with ``a = mean |W|`` over all but the first (output) axis."""
    return torch.sign(weight), weight.abs().mean(dim=list(range(1, weight.dim())))


def scaled_sign_backward(weight: torch.Tensor, grad_binary: torch.Tensor) -> torch.Tensor:
    """Pseudo-gradient of the scaled weight sign: ``grad_binary`` straight through ``clamp(W, -1, 1)``."""
    return closed_interval_grad(grad_binary, weight, -1., 1.)


def scaled_sign_weight(weight: torch.Tensor) -> torch.Tensor:
    """The binary convolution weight ``a * sign(W)`` as a straight-through composition of stock operators."""
    signs, scale = scaled_sign_factors(weight)
    value = (scale.reshape([-1] + [1] * (weight.dim() - 1)) * signs).detach()
    if not _grad_wanted(weight):
        return value
    clipped = _straight_through_inside(weight, -1., 1.)
    return value + (clipped - clipped.detach())


# ---------------------------------------------------------------------------------------------
# Elastic binariser of the attention probabilities


def elastic_binarize_value(p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Forward value of BiT's elastic binariser: ``s * clamp(round(p / s), 0, 1)``."""
    return torch.round(p / scale).clamp_(0, 1).mul_(scale)


def elastic_backward(grad: torch.Tensor, p: torch.Tensor, scale: torch.Tensor, need_scale: bool,
                     binary: Optional[torch.Tensor] = None, q: Optional[torch.Tensor] = None,
                     out: Optional[torch.Tensor] = None):
    """Pseudo-gradients ``(grad_p, grad_s)`` of the elastic binariser (BiT, Liu et al., NeurIPS 2022).

    With ``q = p / s``: ``grad_p = g`` where ``0 <= q <= 1`` (else 0); ``grad_s = sum(g * (round(q) - q))``
    over that region plus ``sum(g)`` where ``q > 1``, summed over the whole tensor, no gradient scale.
    Computed as ``sum(g * c) - sum(grad_p * q)`` with ``c = clamp(round(q), 0, 1)`` (``round(q)`` inside, 1
    above, 0 below). A caller that has them already may pass ``q`` and ``c`` (``binary``); ``grad_p`` goes
    to ``out`` if given, which may be ``binary`` itself (it is read first).
    """
    q = p / scale if q is None else q
    grad_c = None
    if need_scale:
        grad_c = _dot(grad, torch.round(q).clamp_(0, 1) if binary is None else binary)
    grad_p = closed_interval_grad(grad, q, 0., 1., out=out)
    grad_scale = (grad_c - _dot(grad_p, q)).reshape(scale.shape) if grad_c is not None else None
    return grad_p, grad_scale


def elastic_binarize_ste(p: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The elastic binariser as a straight-through composition of stock operators: ``s * r`` with
    ``r = clamp(round(p/s), 0, 1)`` in the forward pass and the gradient of ``clamp(p/s, 0, 1)``, which
    gives exactly :func:`elastic_backward`'s ``grad_p`` and ``grad_s`` (bounds included)."""
    q = p / scale
    rounded = torch.round(q).clamp(0., 1.).detach()
    if not (_grad_wanted(p) or _grad_wanted(scale)):
        return scale * rounded
    clipped = _straight_through_inside(q, 0., 1.)
    return scale * (rounded + (clipped - clipped.detach()))


def _straight_through_inside(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    # x where low <= x <= high, a constant elsewhere: its gradient is 1 on the closed interval (bounds
    # included, as the rules say; torch.clamp's gradient leaves the bounds out), 0 outside.
    return torch.where((x >= low) & (x <= high), x, x.detach())


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1).to(a.dtype))


# ---------------------------------------------------------------------------------------------
# Shared helper


def closed_interval_grad(grad: torch.Tensor, x: torch.Tensor, low: float, high: float,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``grad`` where ``low <= x <= high``, else 0, in one pass (a bool mask times a float tensor is slow
    on the CPU): ``hardtanh_backward`` passes ``grad`` strictly inside, so the bounds widen by one ulp."""
    below, above = _below(low, x.dtype), _above(high, x.dtype)
    if out is not None:
        return torch.ops.aten.hardtanh_backward.grad_input(grad, x, below, above, grad_input=out)
    return torch.ops.aten.hardtanh_backward(grad, x, below, above)


@functools.lru_cache(maxsize=None)
def _below(v: float, dtype: torch.dtype) -> float:
    # The largest value of ``dtype`` below v (v itself is exactly representable).
    return float(torch.nextafter(torch.tensor(v, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))


@functools.lru_cache(maxsize=None)
def _above(v: float, dtype: torch.dtype) -> float:
    return float(torch.nextafter(torch.tensor(v, dtype=dtype), torch.tensor(math.inf, dtype=dtype)))
