"""Which kernel runs each product, chosen for the machine at hand.

A product of signs can run as a float32 GEMM, as an exact int8 GEMM (``torch._int_mm``), in
bfloat16, or on packed bits. Which one is fastest depends on the processor, by factors of 10
and more: ``torch._int_mm`` reaches VNNI kernels on AVX-512 VNNI CPUs and is about 40 times
slower than float32 on AVX2-only ones. So nothing is assumed. Each product names its
candidates here (:func:`register`); the first time a shape class is seen, :func:`choose`
drops the candidates the machine cannot run and times the rest on random signs of that
shape, the way ``torch.backends.cudnn.benchmark`` does, and keeps the fastest for the
process (optionally on disk). Float32 is always a candidate and wins ties, so the choice is
never slower than plain float32 as measured.

One setting overrides the choice: the environment variable ``TIMM_BINARYVIT_KERNELS`` or
:func:`set_mode` / :func:`kernel_mode`, with one of ``auto`` (the default), ``float``, ``int8``,
``bf16``, ``packed``. A forced kind that a product does not offer falls back to float32.
``timm-binaryvit kernels`` prints :func:`report`.
"""
import contextlib
import dataclasses
import json
import math
import os
import platform
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = [
    'MODES', 'ENV_MODE', 'ENV_CACHE', 'Choice', 'register', 'choose', 'get_mode', 'set_mode', 'kernel_mode',
    'choices', 'clear_cache', 'cpu_info', 'describe_machine', 'dispatch_mode_active', 'isa_limits', 'report',
    'shape_class',
]

#: Environment variable that forces one kind of kernel (``auto`` measures).
ENV_MODE = 'TIMM_BINARYVIT_KERNELS'
#: Environment variable naming a JSON file that keeps the measured choices across processes.
ENV_CACHE = 'TIMM_BINARYVIT_KERNEL_CACHE'
MODES = ('auto', 'float', 'int8', 'bf16', 'packed')

#: Shapes are measured with at most this many rows: the ratio between kernels settles well before
#: that, and an int8 product on a CPU without VNNI costs a second at DeiT-S's full 3,152 rows.
MEASURE_ROWS = 1024
#: A candidate other than float32 is taken only if it is at least this much faster (noise margin).
MARGIN = 0.95
#: A candidate with a timed run this many times slower than float32's best is not timed again.
GIVE_UP = 3.0
#: timed runs of each candidate (the fastest counts), after one warm-up
TIMED_RUNS = 5

# Flags that decide which kernels can be fast (Linux /proc/cpuinfo names).
_FLAGS = ('avx2', 'fma', 'popcnt', 'avx512f', 'avx512bw', 'avx512vl', 'avx512_vnni', 'avx_vnni',
          'avx512_bf16', 'avx512_vpopcntdq', 'amx_int8', 'amx_bf16', 'asimd', 'sve')


@dataclasses.dataclass
class Choice:
    """One decision: ``kind`` runs ``product`` for shapes of class ``shape``, for ``reason``."""
    product: str
    shape: Tuple[int, ...]
    dtype: str
    kind: str
    reason: str
    times: Dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per call, as measured


@dataclasses.dataclass
class _Candidate:
    # ``make(shape, dtype, device)`` returns a no-argument callable that runs the product once on
    # random operands; ``unavailable(shape, dtype, device)`` returns why it cannot run, or None.
    make: Callable[[Tuple[int, ...], torch.dtype, torch.device], Callable[[], object]]
    unavailable: Callable[[Tuple[int, ...], torch.dtype, torch.device], Optional[str]]


_registry: Dict[str, Dict[str, _Candidate]] = {}
_choices: Dict[tuple, Choice] = {}
_lock = threading.RLock()
_mode_override: Optional[str] = None
_disk: Optional[Dict[str, str]] = None
#: The clock used to time candidates; tests replace it to simulate slow kernels.
timer: Callable[[], float] = time.perf_counter


def register(product: str, kind: str,
             make: Callable[[Tuple[int, ...], torch.dtype, torch.device], Callable[[], object]],
             unavailable: Optional[Callable[[Tuple[int, ...], torch.dtype, torch.device], Optional[str]]] = None):
    """Offer ``kind`` as a way to run ``product``. See :class:`_Candidate` for ``make`` and ``unavailable``.

    Every product must offer ``float``, the reference every other kind is timed against.
    """
    if kind not in MODES or kind == 'auto':
        raise ValueError(f'kernel kind must be one of {MODES[1:]}, got {kind!r}')
    with _lock:
        _registry.setdefault(product, {})[kind] = _Candidate(make, unavailable or (lambda *a: None))
        for key in [k for k in _choices if k[0] == product]:
            del _choices[key]


def get_mode() -> str:
    """The kind forced by :func:`set_mode` or ``TIMM_BINARYVIT_KERNELS``, else ``'auto'``."""
    mode = _mode_override or os.environ.get(ENV_MODE, '').strip().lower() or 'auto'
    if mode not in MODES:
        raise ValueError(f'{ENV_MODE}={mode!r} is not one of {", ".join(MODES)}')
    return mode


def set_mode(mode: Optional[str]) -> None:
    """Force one kind of kernel for every product (``None`` returns to the environment / ``auto``)."""
    global _mode_override
    if mode is not None and mode not in MODES:
        raise ValueError(f'kernel mode must be one of {", ".join(MODES)}, got {mode!r}')
    _mode_override = mode


@contextlib.contextmanager
def kernel_mode(mode: Optional[str]):
    """``with kernel_mode('float'): ...`` runs the block with that mode and restores the previous one."""
    global _mode_override
    previous = _mode_override
    set_mode(mode)
    try:
        yield
    finally:
        _mode_override = previous


def shape_class(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The class a shape is measured for: its first dimension (rows) rounded up to a power of two and
    capped at :data:`MEASURE_ROWS`, the others exact."""
    rows = max(1, int(shape[0]))
    return (min(1 << (rows - 1).bit_length(), MEASURE_ROWS),) + tuple(int(s) for s in shape[1:])


def dispatch_mode_active() -> bool:
    """Whether a TorchDispatchMode is active: op-level accounting (timm_binaryvit.profile,
    FlopCounterMode) must see the plain float operators."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode() is not None


def choose(product: str, shape: Tuple[int, ...], device=None, dtype: torch.dtype = torch.float32) -> str:
    """The kind of kernel that runs ``product`` for operands of ``shape`` on ``device``.

    ``float`` off the CPU, while ``torch.compile`` traces (the compiler picks its own kernels; the
    custom operator ``timm_binaryvit::sign_linear`` asks again when the compiled graph runs), and inside a
    TorchDispatchMode (op-level profilers count the plain float operators); otherwise the forced
    mode, or the measured choice for the shape's class.
    """
    if torch.compiler.is_compiling():
        return 'float'
    device_type = device.type if isinstance(device, torch.device) else torch.device(device or 'cpu').type
    if device_type != 'cpu' or dispatch_mode_active():
        return 'float'
    key = (product, shape_class(shape), str(dtype).replace('torch.', ''), get_mode(), torch.get_num_threads())
    found = _choices.get(key)
    if found is not None:
        return found.kind
    with _lock:
        found = _choices.get(key)
        if found is None:
            found = _decide(product, key, dtype, torch.device(device_type))
            _choices[key] = found
    return found.kind


def _decide(product: str, key: tuple, dtype: torch.dtype, device: torch.device) -> Choice:
    candidates = _registry.get(product)
    if not candidates or 'float' not in candidates:
        raise KeyError(f'no float kernel registered for product {product!r}')
    shape, dtype_name, mode = key[1], key[2], key[3]
    if mode != 'auto':
        if mode in candidates:
            why = candidates[mode].unavailable(shape, dtype, device)
            if why is None:
                return Choice(product, shape, dtype_name, mode, f'forced by mode {mode!r}')
            return Choice(product, shape, dtype_name, 'float', f'mode {mode!r} forced, but {why}')
        return Choice(product, shape, dtype_name, 'float', f'mode {mode!r} forced, but {product} has no such kernel')
    disk_key = _disk_key(key)
    cached = _disk_cache().get(disk_key)
    if cached in candidates and candidates[cached].unavailable(shape, dtype, device) is None:
        return Choice(product, shape, dtype_name, cached, f'measured earlier ({os.environ.get(ENV_CACHE)})')
    skipped: Dict[str, str] = {}
    runs: Dict[str, Callable[[], object]] = {}
    with torch.no_grad():
        runs['float'] = candidates['float'].make(shape, dtype, device)  # first: the others are held to it
        for kind, candidate in candidates.items():
            if kind == 'float':
                continue
            why = candidate.unavailable(shape, dtype, device)
            if why is not None:
                skipped[kind] = why
                continue
            try:
                runs[kind] = candidate.make(shape, dtype, device)
            except (RuntimeError, NotImplementedError) as e:  # a kernel that rejects this shape or dtype
                skipped[kind] = f'failed: {str(e).splitlines()[0][:80]}'
        times = _time_interleaved(runs, skipped)
    best = min(times, key=times.get)
    if best != 'float' and times[best] > MARGIN * times['float']:
        best = 'float'
    parts = [f'{k} {v * 1e3:.3g} ms' for k, v in sorted(times.items(), key=lambda kv: kv[1])]
    reason = 'measured: ' + ', '.join(parts)
    if skipped:
        reason += '; not tried: ' + ', '.join(f'{k} ({v})' for k, v in skipped.items())
    _remember(disk_key, best)
    return Choice(product, shape, dtype_name, best, reason, times)


def _time_interleaved(runs: Dict[str, Callable[[], object]], failed: Dict[str, str]) -> Dict[str, float]:
    """The fastest of up to :data:`TIMED_RUNS` timed runs of each candidate, after one warm-up each.

    The candidates take turns, run by run: on a shared machine a slow run measures the neighbours (in whole
    scheduler slices), and a burst of their load then falls on every candidate alike instead of on whichever
    was being timed. A candidate whose run takes over :data:`GIVE_UP` times float32's best so far is timed no
    more (on some CPUs int8 is 40x slower, and that is decided by one run). One that raises is dropped."""
    best: Dict[str, float] = {}
    active = []
    for kind, fn in runs.items():
        try:
            fn()
        except (RuntimeError, NotImplementedError) as e:
            if kind == 'float':
                raise
            failed[kind] = f'failed: {str(e).splitlines()[0][:80]}'
            continue
        active.append(kind)
    for _ in range(TIMED_RUNS):
        for kind in list(active):
            start = timer()
            runs[kind]()
            best[kind] = min(best.get(kind, math.inf), timer() - start)
            if kind != 'float' and best[kind] > GIVE_UP * best['float']:
                active.remove(kind)
    return best


def _disk_key(key: tuple) -> str:
    info = cpu_info()
    return '|'.join([info['model'], torch.__version__, isa_limits(), *map(str, key)])


def _disk_cache() -> Dict[str, str]:
    global _disk
    path = os.environ.get(ENV_CACHE)
    if not path:
        return {}
    if _disk is None:
        try:
            with open(path, encoding='utf-8') as f:
                loaded = json.load(f)
            _disk = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):  # no file yet, or not ours: start afresh, never fail the model
            _disk = {}
    return _disk


def _remember(disk_key: str, kind: str) -> None:
    path = os.environ.get(ENV_CACHE)
    if not path:
        return
    cache = _disk_cache()
    cache[disk_key] = kind
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp')
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except OSError:
        pass  # a cache that cannot be written only costs a measurement next time


def choices() -> List[Choice]:
    """Every decision this process has made, in the order made."""
    return list(_choices.values())


def clear_cache() -> None:
    """Forget every decision of this process (the on-disk file is left alone)."""
    global _disk
    with _lock:
        _choices.clear()
        _disk = None


_cpu_info: Optional[Dict[str, object]] = None


def cpu_info() -> Dict[str, object]:
    """The processor's model name, the flags that decide kernel speed, torch's CPU capability, threads."""
    global _cpu_info
    if _cpu_info is None:
        model, flags = platform.processor() or platform.machine(), set()
        family_model = {}
        try:
            with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
                for line in f:
                    name, _, value = line.partition(':')
                    name = name.strip()
                    if name == 'model name' and model in ('', platform.machine(), platform.processor()):
                        model = value.strip()
                    elif name in ('cpu family', 'model') and name not in family_model:
                        family_model[name] = value.strip()
                    elif name in ('flags', 'Features') and not flags:
                        flags = set(value.split())
        except OSError:
            pass
        if len(family_model) == 2:
            # virtual machines often report a bare 'AMD EPYC': family and model tell Zen 3 from Zen 4
            model = f"{model} (family {family_model['cpu family']}, model {family_model['model']})"
        _cpu_info = {
            'model': model or 'unknown',
            'flags': [f for f in _FLAGS if f in flags],
            'missing_flags': [f for f in _FLAGS if f not in flags],
            'capability': torch.backends.cpu.get_cpu_capability(),
            'torch': torch.__version__,
        }
    return dict(_cpu_info, threads=torch.get_num_threads())


# Settings that keep torch, oneDNN or the packed kernels below what the CPU offers (e.g. to run an
# AVX2-only instruction set on an AVX-512 machine): a figure measured under them must say so.
ISA_LIMITS = ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'DNNL_MAX_CPU_ISA', 'TIMM_BINARYVIT_PACKED_ISA')


def isa_limits() -> str:
    """The instruction-set limits set in the environment (``NAME=value ...``), or ``''``."""
    return ' '.join(f'{name}={os.environ[name]}' for name in ISA_LIMITS if os.environ.get(name, '').strip())


def describe_machine() -> str:
    """One line naming the CPU, the flags that matter, torch's capability, the thread count and any
    instruction-set limit set in the environment."""
    info = cpu_info()
    x86 = [f for f in info['flags'] if f not in ('asimd', 'sve')] or info['flags']
    limits = isa_limits()
    return (f'{info["model"]}; flags: {" ".join(x86) or "none of interest"}; torch {info["torch"]} '
            f'(CPU capability {info["capability"]}), {info["threads"]} threads'
            + (f'; instruction sets limited by {limits}' if limits else ''))


def report() -> str:
    """The machine, the mode, and every choice made so far with its reason and measured times."""
    lines = [f'CPU: {describe_machine()}',
             f'mode: {get_mode()} ({ENV_MODE}={os.environ.get(ENV_MODE, "unset")}; '
             f'cache file: {os.environ.get(ENV_CACHE, "none")})']
    made = choices()
    if not made:
        lines.append('no product has run yet in this process')
    for c in made:
        shape = 'x'.join(map(str, c.shape))
        lines.append(f'{c.product:<18} {shape:<16} {c.dtype:<8} -> {c.kind:<6} {c.reason}')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# The products of the training model: signs (M, K) times signs (N, K)^T.


def _random_signs(rows: int, cols: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    # A private generator: measuring must not move the global random state.
    g = torch.Generator(device='cpu').manual_seed(seed)
    return torch.randint(0, 2, (rows, cols), generator=g).mul_(2).sub_(1).to(device=device, dtype=dtype)


def _float_sign_mm(shape, dtype, device):
    m, k, n = shape
    a, b = _random_signs(m, k, dtype, device, 0), _random_signs(n, k, dtype, device, 1)
    return lambda: torch.mm(a, b.t())


def _int8_sign_mm(shape, dtype, device):
    m, k, n = shape
    a, b = _random_signs(m, k, torch.int8, device, 0), _random_signs(n, k, torch.int8, device, 1)
    bt = b.t()
    return lambda: torch._int_mm(a, bt)


def _int8_unavailable(shape, dtype, device) -> Optional[str]:
    if not hasattr(torch, '_int_mm'):
        return 'this torch has no torch._int_mm'
    if device.type != 'cpu':
        return 'int8 products are only used on the CPU'
    return None


#: ``sign_mm``: the binary products of the training model's forward pass, ``(M, K) @ (N, K)^T``.
register('sign_mm', 'float', _float_sign_mm)
register('sign_mm', 'int8', _int8_sign_mm, _int8_unavailable)
