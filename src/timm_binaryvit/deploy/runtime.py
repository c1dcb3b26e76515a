"""The products a deployed model runs, and the kernels that run them.

Every binary product of a deployed model multiplies signs by signs. Two products name them for
:mod:`timm_binaryvit.kernels`, which picks a kernel per shape class by measuring on the machine
at hand (nothing is assumed: ``torch._int_mm`` is fast with VNNI and 40x slower than float32
without it, bfloat16 matmuls are slow without AVX-512 BF16):

* ``deploy_linear``, shape ``(M, K, N)``: ``out = shortcut + bias + scale * (sign(x + shift) @ W^T)``
  for the ternary signs ``W`` of a binary layer. Kinds: ``float`` (float GEMM with the folded float
  weight ``scale * W``), ``int8`` (int8 signs, exact int32 ``torch._int_mm``, scaled afterwards),
  ``packed`` (:mod:`timm_binaryvit.packed_ops`: fused shift-sign-pack of the activations and an
  XNOR-popcount GEMM whose epilogue applies scale and bias).
* ``deploy_ffn``, shape ``(M, C, E)``: a binary FFN (:func:`binary_ffn`), ``C -> E C -> C`` with its
  PReLUs and the ``pool_E`` shortcut, as one product with one kind for both layers. Kinds: ``float``,
  ``int8`` as for ``deploy_linear``; ``packed``, where the first layer's epilogue writes the signs of
  its result straight into packed bits for the second (with the ``pool_E`` means), so the ``E C``-wide
  hidden activations are never written as floats.
* ``deploy_attention``, shape ``(B * heads, N, d, N_k)``: ``sign(q) sign(k)^T``, the softmax, and the
  binarised probabilities (0 / 1) times ``sign(v)``. Kinds: ``float``; ``bf16`` where it is exact
  (the products are integers of magnitude at most ``max(d, N_k)``, exact in bfloat16 up to 256);
  ``packed`` (:func:`timm_binaryvit.packed_ops.binary_attention`: XNOR / AND + popcount with the
  softmax and the mask in between, one pass per query row, no scores written).

Every kind gives the same integers, so the choice changes speed, never the result. The float
path always works (other devices, ``torch.jit.trace``, a failed extension build).
"""
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels, packed_ops

__all__ = ['LINEAR', 'FFN', 'ATTENTION', 'BF16_EXACT', 'choose_kind', 'SignBits', 'pack_bits', 'unpack_bits',
           'Workspace', 'Folded', 'FoldedPReLU', 'FoldedBinaryLinear', 'FoldedPatchConv', 'binary_ffn', 'attention_context',
           'patches']

LINEAR = 'deploy_linear'
FFN = 'deploy_ffn'
ATTENTION = 'deploy_attention'
#: bfloat16 holds every integer of magnitude up to 256 exactly.
BF16_EXACT = 256


def choose_kind(product: str, shape: Tuple[int, ...], x: torch.Tensor) -> str:
    """The kernel kind for ``product`` on operands like ``x`` (see :func:`timm_binaryvit.kernels.choose`)."""
    # A tracer (torch.jit.trace, the legacy ONNX exporter) records torch operators only; the packed
    # kernels write through a C++ extension it cannot see, so a traced graph would bake in their results.
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return 'float'
    return kernels.choose(product, shape, x.device, x.dtype)


# ---------------------------------------------------------------------------------------------
# Sign matrices as bits (the packed file's layout, shared by the file format and the kernels)

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_bits(values: torch.Tensor) -> torch.Tensor:
    """``(out, n)`` values in {-1, 0, +1} -> ``(out, ceil(n / 8))`` uint8, bit 1 for +1, big bit order."""
    out, n = values.shape
    bits = (values > 0).to(torch.uint8)
    pad = (-n) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(out, pad)], dim=1)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=values.device)
    return (bits.view(out, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Inverse of :func:`pack_bits` without the zeros: ``(out, n)`` ±1 of ``dtype``."""
    masks = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(-1) & masks) != 0).reshape(packed.shape[0], -1)[:, :n]
    return torch.where(bits, 1, -1).to(dtype)


class SignBits(NamedTuple):
    """A ternary sign matrix ``(rows, cols)`` as the packed file stores it: ``bits`` (:func:`pack_bits`)
    and ``zeros``, the flat indices of the entries that are 0 (stored as bit 0)."""
    bits: torch.Tensor
    zeros: torch.Tensor
    cols: int

    @classmethod
    def from_signs(cls, signs: torch.Tensor) -> 'SignBits':
        zeros = torch.nonzero(signs.reshape(-1) == 0).reshape(-1).to(torch.int64)
        return cls(pack_bits(signs), zeros, signs.shape[1])

    @property
    def rows(self) -> int:
        return self.bits.shape[0]

    def signs(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        values = unpack_bits(self.bits, self.cols, dtype)
        if self.zeros.numel():
            values.view(-1)[self.zeros.to(values.device)] = 0
        return values


# ---------------------------------------------------------------------------------------------
# Buffers and folded modules


class Workspace:
    """Buffers reused by every layer of a stage: keyed by role, shape and dtype, allocated once per call
    (on CPU, fresh 100 MB tensors and passes over main memory cost more than the arithmetic on them)."""
    __slots__ = ('bufs', 'like')

    def __init__(self, like: torch.Tensor):
        self.bufs: Dict[Tuple, torch.Tensor] = {}
        self.like = like

    def __call__(self, tag: str, *shape: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.like.dtype
        key = (tag, dtype) + shape
        buf = self.bufs.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=self.like.device)
            self.bufs[key] = buf
        return buf


class Folded(nn.Module):
    """Base of the deployed pieces: registers folded float64 tensors as buffers of the compute dtype."""

    def _buf(self, name: str, value: torch.Tensor, dtype: torch.dtype):
        if hasattr(self, name) and name not in self._buffers:
            delattr(self, name)
        self.register_buffer(name, value.to(dtype).contiguous())


class FoldedPReLU(Folded):
    """Per-channel PReLU with a constant carried through, in place on ``(M, C)``: ``y + c -> PReLU(y) + c``.

    The caller folds ``c`` (the shift the next sign needs) into the bias of the layer that
    produces ``y``, so the result is directly the input of that sign. With all slopes <= 1 this
    is ``max(y + c, slope * (y + c) + (1 - slope) * c)`` (two passes, no allocation); otherwise it
    falls back to :func:`torch.nn.functional.prelu`.
    """

    def __init__(self, slope: torch.Tensor, carry: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self._buf('slope', slope, dtype)
        self._buf('carry', carry, dtype)
        self._buf('offset', carry * (1 - slope), dtype)
        self.general = bool((slope > 1).any())

    def apply_(self, y: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        if self.general:
            return y.copy_(F.prelu(y - self.carry, self.slope).add_(self.carry))
        torch.addcmul(self.offset, y, self.slope, out=tmp)
        return torch.maximum(y, tmp, out=y)


class FoldedBinaryLinear(Folded):
    """``out = shortcut + bias + sign(x + in_shift) @ (scale * W)^T``: a binary linear layer whose
    per-output-channel scale already includes the folded BatchNorm scale, and whose ``bias`` holds
    the BatchNorm shift and the other folded constants.

    The signs ``W`` are kept as bits (``bits``, ``zeros``: 1 bit per weight); the form each kernel
    multiplies by (packed planes, int8 signs, the float weight ``scale * W``) is made from them the
    first time that kernel runs and kept, so a layer that only ever runs packed never holds a float
    weight. Each call runs the kernel :func:`choose_kind` picks for its shape.
    """

    def __init__(self, weight: SignBits, scale: torch.Tensor, bias: torch.Tensor, in_shift: Optional[torch.Tensor],
                 dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = weight.cols, weight.rows
        self.register_buffer('bits', weight.bits.contiguous())
        self.register_buffer('zeros', weight.zeros.contiguous())
        self._buf('scale', scale, dtype)
        self._buf('bias', bias, dtype)
        if in_shift is None:
            self.in_shift = None
        else:
            self._buf('in_shift', in_shift, dtype)
        self._forms: Dict[tuple, object] = {}

    def _apply(self, fn, recurse=True):
        self._forms = {}  # a new dtype or device: the derived forms are made again when used
        return super()._apply(fn, recurse)

    def weight_form(self, kind: str):
        """The weight as the ``kind`` kernel takes it: PackedSigns (``packed``), ``(K, N)`` int8 (``int8``) or
        the ``(N, K)`` float weight ``scale * W`` (``float``); made on first use."""
        key = (kind, self.scale.dtype, self.scale.device)
        form = self._forms.get(key)
        if form is None:
            if kind == 'packed':
                form = packed_ops.from_sign_bits(self.bits.cpu(), self.in_features, self.zeros.cpu())
            else:
                signs = SignBits(self.bits, self.zeros, self.in_features).signs(
                    torch.int8 if kind == 'int8' else self.scale.dtype)
                form = signs.t() if kind == 'int8' else signs.mul_(self.scale[:, None])  # exact: signs are ±1, 0
            self._forms[key] = form
        return form

    def _signs(self, x: torch.Tensor, ws: Workspace, overwrite_input: bool) -> torch.Tensor:
        M, K = x.shape
        if self.in_shift is not None:
            return torch.add(x, self.in_shift, out=ws('signs', M, K)).sign_()
        if overwrite_input:
            return x.sign_()
        return torch.sign(x, out=ws('signs', M, K))

    def run_act(self, x: torch.Tensor, shortcut: torch.Tensor, out: torch.Tensor, ws: Workspace, act: 'FoldedPReLU',
                tmp: torch.Tensor, overwrite_input: bool = False, kind: Optional[str] = None,
                means: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`run`, then ``act`` in place (``tmp``: scratch of ``out``'s shape); with ``means`` ``(M, G)``,
        also the mean of each group of ``N / G`` consecutive columns of the result into it. Where the
        product runs packed and every slope is <= 1, the PReLU (and the means, for groups of 1, 2, 4
        or 8) are the packed kernel's epilogue: passes over ``out`` and ``tmp`` saved."""
        if isinstance(x, packed_ops.PackedSigns):
            kind = 'packed'
        kind = kind or choose_kind(LINEAR, (x.shape[0], x.shape[1], self.out_features), x)
        group = out.shape[1] // means.shape[1] if means is not None else 0
        prelu_inside = kind == 'packed' and not act.general
        means_inside = prelu_inside and means is not None and packed_ops.epilogue_groups(group)
        self.run(x, shortcut, out, ws, overwrite_input, kind, prelu=(act.slope, act.offset) if prelu_inside else None,
                 means=means if means_inside else None)
        if not prelu_inside:
            act.apply_(out, tmp)
        if means is not None and not means_inside:
            # a matrix-vector product: faster than mean(-1) on the CPU
            torch.mm(out.view(-1, group), out.new_full((group, 1), 1.0 / group), out=means.view(-1, 1))
        return out

    def signs_after(self, act: 'FoldedPReLU', group: int = 1) -> bool:
        """Whether :meth:`run_signs` can run with ``act`` after the product and means of ``group`` columns."""
        return not act.general and packed_ops.epilogue_groups(group)

    def run_signs(self, x, shortcut: torch.Tensor, ws: Workspace, act: 'FoldedPReLU',
                  means: Optional[torch.Tensor] = None) -> 'packed_ops.PackedSigns':
        """The signs of :meth:`run_act`'s result (``kind='packed'``), packed for the next binary layer by the
        kernel's epilogue: the float result is never written. ``x`` may be packed already. Needs
        :meth:`signs_after`."""
        M = x.rows if isinstance(x, packed_ops.PackedSigns) else x.shape[0]
        period = shortcut.shape[-1]
        if not self.signs_after(act, self.out_features // means.shape[1] if means is not None else 1):
            raise ValueError('packed sign output needs PReLU slopes <= 1 and means of 1, 2, 4 or 8 columns')
        rows = shortcut.reshape(M, -1)
        if not packed_ops.epilogue_repeats(period, self.out_features):
            rows = ws('repeated', M, self.out_features).view(M, -1, period).copy_(shortcut.view(M, 1, -1)).view(M, -1)
        return packed_ops.sign_gemm(self._packed_input(x), self.weight_form('packed'), self.scale, self.bias,
                                    prelu=(act.slope, act.offset), shortcut=rows, means=means, packed=True)

    def _packed_input(self, x) -> 'packed_ops.PackedSigns':
        if isinstance(x, packed_ops.PackedSigns):
            if self.in_shift is not None:
                raise ValueError('packed input signs cannot take this layer\'s input shift')
            return x
        return packed_ops.pack_signs(x, self.in_shift)

    def run(self, x: torch.Tensor, shortcut: torch.Tensor, out: torch.Tensor, ws: Workspace,
            overwrite_input: bool = False, kind: Optional[str] = None,
            prelu: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
            means: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out = shortcut + bias + sign(x + in_shift) @ W^T`` for 2-D ``x``; ``shortcut`` is ``out``'s shape
        or ``(M, 1, C)`` broadcast over ``out`` viewed as ``(M, -1, C)``. ``overwrite_input`` lets it take
        the signs in place in ``x``. ``kind`` forces a kernel (default: :func:`choose_kind`); ``prelu`` and
        ``means`` (packed only) are :func:`~timm_binaryvit.packed_ops.sign_gemm`'s epilogue."""
        if isinstance(x, packed_ops.PackedSigns):  # signs from the previous layer's epilogue
            M, K = x.rows, x.cols
            kind = 'packed'
        else:
            M, K = x.shape
            kind = kind or choose_kind(LINEAR, (M, K, self.out_features), x)
        if (prelu is not None or means is not None) and kind != 'packed':
            raise ValueError(f'the PReLU and means epilogue runs in the packed kernel only, not {kind!r}')
        if kind == 'packed':
            # bias, shortcut (repeated along the columns if narrower) and PReLU all in the epilogue
            rows = shortcut.reshape(M, -1)
            if not packed_ops.epilogue_repeats(rows.shape[1], self.out_features):
                # a repeat the kernel cannot read in place: spelled out in out, which may be the shortcut
                # (the epilogue reads each element before it writes it)
                rows = out.view(M, -1, rows.shape[1]).copy_(shortcut.view(M, 1, -1)).view(M, -1)
            packed_ops.sign_gemm(self._packed_input(x), self.weight_form('packed'), self.scale,
                                 self.bias, out=out, prelu=prelu, shortcut=rows, means=means)
            return out
        # the shortcut first: it may be x itself, whose signs may then be taken in place
        if shortcut.dim() > 2:
            C = shortcut.shape[-1]
            torch.add(shortcut, self.bias.view(-1, C), out=out.view(shortcut.shape[0], -1, C))
        else:
            torch.add(shortcut, self.bias, out=out)
        if kind == 'int8':
            signs8 = ws('signs8', M, K, dtype=torch.int8).copy_(self._signs(x, ws, overwrite_input))
            acc = torch._int_mm(signs8, self.weight_form('int8'),
                                out=ws('acc', M, self.out_features, dtype=torch.int32))
            out.addcmul_(acc, self.scale)
        else:
            out.addmm_(self._signs(x, ws, overwrite_input), self.weight_form('float').t())
        return out


def binary_ffn(fc1: FoldedBinaryLinear, act1: FoldedPReLU, fc2: FoldedBinaryLinear, act2: FoldedPReLU,
               w: torch.Tensor, out: torch.Tensor, ws: Workspace, kind: Optional[str] = None) -> torch.Tensor:
    """A folded binary FFN on ``w (M, C)`` into ``out (M, C)``: ``t = act1(fc1(w) + [w]*E)``, then
    ``act2(fc2(t) + pool_E(t))``, with the kernel ``kind`` for both layers (default: :func:`choose_kind`
    of :data:`FFN`). ``packed`` hands the hidden signs from the first layer's epilogue to the second
    where the PReLU and the means allow it (:meth:`FoldedBinaryLinear.signs_after`)."""
    M, C = w.shape
    E = fc1.out_features // C
    kind = kind or choose_kind(FFN, (M, C, E), w)
    pooled = ws('pool', M, C)
    if kind == 'packed' and fc1.signs_after(act1, E):
        hidden = fc1.run_signs(w, w.view(M, 1, C), ws, act1, means=pooled)
        return fc2.run_act(hidden, pooled, out, ws, act2, ws('tmp', M, C))
    hidden = fc1.run_act(w, w.view(M, 1, C), ws('hidden', M, E * C), ws, act1, ws('htmp', M, E * C), kind=kind,
                         means=pooled)
    return fc2.run_act(hidden, pooled, out, ws, act2, ws('tmp', M, C), overwrite_input=True, kind=kind)


class FoldedPatchConv(Folded):
    """A full-precision ``p x p`` stride-``p`` convolution (BatchNorms folded in) plus a per-token
    bias (position embedding), as one GEMM on patches; output ``(B, N, C)`` tokens."""

    def __init__(self, weight: torch.Tensor, token_bias: torch.Tensor, patch: int, dtype: torch.dtype):
        super().__init__()
        self.patch = patch
        self._buf('weight', weight.reshape(weight.shape[0], -1), dtype)
        self._buf('token_bias', token_bias, dtype)  # (N, C)

    def forward(self, patches: torch.Tensor, B: int) -> torch.Tensor:
        N, C = self.token_bias.shape
        out = self.token_bias.expand(B, N, C).contiguous()
        out.view(B * N, C).addmm_(patches, self.weight.t())
        return out


def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B * H/p * W/p, C * p * p)`` non-overlapping patches, conv weight order."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B * (H // p) * (W // p), C * p * p)


# ---------------------------------------------------------------------------------------------
# Binary attention


def _head_signs(y: torch.Tensor, low: torch.dtype, ws: Workspace, tag: str) -> torch.Tensor:
    # (g, n, h, d) -> signs (g * h, n, d) of dtype ``low``; via y's dtype, since rounding y itself
    # to bfloat16 could flush a tiny value to 0
    g, n, h, d = y.shape
    signs = torch.sign(y.transpose(1, 2), out=ws(tag + '_f', g, h, n, d))
    if low != y.dtype:
        signs = ws(tag, g, h, n, d, dtype=low).copy_(signs)
    return signs.view(g * h, n, d)


def attention_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_scale: torch.Tensor,
                      threshold: torch.Tensor, ws: Workspace, kind: Optional[str] = None) -> torch.Tensor:
    """``[softmax(sign(q) sign(k)^T * attn_scale) > threshold] @ sign(v)`` for every image and head.

    ``q``: ``(g, N, h, d)``, ``k`` and ``v``: ``(g, N_k, h, d)`` (views of token-major tensors);
    ``attn_scale`` a 1-element tensor, ``threshold`` a 0-dim one, both of ``q``'s dtype. Returns the
    integer context ``(g, h, N, d)`` in a dtype of the chosen kernel (int32, bfloat16 or ``q``'s).
    """
    g, N, h, d = q.shape
    Nk = k.shape[1]
    kind = kind or choose_kind(ATTENTION, (g * h, N, d, Nk), q)
    if kind == 'packed':  # scores, softmax, mask and context in one pass: no scores are written
        return packed_ops.binary_attention(
            packed_ops.pack_signs(q.transpose(1, 2)), packed_ops.pack_signs(k.transpose(1, 2)),
            packed_ops.pack_signs_transposed(v.transpose(1, 2)), float(attn_scale), float(threshold),
            out=ws('ctx', g, h, N, d, dtype=torch.int32))
    scores, probs = ws('scores', g, h, N, Nk), ws('probs', g, h, N, Nk)
    low = torch.bfloat16 if kind == 'bf16' else q.dtype
    qh, kh, vh = _head_signs(q, low, ws, 'qh'), _head_signs(k, low, ws, 'kh'), _head_signs(v, low, ws, 'vh')
    dots = torch.bmm(qh, kh.transpose(1, 2), out=ws('dots', g * h, N, Nk, dtype=low))
    # attn_scale is a 1-element vector, not a scalar, so that bfloat16 dots are promoted, not the scale rounded
    torch.mul(dots.view(g, h, N, Nk), attn_scale, out=scores)
    torch.softmax(scores, -1, out=probs)
    mask = torch.gt(probs.view(g * h, N, Nk), threshold, out=dots)
    return torch.bmm(mask, vh, out=ws('ctx', g * h, N, d, dtype=low)).view(g, h, N, d)


# ---------------------------------------------------------------------------------------------
# Candidates for the kernel chooser: each times the product as the deployed model runs it (the
# sign or packing of the activations, any conversion and, for the attention, the softmax included),
# on random operands.


def _random(shape, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # measuring must not move the global random state
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _random_layer(K: int, N: int, in_shift: bool, dtype, device, seed: int):
    # a folded binary layer and the PReLU after it, with slopes in [0, 1) as trained ones mostly are
    signs = SignBits.from_signs(torch.sign(_random((N, K), torch.float64, 'cpu', seed)))
    layer = FoldedBinaryLinear(signs, _random((N,), torch.float64, 'cpu', seed + 1).abs(),
                               _random((N,), torch.float64, 'cpu', seed + 2),
                               _random((K,), torch.float64, 'cpu', seed + 3) if in_shift else None, dtype).to(device)
    slope = torch.rand(N, generator=torch.Generator().manual_seed(seed + 4), dtype=torch.float64)
    return layer, FoldedPReLU(slope, _random((N,), torch.float64, 'cpu', seed + 5), dtype).to(device)


def _make_linear(kind: str):
    def make(shape, dtype, device):
        # as the model runs it: input shift, the shortcut of the output's shape, then the PReLU
        M, K, N = (int(s) for s in shape)
        layer, act = _random_layer(K, N, True, dtype, device, 0)
        x, shortcut = _random((M, K), dtype, device, 10), _random((M, N), dtype, device, 11)
        out, tmp = torch.empty(M, N, dtype=dtype, device=device), torch.empty(M, N, dtype=dtype, device=device)
        ws = Workspace(x)
        layer.weight_form(kind)  # made once at the first call, as in the model
        return lambda: layer.run_act(x, shortcut, out, ws, act, tmp, kind=kind)
    return make


def _make_ffn(kind: str):
    def make(shape, dtype, device):
        M, C, E = (int(s) for s in shape)
        fc1, act1 = _random_layer(C, E * C, False, dtype, device, 0)
        fc2, act2 = _random_layer(E * C, C, False, dtype, device, 20)
        w, out = _random((M, C), dtype, device, 40), torch.empty(M, C, dtype=dtype, device=device)
        ws = Workspace(w)
        return lambda: binary_ffn(fc1, act1, fc2, act2, w, out, ws, kind=kind)
    return make


def _int8_unavailable(shape, dtype, device) -> Optional[str]:
    if not hasattr(torch, '_int_mm'):
        return 'this torch has no torch._int_mm'
    if torch.device(device).type != 'cpu':
        return 'int8 products are only used on the CPU'
    return None


def _make_attention(kind: str):
    def make(shape, dtype, device):
        BH, N, d, Nk = (int(s) for s in shape)
        q = _random((BH, N, 1, d), dtype, device, 0)
        k, v = _random((BH, Nk, 1, d), dtype, device, 1), _random((BH, Nk, 1, d), dtype, device, 2)
        attn_scale = torch.full((1,), d ** -0.5, dtype=dtype, device=device)
        threshold = torch.tensor(0.5 / Nk, dtype=dtype, device=device)  # about half the keys of a row
        ws = Workspace(q)
        return lambda: attention_context(q, k, v, attn_scale, threshold, ws, kind=kind)
    return make


def _bf16_unavailable(shape, dtype, device) -> Optional[str]:
    _, _, d, Nk = shape
    if max(d, Nk) > BF16_EXACT:
        return f'not exact: products up to {max(d, Nk)} exceed bfloat16\'s exact integers ({BF16_EXACT})'
    return None


kernels.register(LINEAR, 'float', _make_linear('float'))
kernels.register(LINEAR, 'int8', _make_linear('int8'), _int8_unavailable)
# the layer's own run() with its shortcut pass, as the float and int8 candidates do
kernels.register(LINEAR, 'packed', _make_linear('packed'), packed_ops.unavailable_for)
kernels.register(FFN, 'float', _make_ffn('float'))
kernels.register(FFN, 'int8', _make_ffn('int8'), _int8_unavailable)
kernels.register(FFN, 'packed', _make_ffn('packed'), packed_ops.unavailable_for)
kernels.register(ATTENTION, 'float', _make_attention('float'))
kernels.register(ATTENTION, 'bf16', _make_attention('bf16'), _bf16_unavailable)
kernels.register(ATTENTION, 'packed', _make_attention('packed'), packed_ops.unavailable_for)
