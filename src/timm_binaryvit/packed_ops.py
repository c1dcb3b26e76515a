"""Exact products of packed signs: XNOR / AND + popcount kernels (a C++ extension).

Every binary product of a deployed model multiplies ternary signs ``{-1, 0, +1}`` by ternary
signs, so it can run on bits: two bit planes per operand (``neg``: the value is -1; ``nz``: the
value is not 0) give ``sum a_i b_i = |nz_a & nz_b| - 2 |nz_a & nz_b & (neg_a ^ neg_b)|``, one
popcount per 64 products when a side has no zeros. The results are integers, exactly the float
product of the signs, ``sign(0) = 0`` included (exact zeros of the centred weights, zero padding,
activations exactly at their threshold).

The attention runs in one pass per query row (:func:`binary_attention`): dots, softmax mask and context,
with no score written.

The extension (``csrc/packed_gemm.cpp``, ``csrc/packed_pack.cpp``, ``csrc/packed_attention.cpp``; with
``csrc/train_ops.cpp``, the training model's one-pass backward kernels) is compiled on first use with
``torch.utils.cpp_extension.load`` and cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``
moves it); one shared object holds an AVX-512 VPOPCNTDQ path, an AVX2 path (vpshufb nibble
popcount) and a portable one (``__builtin_popcountll``, any CPU), chosen at run time from the CPU's
flags. ``TIMM_BINARYVIT_PACKED_ISA=portable|avx2|avx512_vpopcntdq`` (or :func:`use_isa`) forces a path.

Without a C++ compiler, or when the build fails, one warning names the cause and
:func:`available` is False: callers then use their float path. ``TIMM_BINARYVIT_NO_EXTENSION=1``
forces that fallback without a warning.

These are inference kernels (no autograd): forward only, used by deployed models.
"""
import contextlib
import math
import os
import shutil
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

__all__ = [
    'ENV_DISABLE', 'ENV_ISA', 'ISAS', 'PackedSigns', 'extension', 'available', 'unavailable_reason', 'isa', 'supported_isas',
    'use_isa', 'pack_signs', 'pack_signs_transposed', 'pack_sign_values', 'pack_mask', 'from_sign_bits',
    'sign_gemm', 'sign_bmm', 'mask_sign_bmm', 'binary_attention', 'register_candidates', 'unavailable_for',
    'epilogue_repeats', 'epilogue_groups',
]

#: ``1`` forces the float fallback (the extension is neither built nor loaded).
ENV_DISABLE = 'TIMM_BINARYVIT_NO_EXTENSION'
#: Forces one instruction-set path: ``portable``, ``avx2`` or ``avx512_vpopcntdq``.
ENV_ISA = 'TIMM_BINARYVIT_PACKED_ISA'
#: Path names by the extension's codes.
ISAS = ('portable', 'avx2', 'avx512_vpopcntdq')

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
_SOURCES = [os.path.join(_CSRC, name) for name in ('packed_gemm.cpp', 'packed_pack.cpp', 'packed_attention.cpp', 'train_ops.cpp')]
_EXT_NAME = 'timm_binaryvit_packed'
_lock = threading.Lock()
_ext = None
_reason: Optional[str] = None
_tried = False
_isa_override: Optional[str] = None


def _build_name() -> str:
    # torch rebuilds when a listed source changes, not when the shared header does: name the build
    # after the content of every file instead, so that no stale build is ever loaded; and after the
    # folder, since the build records its paths (two checkouts would otherwise rebuild it in turn)
    import hashlib
    digest = hashlib.sha1(os.path.abspath(_CSRC).encode())
    for name in sorted(os.listdir(_CSRC)):
        if name.endswith(('.cpp', '.h')):
            with open(os.path.join(_CSRC, name), 'rb') as f:
                digest.update(name.encode() + b'\0' + f.read())
    return f'{_EXT_NAME}_{digest.hexdigest()[:10]}'


def _compiler_problem() -> Optional[str]:
    compiler = os.environ.get('CXX', 'c++')
    if shutil.which(compiler) is None:
        return f'no C++ compiler found (CXX={compiler!r} is not on PATH)'
    return None


def _first_error_lines(e: BaseException, count: int = 3) -> str:
    # The compiler's own "error:" lines name the cause; the rest is command lines and context.
    text = '\n'.join(str(part) for part in (e, getattr(e, 'stderr', None), getattr(e, 'output', None)) if part)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if 'error:' in ln.lower() or 'not found' in ln.lower()]
    picked = [ln if len(ln) <= 240 else ln[:240] + '...' for ln in (errors or lines)[:count]]
    return f'{type(e).__name__}: ' + ' | '.join(picked)


def _load():
    """The compiled extension, or None (then ``_reason`` says why). Builds once per process."""
    global _ext, _reason, _tried
    if _tried:
        return _ext
    with _lock:
        if _tried:
            return _ext
        if os.environ.get(ENV_DISABLE, '').strip() not in ('', '0'):
            _reason = f'disabled by {ENV_DISABLE}={os.environ[ENV_DISABLE]}'
        else:
            _reason = _compiler_problem()
            if _reason is None:
                try:
                    from torch.utils.cpp_extension import load
                    _ext = load(name=_build_name(), sources=_SOURCES, extra_include_paths=[_CSRC],
                                extra_cflags=['-O3', '-fopenmp'], extra_ldflags=['-fopenmp'], verbose=False)
                except Exception as e:  # any build or load failure means: use the float path
                    _reason = f'building the packed-sign extension failed ({_first_error_lines(e)})'
            if _reason is not None:
                warnings.warn(f'timm_binaryvit: packed 1-bit kernels unavailable, using the float path: {_reason}',
                              RuntimeWarning, stacklevel=3)
        _tried = True
    return _ext


def extension():
    """The compiled extension, or None where it is unavailable (see :func:`available`). Besides the
    packed products it holds the training model's one-pass element-wise pseudo-gradients
    (:func:`timm_binaryvit.quantizers.approx_sign_backward_`, ``layers._prelu_backward``)."""
    return _load()


def available() -> bool:
    """True if the packed kernels can run here (builds the extension on the first call)."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (the compiler error's first lines, ...), else None."""
    _load()
    return _reason


def _ext_or_raise():
    ext = _load()
    if ext is None:
        raise RuntimeError(f'packed 1-bit kernels are unavailable: {_reason}')
    return ext


_supported: Optional[Tuple[str, ...]] = None


def supported_isas() -> Tuple[str, ...]:
    """The paths this CPU runs, best first (empty when the extension is unavailable)."""
    global _supported
    ext = _load()
    if ext is None:
        return ()
    if _supported is None:  # the CPU does not change under a running process
        _supported = tuple(ISAS[i] for i in ext.supported_isas())
    return _supported


def isa() -> str:
    """The path the kernels take: forced by :func:`use_isa` / ``TIMM_BINARYVIT_PACKED_ISA``, else the
    fastest: AVX-512 VPOPCNTDQ where present, otherwise AVX2 or portable as measured once (scalar
    POPCNT is fast on some AVX2 processors)."""
    forced = _isa_override or os.environ.get(ENV_ISA, '').strip().lower() or None
    supported = supported_isas()
    if not supported:
        raise RuntimeError(f'packed 1-bit kernels are unavailable: {_reason}')
    if forced is None:
        return _measured_isa(supported)
    if forced not in ISAS:
        raise ValueError(f'{ENV_ISA}={forced!r} is not one of {", ".join(ISAS)}')
    if forced not in supported:
        raise RuntimeError(f'packed kernel path {forced!r} was forced, but this CPU only runs {", ".join(supported)}')
    return forced


_auto_isa: Optional[str] = None


def _measured_isa(supported: Tuple[str, ...]) -> str:
    global _auto_isa
    if _auto_isa is None:
        if supported[0] != 'avx2' or 'portable' not in supported:
            _auto_isa = supported[0]
        else:
            import time
            times = {}
            g = torch.Generator().manual_seed(0)  # not the global random state
            with use_isa('avx2'):
                a = pack_signs(torch.rand(256, 384, generator=g) - 0.5)
            for name in ('avx2', 'portable'):
                _auto_isa = name  # the kernels below run on this path
                sign_gemm(a, a)
                start = time.perf_counter()
                for _ in range(3):
                    sign_gemm(a, a)
                times[name] = time.perf_counter() - start
            _auto_isa = min(times, key=times.get)
    return _auto_isa


_isa_codes: Dict[Tuple[Optional[str], Optional[str]], int] = {}


def _isa_code() -> int:
    # every kernel call asks: keep the answer for each (forced path, environment) seen
    key = (_isa_override, os.environ.get(ENV_ISA))
    code = _isa_codes.get(key)
    if code is None:
        code = _isa_codes[key] = ISAS.index(isa())
    return code


@contextlib.contextmanager
def use_isa(name: Optional[str]):
    """``with use_isa('avx2'): ...`` forces one path for the block (``None``: the best); process-wide."""
    global _isa_override
    if name is not None and name not in ISAS:
        raise ValueError(f'isa must be one of {", ".join(ISAS)}, got {name!r}')
    previous, _isa_override = _isa_override, name
    try:
        yield
    finally:
        _isa_override = previous


@dataclass
class PackedSigns:
    """Ternary values ``(*batch, rows, cols)`` packed for the kernels.

    ``neg`` and ``nz`` are int64 bit planes of shape ``(B, ceil(rows / 8), ceil(cols / 64), 8)``
    (``B`` the product of ``batch``, 1 without one): word ``k`` of row ``r`` is ``[r // 8, k, r % 8]``
    and its bit ``t`` is column ``64 k + t``; ``neg`` is 1 where the value is -1, ``nz`` where it
    is not 0; padding is 0 in both. ``counts`` (int32, ``(B, 8 ceil(rows / 8))``) holds each row's
    number of nonzeros. ``has_zeros``: some value is 0 (the kernels take a two-plane path).
    ``is_mask``: the values are 0 / 1 (from :func:`pack_mask`).
    """
    neg: torch.Tensor
    nz: torch.Tensor
    counts: torch.Tensor
    rows: int
    cols: int
    batch: Tuple[int, ...] = ()
    has_zeros: bool = False
    is_mask: bool = False

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.batch) + (self.rows, self.cols)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.neg, self.nz, self.counts))

    def unpack(self) -> torch.Tensor:
        """The values as float32 ``(*batch, rows, cols)`` (for tests and debugging; not fast)."""
        B, P, Kw, _ = self.neg.shape
        bits = torch.arange(64, dtype=torch.int64)

        def plane(t):
            b = (t.unsqueeze(-1) >> bits) & 1  # (B, P, Kw, 8, 64)
            return b.permute(0, 1, 3, 2, 4).reshape(B, P * 8, Kw * 64)[:, :self.rows, :self.cols]
        values = plane(self.nz).float() * (1 - 2 * plane(self.neg).float())
        return values.reshape(self.shape)


def _new_planes(batch: int, rows: int, cols: int):
    return _ext_or_raise().new_planes(batch, rows, cols)


def _as_4d(x: torch.Tensor, what: str) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{what} must be a tensor, got {type(x).__name__}')
    if x.device.type != 'cpu':
        raise ValueError(f'{what} must be on the CPU, got {x.device}')
    if x.dim() < 2:
        raise ValueError(f'{what} must have at least 2 dims (rows, cols), got shape {tuple(x.shape)}')
    batch = tuple(x.shape[:-2])
    if x.dim() == 2:
        x4 = x[None, None]
    elif x.dim() == 3:
        x4 = x[None]
    elif x.dim() == 4:
        x4 = x
    else:
        x4 = x.reshape((-1,) + tuple(x.shape[-3:]))  # copies only when the batch dims cannot merge
    return x4, batch


def _pack(x: torch.Tensor, shift: Optional[torch.Tensor], mode: int, threshold: float, what: str) -> PackedSigns:
    ext = _ext_or_raise()
    x4, batch = _as_4d(x, what)
    if x4.dtype not in (torch.float32, torch.float64):
        x4 = x4.float()
    if shift is not None:
        if shift.dim() != 1 or shift.numel() != x4.shape[-1]:
            raise ValueError(f'shift must be 1-D with {x4.shape[-1]} values (the columns of {what}), '
                             f'got shape {tuple(shift.shape)}')
        shift = shift.to(dtype=x4.dtype, device='cpu').contiguous()
    B, rows, cols = x4.shape[0] * x4.shape[1], x4.shape[2], x4.shape[3]
    neg, nz, counts = _new_planes(B, rows, cols)
    short = ext.pack(x4, shift, mode, float(threshold), neg, nz, counts, _isa_code())
    return PackedSigns(neg, nz, counts, rows, cols, batch, has_zeros=short > 0, is_mask=mode == 1)


def pack_signs(x: torch.Tensor, shift: Optional[torch.Tensor] = None) -> PackedSigns:
    """``sign(x + shift)`` packed in one pass (``sign(0) = 0``; a NaN packs as 0).

    ``x``: ``(*batch, rows, cols)`` float32 or float64 (other dtypes are converted to float32), any
    strides; ``shift``: ``(cols,)`` or None, added in ``x``'s dtype as ``torch.add`` does.
    """
    return _pack(x, shift, 0, 0.0, 'x')


def pack_signs_transposed(v: torch.Tensor, shift: Optional[torch.Tensor] = None) -> PackedSigns:
    """``sign(v)`` for ``v`` of shape ``(*batch, keys, d)`` packed along the key axis: ``(*batch, d, keys)``
    (the right-hand operand of :func:`mask_sign_bmm`). ``shift`` is ``(d,)``."""
    if shift is not None:
        v = v + shift  # rare; the kernel's shift runs along the packed axis
    return _pack(v.transpose(-2, -1), None, 0, 0.0, 'v')


def pack_mask(p: torch.Tensor, threshold: float) -> PackedSigns:
    """``p > threshold`` (values 0 / 1) packed in one pass; ``threshold`` is rounded to ``p``'s dtype,
    as ``torch.gt(p, threshold)`` does. ``p``: ``(*batch, rows, cols)``, e.g. attention probabilities."""
    return _pack(p, None, 1, threshold, 'p')


def pack_sign_values(signs: torch.Tensor) -> PackedSigns:
    """Values already in ``{-1, 0, +1}`` (any dtype), ``(*batch, rows, cols)``: e.g. weights, packed once."""
    if signs.dtype == torch.bool or not (signs.is_floating_point() or signs.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f'signs must be a float or integer tensor, got {signs.dtype}')
    bad = (signs != 0) & (signs != 1) & (signs != -1)
    if bool(bad.any()):
        raise ValueError(f'signs must hold only -1, 0 and +1; found {signs[bad].flatten()[0].item()!r}')
    return _pack(signs if signs.dtype in (torch.float32, torch.float64) else signs.to(torch.float32),
                 None, 0, 0.0, 'signs')


def from_sign_bits(bits: torch.Tensor, cols: int, zeros: Optional[torch.Tensor] = None) -> PackedSigns:
    """The packed file's weights straight into the kernel layout (no float round trip).

    ``bits``: uint8 ``(rows, ceil(cols / 8))``, bit 1 for +1 and 0 for -1, big bit order (the first
    value of a row is bit 7 of its first byte, as ``numpy.packbits(..., bitorder='big')``);
    ``zeros``: int64 flat indices into the ``(rows, cols)`` matrix of the values that are 0.
    """
    ext = _ext_or_raise()
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 2:
        raise ValueError(f'bits must be a 2-D uint8 tensor, got {getattr(bits, "dtype", type(bits))} '
                         f'of shape {tuple(getattr(bits, "shape", ()))}')
    cols = int(cols)
    if cols < 1 or bits.shape[1] != (cols + 7) // 8:
        raise ValueError(f'bits has {bits.shape[1]} bytes per row, but {cols} columns need {(cols + 7) // 8}')
    zeros = torch.zeros(0, dtype=torch.int64) if zeros is None else zeros.reshape(-1).to(torch.int64).contiguous()
    rows = bits.shape[0]
    neg, nz, counts = _new_planes(1, rows, cols)
    with_zero = ext.from_sign_bits(bits.cpu().contiguous(), cols, zeros, neg, nz, counts)
    return PackedSigns(neg, nz, counts, rows, cols, (), has_zeros=with_zero > 0)


def epilogue_repeats(period: int, n: int) -> bool:
    """Whether :func:`sign_gemm`'s epilogue can add a ``(M, period)`` shortcut to ``n`` result columns:
    it repeats runs of 8 columns (one output panel), so ``period`` is ``n`` or a multiple of 8 dividing it."""
    return period > 0 and n % period == 0 and (period == n or period % 8 == 0)


def epilogue_groups(group: int) -> bool:
    """Whether :func:`sign_gemm`'s epilogue can write the means of groups of ``group`` consecutive
    columns: a group must lie within one 8-column output panel."""
    return group > 0 and 8 % group == 0


def _check_pair(a: PackedSigns, b: PackedSigns):
    for name, v in (('a', a), ('b', b)):
        if not isinstance(v, PackedSigns):
            raise TypeError(f'{name} must be PackedSigns (see pack_signs), got {type(v).__name__}')
    if a.cols != b.cols:
        raise ValueError(f'a has {a.cols} columns and b {b.cols}: the packed (inner) dims must agree')


def _run(ext, a: PackedSigns, b: PackedSigns, out3: torch.Tensor, scale, bias3, shortcut=None, prelu=(None, None),
         means=None, signs: Optional[PackedSigns] = None) -> int:
    return ext.sign_gemm(a.neg, a.nz, a.counts, a.has_zeros, b.neg, b.nz, b.counts, b.has_zeros, a.cols,
                         out3, scale, bias3, shortcut, prelu[0], prelu[1], means,
                         *((signs.neg, signs.nz, signs.counts) if signs is not None else (None, None, None)),
                         _isa_code())


def _vector(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a contiguous 1-D tensor of dtype; per-call conversions cost more than small products, so none
    # is made where the tensor is one already
    if t.dtype == dtype and t.dim() == 1 and t.is_contiguous():
        return t
    return t.to(dtype).reshape(-1).contiguous()


def _out_dtype(scale, bias) -> Optional[torch.dtype]:
    dtypes = {t.dtype for t in (scale, bias) if isinstance(t, torch.Tensor)}
    if not dtypes and scale is None and bias is None:
        return None
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f'scale and bias must be float32 or float64 (the same), got {dtype}')
    return dtype


_shapes: Dict[torch.dtype, torch.Tensor] = {}


def _shape_only(dtype: torch.dtype) -> torch.Tensor:
    # a 1 x 1 tensor to expand into an output that only gives the kernel a shape and a dtype
    t = _shapes.get(dtype)
    if t is None:
        t = _shapes[dtype] = torch.empty((1, 1), dtype=dtype)
    return t


def _make_out(out: Optional[torch.Tensor], shape, dtype) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device.type != 'cpu':
        raise ValueError(f'out must be a CPU {dtype} tensor of shape {tuple(shape)}, '
                         f'got {out.dtype} {tuple(out.shape)} on {out.device}')
    if out.shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError('out must have unit stride along its last dim')
    return out


def sign_gemm(a: PackedSigns, b: PackedSigns, scale: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
              prelu: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
              shortcut: Optional[torch.Tensor] = None, means: Optional[torch.Tensor] = None,
              packed: bool = False) -> Union[torch.Tensor, PackedSigns]:
    """``a @ b^T`` for packed ``a (M, K)`` and ``b (N, K)``, exact.

    Without ``scale`` and ``bias`` the result is int32; with either, ``y = acc * scale + bias`` in their
    dtype (float32 or float64) computed in the kernel's epilogue. ``scale``: ``(N,)``; ``bias``:
    ``(N,)`` or ``(M, N)``; ``out``: optional ``(M, N)`` result tensor (any row stride).
    ``shortcut``: ``(M, P)`` added to ``y``, repeated along the columns when ``P < N`` (column ``j``
    reads ``shortcut[:, j % P]``; ``P`` divides ``N`` and is a multiple of 8), e.g. a binary FFN's
    ``[w, w, ..., w]``. ``out`` may be ``shortcut`` itself when ``P == N``.
    ``prelu = (slope, offset)``, both ``(N,)``: the epilogue then writes ``max(y, slope * y + offset)``
    (a PReLU whose input and output carry a constant ``c``, with ``offset = c (1 - slope)``, exact for
    slopes <= 1; :class:`~timm_binaryvit.deploy.runtime.FoldedPReLU`).
    ``means``: a float ``(M, G)`` tensor (unit column stride) that receives the mean of each group of
    ``E = N / G`` consecutive result columns (``E`` is 1, 2, 4 or 8), e.g. a binary FFN's ``pool_E``.
    ``packed=True`` returns the signs of the float result as :class:`PackedSigns` instead of the
    result (``out`` is not taken): the input of a following binary layer, made in the epilogue while
    the result is in registers and the L1 cache, so that the float result is never written.
    """
    ext = _ext_or_raise()
    _check_pair(a, b)
    if a.batch or b.batch:
        raise ValueError('sign_gemm takes 2-D operands; use sign_bmm for batched ones')
    M, N = a.rows, b.rows
    dtype = _out_dtype(scale, bias)
    if packed:
        if dtype is None:
            raise ValueError('a packed sign output needs a float result: give scale or bias')
        if out is not None:
            raise ValueError('out is not taken with packed=True: the result is returned as PackedSigns')
        result = _shape_only(dtype).expand(M, N)  # shape and dtype only: never written
    else:
        result = _make_out(out, (M, N), dtype or torch.int32)
    scale_t = bias3 = None
    if dtype is not None:
        scale_t = torch.ones(N, dtype=dtype) if scale is None else _vector(scale, dtype)
        if scale_t.numel() != N:
            raise ValueError(f'scale must have {N} values (one per output column), got {scale.numel()}')
        if bias is None:
            bias = torch.zeros(N, dtype=dtype)
        if tuple(bias.shape) not in ((N,), (M, N), (1, N)):
            raise ValueError(f'bias must be ({N},) or ({M}, {N}), got {tuple(bias.shape)}')
        if bias.dtype != dtype:
            bias = bias.to(dtype)
        if bias.dim() == 2 and bias.shape[1] > 1 and bias.stride(1) != 1:
            bias = bias.contiguous()
        # a contiguous (N,) bias goes as it is (the kernel broadcasts it over the rows)
        bias3 = bias if bias.dim() == 1 and bias.is_contiguous() else bias.expand(M, N).unsqueeze(0)
    if shortcut is not None:
        if dtype is None:
            raise ValueError('a shortcut needs a float result: give scale or bias')
        P = shortcut.shape[-1] if shortcut.dim() == 2 else 0
        if shortcut.dim() != 2 or shortcut.shape[0] != M or not epilogue_repeats(P, N):
            raise ValueError(f'shortcut must be ({M}, P) with P == {N} or a multiple of 8 dividing {N}, '
                             f'got {tuple(shortcut.shape)}')
        if shortcut.dtype != dtype:
            shortcut = shortcut.to(dtype)
        if P > 1 and shortcut.stride(1) != 1:
            shortcut = shortcut.contiguous()
    if prelu is not None:
        if dtype is None:
            raise ValueError('the PReLU epilogue needs a float result: give scale or bias')
        prelu = tuple(_vector(t, dtype) for t in prelu)
        if any(t.numel() != N for t in prelu):
            raise ValueError(f'PReLU slope and offset must have {N} values (one per output column)')
    if means is not None:
        G = means.shape[-1] if means.dim() == 2 else 0
        if (dtype is None or means.dtype != dtype or means.dim() != 2 or means.shape[0] != M or G == 0 or N % G
                or not epilogue_groups(N // G) or (G > 1 and means.stride(1) != 1)):
            raise ValueError(f'means must be a ({M}, G) tensor of the result dtype {dtype} with unit column stride, '
                             f'G = {N} / E for E in 1, 2, 4, 8; got {means.dtype} {tuple(means.shape)}')
    if packed:
        signs = PackedSigns(*_new_planes(1, M, N), M, N)
        signs.has_zeros = _run(ext, a, b, result, scale_t, bias3, shortcut, prelu or (None, None), means, signs) > 0
        return signs
    _run(ext, a, b, result, scale_t, bias3, shortcut, prelu or (None, None), means)
    return result


def sign_bmm(a: PackedSigns, b: PackedSigns, scale: Union[float, torch.Tensor, None] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Batched ``a @ b^T``: ``a (*batch, M, K)``, ``b (*batch, N, K)`` (or 2-D ``b``, shared) ->
    ``(*batch, M, N)``, int32, or float32 ``acc * scale`` when ``scale`` (a number or ``(N,)``) is given.
    E.g. ``sign(q) sign(k)^T`` for every (image, head) at once."""
    ext = _ext_or_raise()
    _check_pair(a, b)
    if b.batch and tuple(b.batch) != tuple(a.batch):
        raise ValueError(f'batch dims differ: a {tuple(a.batch)}, b {tuple(b.batch)}')
    B = a.neg.shape[0]
    M, N = a.rows, b.rows
    shape = tuple(a.batch) + (M, N)
    scale_t = bias3 = None
    if scale is None:
        result = _make_out(out, shape, torch.int32)
    else:
        dtype = scale.dtype if isinstance(scale, torch.Tensor) else torch.float32
        result = _make_out(out, shape, dtype)
        scale_t = torch.as_tensor(scale, dtype=dtype).reshape(-1).expand(N).contiguous()
        bias3 = torch.zeros(1, 1, N, dtype=dtype).expand(B, M, N)
    out3 = result.reshape(B, M, N)
    _run(ext, a, b, out3, scale_t, bias3)
    if out3.data_ptr() != result.data_ptr():
        result.copy_(out3.reshape(shape))  # out's batch dims could not merge into one
    return result


def mask_sign_bmm(p: PackedSigns, v: PackedSigns, scale: Union[float, torch.Tensor, None] = None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``P_b @ sign(V)``: ``p`` from :func:`pack_mask` ``(*batch, N, Nk)`` (0 / 1), ``v`` from
    :func:`pack_signs_transposed` ``(*batch, d, Nk)``, giving ``(*batch, N, d)``; per word this is
    ``popcount(p & v_pos) - popcount(p & v_neg)``."""
    if not isinstance(p, PackedSigns) or not p.is_mask:
        raise TypeError('p must come from pack_mask (a 0 / 1 mask)')
    return sign_bmm(p, v, scale, out)


def binary_attention(q: PackedSigns, k: PackedSigns, v: PackedSigns, scale: float, threshold: float,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[softmax(sign(q) sign(k)^T * scale) > threshold] @ sign(v)`` in one pass, int32 ``(*batch, N, d)``.

    ``q (*batch, N, K)`` and ``k (*batch, N_k, K)`` from :func:`pack_signs`, ``v (*batch, d, N_k)`` from
    :func:`pack_signs_transposed`; ``scale > 0``. The scores and probabilities are never written: a dot
    product of signs is an integer in ``[-K, K]``, so the softmax takes its exponentials from a table
    of ``2 K + 1`` values, in float64, and the mask is the keys above one integer cutoff per row. The
    result equals :func:`sign_bmm`, ``torch.softmax``, :func:`pack_mask` and :func:`mask_sign_bmm` in
    float64, and in float32 except where a probability lies within float32 rounding of the threshold.
    """
    ext = _ext_or_raise()
    _check_pair(q, k)
    for name, t in (('q', q), ('k', k), ('v', v)):
        if not isinstance(t, PackedSigns) or t.is_mask:
            raise TypeError(f'{name} must be PackedSigns of signs (pack_signs / pack_signs_transposed)')
    if not (tuple(q.batch) == tuple(k.batch) == tuple(v.batch)):
        raise ValueError(f'batch dims differ: q {tuple(q.batch)}, k {tuple(k.batch)}, v {tuple(v.batch)}')
    if v.cols != k.rows:
        raise ValueError(f'v must be packed transposed with {k.rows} key columns (pack_signs_transposed), '
                         f'got {v.cols}')
    if not 0 < scale < math.inf:
        raise ValueError(f'scale must be positive and finite, got {scale}')
    B = q.neg.shape[0]
    shape = tuple(q.batch) + (q.rows, v.rows)
    result = _make_out(out, shape, torch.int32)
    out3 = result.reshape(B, q.rows, v.rows)
    ext.binary_attention(q.neg, q.nz, q.counts, q.has_zeros, k.neg, k.nz, k.counts, k.has_zeros, v.neg, v.nz,
                         v.has_zeros, q.cols, k.rows, float(scale), float(threshold), out3, _isa_code())
    if out3.data_ptr() != result.data_ptr():
        result.copy_(out3.reshape(shape))  # out's batch dims could not merge into one
    return result


# ---------------------------------------------------------------------------------------------
# Candidates for the kernel chooser (kernels.choose). Helper products of the deployed model:
#   'deploy_linear'    shape (M, K, N): sign(x + shift) @ W^T * scale + bias, W (N, K) packed once
#   'deploy_attention' shape (BH, N, d, Nk): [softmax(sign(q) sign(k)^T / sqrt(d)) > t] sign(v) for every head
# The timed callables include the packing of the activations, which the deployed model pays.


def unavailable_for(shape, dtype, device) -> Optional[str]:
    """Why the packed kernels cannot run a product of ``shape`` on ``dtype`` / ``device`` operands (the
    chooser's availability check of every ``packed`` candidate), or None where they can; builds the
    extension the first time it is asked about a CPU float product."""
    if torch.device(device).type != 'cpu':
        return 'packed kernels run on the CPU only'
    if dtype not in (torch.float32, torch.float64):
        return f'packed kernels take float32 or float64 activations, not {dtype}'
    if not available():
        return unavailable_reason()
    return None


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _make_linear(shape, dtype, device):
    M, K, N = (int(s) for s in shape)
    x, shift = _random((M, K), dtype, 0), _random((K,), dtype, 1)
    w = pack_sign_values(_random((N, K), torch.float32, 2).sign())
    scale, bias = _random((N,), dtype, 3).abs(), _random((N,), dtype, 4)
    out = torch.empty(M, N, dtype=dtype)
    return lambda: sign_gemm(pack_signs(x, shift), w, scale, bias, out=out)


def _make_attention(shape, dtype, device):
    BH, N, d, Nk = (int(s) for s in shape)
    q, k, v = _random((BH, N, d), dtype, 0), _random((BH, Nk, d), dtype, 1), _random((BH, Nk, d), dtype, 2)
    out = torch.empty(BH, N, d, dtype=torch.int32)
    return lambda: binary_attention(pack_signs(q), pack_signs(k), pack_signs_transposed(v), d ** -0.5, 0.5 / Nk, out=out)


def register_candidates() -> None:
    """Offer kind ``packed`` for ``deploy_linear`` and ``deploy_attention`` to :mod:`.kernels`
    (idempotent: registering again replaces the same candidates). Does not build the extension:
    that happens when the chooser first asks whether ``packed`` is available."""
    from . import kernels
    kernels.register('deploy_linear', 'packed', _make_linear, unavailable_for)
    kernels.register('deploy_attention', 'packed', _make_attention, unavailable_for)
