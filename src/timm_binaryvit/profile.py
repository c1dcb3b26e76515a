"""Operation and size accounting for binary vision transformers: BOPs, FLOPs, OPs, deployed size.

``profile(model)`` runs one forward pass of the model as built (batch 1, by default on the
``meta`` device, so no arithmetic is done and it takes well under a second) and counts every
multiply-accumulate (MAC) where it happens:

* the counter watches the ATen operators the forward pass calls (a
  ``TorchDispatchMode``): matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``mv``,
  ``dot``), convolutions and the fused scaled-dot-product-attention kernels. Their MACs
  follow from the operand shapes (``M*K*N`` for a product, ``outputs * fan-in`` for a
  convolution); a bias added by ``addmm`` or a convolution is not a MAC;
* forward hooks on every module keep track of which module each operator runs in, which
  names the layer and decides whether the MACs are binary:

  - **BOPs** (binary operations): products whose two operands are both binary. These are the
    products inside :class:`~timm_binaryvit.layers.BinaryLinear` (``sign(x)`` times the binary
    weight) and :class:`~timm_binaryvit.layers.BinaryConv2d`, and the two attention products
    that :class:`~timm_binaryvit.blocks.BinaryAttention` computes itself: ``sign(Q) sign(K)^T``
    and ``P_b sign(V)``. ``P_b`` is the attention probability binarised by BiT's elastic
    binariser to ``{0, s}`` with one scalar ``s`` per layer; ``P_b V = s * (B V)`` with
    ``B`` in ``{0, 1}``, so it is a binary product followed by one scaling, and is counted as
    binary, as the binary-ViT literature (BiT, BinaryViT) counts it;
  - **FLOPs**: every other MAC, i.e. full-precision products: the stem convolution, the
    full-precision stage transitions, the classifier, and any full-precision matmul a model
    may contain (a full-precision attention, for instance).

  Scale factors are not MACs either: the per-row weight scale ``a`` of a binary layer and
  the scale ``s`` of ``P_b`` multiply once per output element and fold into the BatchNorm
  (or the softmax scale) that follows.

* **OPs** = BOPs / 64 + FLOPs, the convention of ReActNet (Liu et al., ECCV 2020) and Bi-Real
  Net that BinaryViT's tables use (64 binary MACs per 64-bit XNOR-popcount instruction).

All counts are MACs per image ("FLOPs" in the sense of the DeiT and ReActNet papers, where
DeiT-S has 4.6 G). ``torch.utils.flop_counter.FlopCounterMode`` reports twice these numbers
(it counts a MAC as two floating-point operations).

**Not counted** (element-wise or reductions, no MACs): BatchNorm / LayerNorm, RPReLU and
PReLU, shifts (``x + b``), the sign function, the weight binarisation (mean, abs, sign),
the affine transformations, softmax, the attention scale ``1/sqrt(d)``, the elastic
binariser, average pooling (multi-branch pooling, key/value reduction, the transition
shortcut, global average pooling), nearest upsampling, channel repeat / pool shortcuts,
position embeddings, residual additions, bias additions, activations such as GELU.

**Parameters and size.** ``params_binary`` counts the weights of binary layers
(``BinaryLinear.weight``, ``BinaryConv2d.weight``), stored as 1 bit each when deployed;
``params_fp`` counts every other parameter (stem, classifier, norms, shifts, RPReLU,
affines, position embeddings, class token, the binariser scale), 32 bits each.
``size_bits = params_binary + 32 * params_fp``. The weight scales ``a`` are derived from the
weights and fold into the BatchNorm after each binary layer, so they cost nothing.
BatchNorm running statistics are buffers, not parameters, and are **not counted**: in a
deployed model each BatchNorm folds into one per-channel scale and bias, which the
BatchNorm's own ``weight`` and ``bias`` parameters already count (``.buffers`` reports the
number of buffer elements left out). ``MB`` is 10^6 bytes.

Everything is read from the model as built (shapes of the tensors the forward pass really
produces), so it holds for any configuration and input size; a model whose forward does
not run on the ``meta`` device is profiled on its own device instead, with a random input.

Use :func:`profile`. It returns a :class:`ProfileResult` (defined in
:mod:`timm_binaryvit.profile_result`): :meth:`ProfileResult.format` gives the table of the
``timm-binaryvit profile`` command, :meth:`ProfileResult.summary` (or :func:`profile_summary`)
the one-line summary of ``timm-binaryvit list``; :func:`models_markdown_table` gives the README's
model table, and :func:`timm_binaryvit.plot.plot_profile` the picture of
``timm-binaryvit profile MODEL --plot FILE.png``. The source repository's docs/profile.md
explains the conventions with examples.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
# TorchDispatchMode: the mechanism torch.utils.flop_counter.FlopCounterMode is built on.
from torch.utils._python_dispatch import TorchDispatchMode

from .batchnorm import TokenBatchNorm
from .blocks import BinaryAttention
from .layers import BinaryConv2d, BinaryLinear
from .profile_result import BINARY, BOPS_PER_OP, FULL_PRECISION, LayerProfile, ProfileResult

# The result types and their constants are defined in profile_result and are part of this module's
# interface too: profile() returns them.
__all__ = [
    'profile', 'profile_summary', 'models_markdown_table', 'ProfileResult', 'LayerProfile',
    'BINARY', 'FULL_PRECISION', 'BINARY_LAYERS', 'BINARY_PRODUCT_MODULES', 'BOPS_PER_OP',
]

#: modules whose weight is binary (1 bit deployed) and whose products are binary.
BINARY_LAYERS: Tuple[type, ...] = (BinaryLinear, BinaryConv2d)

#: modules whose *own* forward multiplies binary operands, with the names of those products in
#: call order: BinaryAttention computes sign(Q) sign(K)^T, then P_b sign(V).
BINARY_PRODUCT_MODULES: Dict[type, Tuple[str, ...]] = {BinaryAttention: ('qk', 'pv')}

#: modules profiled as one unit although they have children (TokenBatchNorm wraps a BatchNorm1d).
_ATOMIC_MODULES: Tuple[type, ...] = (TokenBatchNorm,)

_KIND_OF_PRODUCT = {'qk': 'attn QK^T', 'pv': 'attn PV'}


# ---------------------------------------------------------------------------------------------
# MACs of the ATen operators


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _mm_macs(args, out) -> int:  # mm(a[M,K], b[K,N]), bmm(a[B,M,K], b[B,K,N])
    a, b = args[0], args[1]
    return _numel(a.shape) * int(b.shape[-1])


def _addmm_macs(args, out) -> int:  # addmm(bias, a, b), baddbmm(bias, a, b): the bias add is no MAC
    a, b = args[1], args[2]
    return _numel(a.shape) * int(b.shape[-1])


def _mv_macs(args, out) -> int:  # mv(a[M,K], v[K]), dot(a[K], b[K])
    return _numel(args[0].shape)


def _conv_macs(args, out) -> int:
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups).
    # weight is (out, in / groups, *kernel): every output element takes in / groups * kernel MACs;
    # transposed, it is (in, out / groups, *kernel): every input element feeds out / groups * kernel.
    x, weight = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    return _numel((x if transposed else out).shape) * _numel(weight.shape[1:])


def _sdpa_macs(args, out) -> int:  # q[..., L, E], k[..., S, E], v[..., S, Ev]
    q, k, v = args[0], args[1], args[2]
    return _numel(q.shape[:-1]) * int(k.shape[-2]) * (int(q.shape[-1]) + int(v.shape[-1]))


def _op_table() -> Dict[Any, Tuple[str, Callable]]:
    aten = torch.ops.aten
    table = {}
    for name, label, fn in [
        ('mm', 'matmul', _mm_macs), ('addmm', 'matmul', _addmm_macs), ('bmm', 'matmul', _mm_macs),
        ('baddbmm', 'matmul', _addmm_macs), ('mv', 'matmul', _mv_macs), ('dot', 'matmul', _mv_macs),
        ('convolution', 'conv', _conv_macs), ('_convolution', 'conv', _conv_macs),
        ('_scaled_dot_product_flash_attention', 'sdpa', _sdpa_macs),
        ('_scaled_dot_product_flash_attention_for_cpu', 'sdpa', _sdpa_macs),
        ('_scaled_dot_product_efficient_attention', 'sdpa', _sdpa_macs),
        ('_scaled_dot_product_cudnn_attention', 'sdpa', _sdpa_macs),
        ('_scaled_dot_product_fused_attention_overrideable', 'sdpa', _sdpa_macs),
    ]:
        try:
            table[getattr(aten, name)] = (label, fn)
        except (AttributeError, RuntimeError):  # not in this build of torch
            pass
    return table


_OPS = _op_table()


# ---------------------------------------------------------------------------------------------
# Counting


class _Counter(TorchDispatchMode):
    """Counts the MACs of every matrix product / convolution and files them under the layer
    that is running (the innermost module on the hook-maintained stack)."""

    def __init__(self, profiler: '_Profiler'):
        super().__init__()
        self.profiler = profiler

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        entry = _OPS.get(func.overloadpacket)
        if entry is not None:
            label, macs = entry
            result = out[0] if isinstance(out, (tuple, list)) else out
            self.profiler.count(label, macs(args, result), tuple(result.shape))
        return out


class _Profiler:
    """Rows, the hook-maintained module stack, and the order in which the pass reached things."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: Dict[str, LayerProfile] = {}
        self.sort_key: Dict[str, Tuple[str, Any]] = {}  # row -> ('module', name) or ('seq', n)
        self.first_call: Dict[str, int] = {}  # module name -> when the pass first entered it
        self.seq = 0
        self.stack: List[Tuple[str, nn.Module, Dict[str, int]]] = []
        self.handles: List[Any] = []
        # Units: modules that make one row (leaves, and wrappers such as TokenBatchNorm); modules
        # inside a unit are not tracked separately.
        self.units: Dict[int, str] = {}
        self.inside_unit = set()
        for name, module in model.named_modules():
            if id(module) in self.inside_unit:
                continue
            children = list(module.children())
            if not children or isinstance(module, _ATOMIC_MODULES):
                self.units[id(module)] = name
                self.inside_unit.update(id(m) for m in module.modules() if m is not module)

    def _tracked(self) -> Iterable[Tuple[str, nn.Module]]:
        for name, module in self.model.named_modules():
            if id(module) not in self.inside_unit:
                yield name, module

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def record(self, name: str, kind: str, sort_key: Tuple[str, Any]) -> LayerProfile:
        rec = self.records.get(name)
        if rec is None:
            rec = self.records[name] = LayerProfile(name, kind)
            self.sort_key[name] = sort_key
        return rec

    # -- parameters -----------------------------------------------------------------------------

    def count_parameters(self):
        """Attribute every parameter (once, even if shared) to its unit's row, or, for a parameter
        held directly by a composite module (position embeddings, class token), to a row of its own."""
        seen = set()
        for name, module in self._tracked():
            is_unit = id(module) in self.units
            for pname, p in module.named_parameters(recurse=is_unit):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if is_unit:
                    rec = self.record(name, type(module).__name__, ('module', name))
                else:
                    rec = self.record(_join(name, pname), 'Parameter', ('module', name))
                    rec.output_shape = tuple(p.shape)
                if isinstance(module, BINARY_LAYERS) and pname == 'weight':
                    rec.params_binary += p.numel()
                    rec.type = BINARY
                else:
                    rec.params_fp += p.numel()

    # -- hooks ----------------------------------------------------------------------------------

    def attach(self):
        for name, module in self._tracked():
            self.handles.append(module.register_forward_pre_hook(self._pre_hook(name, module)))
            self.handles.append(module.register_forward_hook(self._post_hook(name, module)))

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _pre_hook(self, name: str, module: nn.Module):
        def hook(mod, args):
            if name not in self.first_call:
                self.first_call[name] = self._next()
            self.stack.append((name, module, {}))
        return hook

    def _post_hook(self, name: str, module: nn.Module):
        def hook(mod, args, output):
            while self.stack and self.stack[-1][1] is not module:  # a child that raised, caught above
                self.stack.pop()
            if self.stack:
                self.stack.pop()
            if id(module) in self.units:
                rec = self.record(name, type(module).__name__, ('module', name))
                rec.calls += 1
                shape = _first_shape(output)
                if shape is not None:
                    rec.output_shape = shape
        return hook

    def count(self, label: str, macs: int, shape: Tuple[int, ...]):
        """File ``macs`` of one operator (``label``: matmul / conv / sdpa) under the running layer."""
        name, module, per_call = self.stack[-1] if self.stack else ('', self.model, {})
        if id(module) in self.units:
            # A leaf layer: binary if it is a binary layer (its product is sign(x) times binary weight).
            rec = self.record(name, type(module).__name__, ('module', name))
            binary = isinstance(module, BINARY_LAYERS)
        else:
            # A product in a composite module's own forward: binary only in the modules that
            # multiply binary operands themselves (BinaryAttention), named in call order.
            products = next((v for k, v in BINARY_PRODUCT_MODULES.items() if isinstance(module, k)), None)
            binary = products is not None and label == 'matmul'
            if binary:
                index = per_call.get('products', 0)
                per_call['products'] = index + 1
                suffix = products[index] if index < len(products) else f'matmul{index}'
                kind = _KIND_OF_PRODUCT.get(suffix, 'binary matmul')
            else:
                suffix = kind = label
            rec = self.record(_join(name, suffix), kind, ('seq', self._next()))
            rec.output_shape = shape
            rec.calls += 1
        if binary:
            rec.bops += macs
            rec.type = BINARY
        else:
            rec.flops += macs

    def result(self, model_name: str, input_size: Tuple[int, ...], device: str) -> ProfileResult:
        def key(item):
            index, rec = item
            kind, value = self.sort_key[rec.name]
            when = self.first_call.get(value, math.inf) if kind == 'module' else value
            return when, index

        rows = [r for r in self.records.values() if r.has_macs or r.params]
        rows = [r for _, r in sorted(enumerate(rows), key=key)]
        buffers = sum(b.numel() for b in {id(b): b for b in self.model.buffers()}.values())
        return ProfileResult(model_name, tuple(input_size), rows, buffers, device)


def _join(prefix: str, name: str) -> str:
    return f'{prefix}.{name}' if prefix else name


def _first_shape(output) -> Optional[Tuple[int, ...]]:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        for o in output:
            s = _first_shape(o)
            if s is not None:
                return s
    if isinstance(output, dict):
        for o in output.values():
            s = _first_shape(o)
            if s is not None:
                return s
    return None


def _model_input_size(model: nn.Module) -> Tuple[int, ...]:
    """The ``(C, H, W)`` the model was built for: its ``img_size`` (or its patch embedding's, as in
    timm's ViTs) and ``in_chans``, else its pretrained config, else ``(3, 224, 224)``."""
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    default = tuple(cfg.get('input_size') or (3, 224, 224))
    img_size = getattr(model, 'img_size', None)
    if img_size is None:
        img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is None:
        return default
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = getattr(model, 'in_chans', None)
    in_chans = in_chans if isinstance(in_chans, int) else default[0]
    return (in_chans,) + tuple(int(s) for s in size)


def _normalise_input_size(model: nn.Module, input_size) -> Tuple[int, ...]:
    if input_size is None:
        return _model_input_size(model)
    if isinstance(input_size, int):
        return (_model_input_size(model)[0], input_size, input_size)
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) == 2 and isinstance(getattr(model, 'in_chans', None), int):
        return (model.in_chans,) + input_size
    return input_size


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def _dtype_of(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _named_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _on_meta(model: nn.Module) -> bool:
    tensors = _named_tensors(model)
    return bool(tensors) and all(t.is_meta for t in tensors.values())


def _run(model: nn.Module, input_size: Tuple[int, ...], device: Optional[str], profiler: _Profiler) -> str:
    """One batch-1 forward pass under the counter; returns the device it ran on."""
    dtype = _dtype_of(model)
    tensors = _named_tensors(model)
    on_meta = _on_meta(model)
    if device == 'meta' or on_meta:
        x = torch.empty((1,) + tuple(input_size), device='meta', dtype=dtype)
        with torch.no_grad(), _Counter(profiler):
            if on_meta:
                model(x)
            else:  # meta stand-ins for the weights: nothing copied, no arithmetic done
                stand_ins = {k: torch.empty_like(v, device='meta') for k, v in tensors.items()}
                torch.func.functional_call(model, stand_ins, (x,), strict=False)
        return 'meta'
    if device is None:
        device = next(iter(tensors.values())).device if tensors else torch.device('cpu')
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((1,) + tuple(input_size), device=device, dtype=dtype, generator=generator)
    with torch.no_grad(), _Counter(profiler):
        model(x)
    return str(device)


def _profile_once(model: nn.Module, input_size: Tuple[int, ...], device: Optional[str]) -> Tuple[str, _Profiler]:
    profiler = _Profiler(model)
    profiler.count_parameters()
    profiler.attach()
    try:
        return _run(model, input_size, device, profiler), profiler
    finally:
        profiler.detach()


def profile(
        model: Union[nn.Module, str],
        input_size: Optional[Union[int, Sequence[int]]] = None,
        device: Optional[Union[str, torch.device]] = 'meta',
        model_name: Optional[str] = None,
) -> ProfileResult:
    """Count BOPs, FLOPs, OPs, binary and full-precision parameters and the deployed size of ``model``.

    Args:
        model: a model (any ``nn.Module`` taking one image batch), or a registered model name,
            which is then built on the meta device, without weights.
        input_size: the shape of one input without the batch dimension, ``(C, H, W)`` for an
            image model (``(H, W)`` or ``H`` also accepted where the model has ``in_chans``); by
            default the size the model was built for, ``(3, 224, 224)`` for every registered model.
        device: ``'meta'`` (default) runs the pass on meta stand-ins for the weights, which do no
            arithmetic; if the model's forward does not run on meta, it falls back to the model's
            own device. ``None`` (or a device) runs it there, with a random input.
        model_name: the name shown in the result; by default the timm architecture name.

    Returns:
        a :class:`ProfileResult`: ``.layers`` (per-layer rows) and the totals ``.bops``, ``.flops``,
        ``.ops``, ``.params_binary``, ``.params_fp``, ``.size_bits``, per image. The model is left
        as it was (train/eval mode, weights, no hooks left).
    """
    if isinstance(model, str):
        import timm
        model_name = model_name or model
        model = timm.create_model(model, pretrained=False, device='meta')
    input_size = _normalise_input_size(model, input_size)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            ran_on, profiler = _profile_once(model, input_size, device)
        except (NotImplementedError, RuntimeError):
            # an operator without a meta kernel, or a forward that reads tensor values
            if device != 'meta' or _on_meta(model):
                raise
            ran_on, profiler = _profile_once(model, input_size, None)
    finally:
        for m, training in modes.items():
            m.training = training
    return profiler.result(model_name or _model_name(model), input_size, ran_on)


def profile_summary(model: Union[nn.Module, str], input_size=None) -> str:
    """One line for ``timm-binaryvit list``: ``22.49M params (94.2% binary), OPs 0.70e8, 7.83 MB``."""
    return profile(model, input_size).summary()


def models_markdown_table(model_names: Optional[Iterable[str]] = None) -> str:
    """The README table: every registered model (``timm.list_models('binary*')``) with its
    parameters, binary share, BOPs, FLOPs, OPs and deployed size, counted at its default input."""
    import timm
    names = list(model_names) if model_names is not None else timm.list_models('binary*')
    lines = ['| model | params | binary params | BOPs (1e9) | FLOPs (1e8) | OPs (1e8) | size (MB) |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for name in names:
        r = profile(name)
        lines.append(f'| `{name}` | {r.params / 1e6:.2f}M | {100 * r.binary_share:.1f}% | {r.bops / 1e9:.2f} '
                     f'| {r.flops / 1e8:.3f} | {r.ops / 1e8:.3f} | {r.size_mb:.2f} |')
    return '\n'.join(lines)
