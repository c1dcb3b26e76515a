"""The packed 1-bit file format: :func:`export_packed` and :func:`load_packed`.

A packed file is a safetensors file: every binary weight as its signs, 8 per byte, with one
scale per output channel and the positions of its exact zeros; everything else under its own
name in its own dtype; metadata naming the format, its version, the encoding
(:data:`PACKED_ENCODING`), the architecture and its constructor arguments, so that the file
alone rebuilds the model. ``load_packed(path)`` returns the training model (it fine-tunes);
``load_packed(path, deployed=True)`` the deployed one, built from the file's bits without ever
materialising the float binary weights.
"""
import json
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..binary_deit import BinaryDeiT
from ..binaryvit import BinaryViT
from .models import deploy, is_deployed
from .runtime import SignBits

__all__ = ['PACKED_FORMAT', 'PACKED_FORMAT_VERSION', 'PACKED_ENCODING', 'PackedFormatError', 'export_packed',
           'load_packed', 'read_packed_metadata', 'format_size_report', 'check_rebuilds']

PACKED_FORMAT = 'timm-binaryvit-packed'
PACKED_FORMAT_VERSION = 1

#: How the packed tensors are encoded; written into every file's metadata as ``encoding``.
PACKED_ENCODING = {
    'layout': 'each binary weight W of shape (out, ...) is stored as three tensors: <name>.bits (uint8, '
              'shape (out, ceil(n / 8)), n = the product of the other dims of W, taken in row-major order), '
              '<name>.scale (one per output channel, in the dtype of W) and <name>.zeros (int64 flat indices)',
    'bit_order': 'big',
    'bit_order_meaning': 'element j of an output channel is bit (7 - j % 8) of byte j // 8 of that channel '
                         '(numpy.packbits(..., axis=-1, bitorder="big")); each channel starts on a new byte and '
                         'the padding bits are 0',
    'bit_1': '+1',
    'bit_0': '-1',
    'zeros': '<name>.zeros lists the flat indices (row-major over the original shape) of the elements whose '
             'sign is 0 (the forward uses sign(0) = 0); they are stored as bit 0 and must be set to 0 after '
             'unpacking; usually empty',
    'effective_weight': 'W_eff[o] = scale[o] * value[o]: exactly the weight the model multiplies by',
    'binarization': {
        'linear': 'value = sign(W - mean over the input dim of W), scale = mean over the input dim of |W|',
        'conv2d': 'value = sign(W), scale = mean over (in, kh, kw) of |W|',
    },
    'other_tensors': 'every other state-dict entry is stored under its own name in its own dtype',
}

_CLASSES = {'BinaryViT': BinaryViT, 'BinaryDeiT': BinaryDeiT}


class PackedFormatError(ValueError):
    """A file given to :func:`load_packed` is not a valid packed model; the message names the file and the problem."""


def _class_name(model: nn.Module) -> str:
    for name, cls in _CLASSES.items():
        if isinstance(model, cls):
            return name
    if is_deployed(model):
        raise TypeError('export_packed() needs the training model, not a deployed one (deploy() folds the '
                        'BatchNorms into the binary weights, which the packed format keeps apart)')
    raise TypeError(f'export_packed() takes a BinaryViT or BinaryDeiT model of timm_binaryvit, '
                    f'got {type(model).__name__}')


def _binary_layers(model: nn.Module) -> Dict[str, Tuple[nn.Module, str]]:
    """State-dict key of every binary weight -> (layer, kind)."""
    from ..layers import BinaryConv2d, BinaryLinear
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, BinaryLinear):
            found[f'{name}.weight'] = (module, 'linear')
        elif isinstance(module, BinaryConv2d):
            found[f'{name}.weight'] = (module, 'conv2d')
    return found


def _build(cls_name: str, architecture: str, args: Dict[str, Any], device=None) -> nn.Module:
    import timm
    if architecture and timm.is_model(architecture):
        try:
            model = timm.create_model(architecture, pretrained=False, device=device, **args)
        except TypeError:  # an entrypoint that fixes one of the arguments itself: build the class directly
            model = None
        if model is not None and type(model).__name__ == cls_name:
            return model
    if cls_name not in _CLASSES:
        raise KeyError(f'unknown model class {cls_name!r} (expected one of {sorted(_CLASSES)})')
    return _CLASSES[cls_name](device=device, **args)


def check_rebuilds(model: nn.Module, architecture: str, args: Dict[str, Any], path: Optional[str] = None) -> None:
    """Raise ``ValueError`` unless ``architecture`` (or ``model``'s class) built from ``args`` on the meta
    device has exactly ``model``'s state-dict keys and shapes; ``path`` names the file in the message."""
    cls_name = _class_name(model)
    where = f'{path}: ' if path else ''
    try:
        rebuilt = _build(cls_name, architecture, dict(args), device='meta')
    except Exception as e:
        raise ValueError(f'{where}the recorded arguments {dict(args)} do not build {architecture or cls_name}: '
                         f'{type(e).__name__}: {e}') from e
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if ours != theirs:
        diff = sorted(set(ours) ^ set(theirs)) + sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
        raise ValueError(f'{where}{architecture or cls_name} rebuilt from its arguments {dict(args)} does not have '
                         f'the state dict of this model (was it pruned or modified after construction?): '
                         f'{len(diff)} entries differ, e.g. {", ".join(diff[:5])}')


def _float32_checkpoint_bytes(model: nn.Module) -> int:
    import safetensors.torch
    state = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}
    return len(safetensors.torch.save(state))


def export_packed(model: nn.Module, path: str) -> Dict[str, Any]:
    """Write ``model`` (a BinaryViT / BinaryDeiT training model) as a packed 1-bit safetensors file.

    Returns a dict: ``path``, ``packed_bytes`` (the file), ``float32_bytes`` (the model's float32
    state dict as a safetensors file), ``ratio`` (float32 / packed), ``binary_tensors``,
    ``binary_weights`` (number of 1-bit values), ``other_values``, ``zeros`` (exact zeros stored).
    """
    import safetensors.torch
    cls_name = _class_name(model)
    args = model.model_args()
    architecture = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or ''
    check_rebuilds(model, architecture, args, str(path))
    binary = _binary_layers(model)
    tensors: Dict[str, torch.Tensor] = {}
    entries: Dict[str, Any] = {}
    n_binary = n_zeros = n_other = 0
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key not in binary:
                tensors[key] = value.detach().cpu().contiguous()
                n_other += value.numel()
                continue
            rows = binary[key][0].binary_weight().detach()
            rows = rows.reshape(rows.shape[0], -1)
            signs = torch.sign(rows)
            scale = rows.abs().amax(dim=1)
            if not torch.equal(scale[:, None] * signs, rows):
                raise ValueError(f'{key}: the effective binary weight is not one scale per output channel '
                                 f'times a sign; cannot pack it')
            bits = SignBits.from_signs(signs.cpu())
            tensors.update({f'{key}.bits': bits.bits, f'{key}.scale': scale.cpu().contiguous(),
                            f'{key}.zeros': bits.zeros})
            entries[key] = dict(shape=list(value.shape), kind=binary[key][1],
                                dtype=str(value.dtype).replace('torch.', ''),
                                bits=f'{key}.bits', scale=f'{key}.scale', zeros=f'{key}.zeros')
            n_binary += signs.numel()
            n_zeros += bits.zeros.numel()
    metadata = {
        'format': PACKED_FORMAT,
        'format_version': str(PACKED_FORMAT_VERSION),
        'architecture': architecture,
        'model_class': cls_name,
        'model_args': json.dumps(args),
        'pretrained_cfg': json.dumps(getattr(model, 'pretrained_cfg', None) or {},
                                     default=lambda o: list(o) if isinstance(o, tuple) else str(o)),
        'encoding': json.dumps(PACKED_ENCODING),
        'packed': json.dumps(entries),
    }
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    packed_bytes = os.path.getsize(path)
    fp32 = _float32_checkpoint_bytes(model)
    return dict(path=str(path), packed_bytes=packed_bytes, float32_bytes=fp32, ratio=fp32 / packed_bytes,
                binary_tensors=len(entries), binary_weights=n_binary, other_values=n_other, zeros=n_zeros)


def format_size_report(info: Dict[str, Any]) -> str:
    """Two lines comparing the float32 checkpoint and the packed file, from :func:`export_packed`'s result."""
    return (f'float32 safetensors: {info["float32_bytes"]:,} bytes ({info["float32_bytes"] / 2 ** 20:.2f} MiB)\n'
            f'packed 1-bit file:   {info["packed_bytes"]:,} bytes ({info["packed_bytes"] / 2 ** 20:.2f} MiB), '
            f'{info["ratio"]:.1f}x smaller ({info["binary_weights"]:,} binary weights in {info["binary_tensors"]} '
            f'tensors, {info["other_values"]:,} other values)')


# ---------------------------------------------------------------------------------------------
# Reading


def read_packed_metadata(path: str) -> Dict[str, Any]:
    """The decoded metadata of a packed file (format, version, architecture, model_args, packed entries...)."""
    return _read_packed(path)[0]


def _read_packed(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    from safetensors import safe_open
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such packed model file')
    try:
        with safe_open(path, framework='pt') as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for truncated / corrupt files
        raise PackedFormatError(f'{path}: not a readable safetensors file (truncated or corrupt?): {e}') from e
    fmt = raw.get('format')
    if fmt != PACKED_FORMAT:
        raise PackedFormatError(
            f'{path}: not a {PACKED_FORMAT} file (its metadata has format={fmt!r}); packed files are written by '
            f'timm_binaryvit.export_packed, plain checkpoints load with timm.create_model / load_state_dict')
    try:
        version = int(raw.get('format_version', ''))
    except ValueError:
        raise PackedFormatError(f'{path}: bad format_version {raw.get("format_version")!r}') from None
    if version > PACKED_FORMAT_VERSION or version < 1:
        raise PackedFormatError(f'{path}: format version {version} is not supported by this timm_binaryvit '
                                f'(it reads versions 1 to {PACKED_FORMAT_VERSION}); upgrade timm_binaryvit')
    meta: Dict[str, Any] = dict(format=fmt, format_version=version, architecture=raw.get('architecture', ''),
                                model_class=raw.get('model_class', ''))
    for field in ('model_args', 'packed', 'pretrained_cfg', 'encoding'):
        if field not in raw:
            raise PackedFormatError(f'{path}: the metadata lacks {field!r}')
        try:
            meta[field] = json.loads(raw[field])
        except json.JSONDecodeError as e:
            raise PackedFormatError(f'{path}: the metadata field {field!r} is not valid JSON: {e}') from None
    if meta['encoding'].get('bit_order') != 'big':
        raise PackedFormatError(f'{path}: unsupported bit order {meta["encoding"].get("bit_order")!r}')
    if not isinstance(meta['packed'], dict) or not isinstance(meta['model_args'], dict):
        raise PackedFormatError(f'{path}: the metadata fields packed / model_args must be JSON objects')
    return meta, tensors


def _entry(path: str, key: str, entry: Dict[str, Any], tensors: Dict[str, torch.Tensor], layer: nn.Module,
           layer_kind: str) -> Tuple[SignBits, torch.Tensor, Tuple[str, ...]]:
    """(signs as bits, scale, tensor names) of one packed weight, validated against the file and the layer."""
    try:
        shape = [int(d) for d in entry['shape']]
        kind = entry['kind']
        names = entry['bits'], entry['scale'], entry['zeros']
    except (KeyError, TypeError, ValueError) as e:
        raise PackedFormatError(f'{path}: the packed entry {key!r} is malformed ({e!r})') from None
    if kind not in ('linear', 'conv2d') or len(shape) != (2 if kind == 'linear' else 4):
        raise PackedFormatError(f'{path}: the packed entry {key!r} has kind {kind!r} with shape {shape}')
    if list(layer.weight.shape) != shape or layer_kind != kind:
        raise PackedFormatError(f'{path}: {key!r} is stored as a {kind} weight of shape {shape}, but the model '
                                f'has a {layer_kind} weight of shape {list(layer.weight.shape)}')
    missing = [n for n in names if n not in tensors]
    if missing:
        raise PackedFormatError(f'{path}: {key!r} is listed as packed but the file lacks {missing}')
    bits, scale, zeros = (tensors[n] for n in names)
    out, n = shape[0], math.prod(shape[1:])
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (out, (n + 7) // 8):
        raise PackedFormatError(f'{path}: {names[0]!r} should be uint8 of shape {(out, (n + 7) // 8)} for a weight '
                                f'of shape {shape}, got {bits.dtype} {tuple(bits.shape)}')
    if not scale.is_floating_point() or tuple(scale.shape) != (out,):
        raise PackedFormatError(f'{path}: {names[1]!r} should be one float per output channel ({out}), got '
                                f'{scale.dtype} {tuple(scale.shape)}')
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise PackedFormatError(f'{path}: {names[1]!r} has negative or non-finite scales')
    if zeros.dtype != torch.int64 or zeros.dim() != 1:
        raise PackedFormatError(f'{path}: {names[2]!r} should be a 1-D int64 tensor, got {zeros.dtype} '
                                f'{tuple(zeros.shape)}')
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= out * n):
        raise PackedFormatError(f'{path}: {names[2]!r} has indices outside the weight ({out * n} elements)')
    return SignBits(bits.contiguous(), zeros, n), scale, names


def _latent_weight(signs: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype):
    """A latent weight ``(out, n)`` of ``dtype`` that the training model binarises back to exactly
    ``scale * signs``, and a bool per row saying whether that is guaranteed.

    Each row is ``v * g`` with integers ``v`` (all partial sums exact) and a power of two ``g``
    chosen so that the row's mean absolute value, as torch computes it (sum, then divide),
    rounds exactly to the stored scale. Linear rows with exact zeros get a zero row sum so that
    the centring leaves those entries exactly 0. Magnitudes stay close to the scale, like the
    ``±a`` a trained latent weight binarises to, so the result also fine-tunes normally.
    """
    out, n = signs.shape
    bits = 1 - int(round(math.log2(torch.finfo(dtype).eps)))
    a = scale.to(dtype)
    a64 = a.to(torch.float64)
    pos = (signs > 0).sum(1)
    neg = (signs < 0).sum(1)
    nz = pos + neg
    has_zero = nz < n
    zero_sum = (kind == 'linear') & has_zero & (pos > 0) & (neg > 0)
    # unit g: a power of two putting the target sum a * n in [2^(bits-1), 2^bits) units
    target = a64 * n
    safe = torch.where(target > 0, target, torch.ones_like(target))
    g = torch.pow(2.0, torch.floor(torch.log2(safe)) - (bits - 1))
    base = torch.round(target / g).to(torch.int64)
    offsets = torch.tensor([0, -1, 1, -2, 2, -3, 3, -4, 4], dtype=torch.int64)
    step = torch.where(zero_sum, 2, 1)
    base = torch.where(zero_sum, (base // 2) * 2, base)
    cand = base[:, None] + offsets[None, :] * step[:, None]  # (out, 9)
    hit = (cand.to(torch.float64) * g[:, None]).to(dtype) / n == a[:, None]
    ok = hit.any(dim=1)
    S = torch.where(ok, cand.gather(1, hit.to(torch.int8).argmax(dim=1)[:, None]).squeeze(1), base)

    def spread(total: torch.Tensor, sel: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        # magnitudes q or q + 1 over the entries that carry them (the first r of them get q + 1)
        count = count.clamp(min=1)[:, None]
        q, r = total[:, None] // count, total[:, None] % count
        rank = torch.cumsum(sel.to(torch.int64), dim=1) - 1
        return torch.where(sel, q + (rank < r).to(torch.int64), torch.zeros_like(rank))

    is_pos, is_neg = signs > 0, signs < 0
    half = S // 2
    mags = torch.where(zero_sum[:, None], spread(half, is_pos, pos) + spread(half, is_neg, neg),
                       spread(S, is_pos | is_neg, nz))
    latent = signs * mags.to(torch.float64) * g[:, None]
    latent[(a64 == 0) | (nz == 0)] = 0.
    exact = ok & ((kind != 'linear') | ~has_zero | zero_sum)
    return latent.to(dtype), exact | (a64 == 0) | (nz == 0)


def _rebuild(path: str, meta: Dict[str, Any], device=None) -> nn.Module:
    try:
        model = _build(meta['model_class'], meta['architecture'], meta['model_args'], device=device)
    except Exception as e:
        raise PackedFormatError(f'{path}: cannot rebuild the model {meta["architecture"] or meta["model_class"]!r} '
                                f'from the stored arguments {meta["model_args"]}: {e}') from e
    if isinstance(meta['pretrained_cfg'], dict) and meta['pretrained_cfg']:
        model.pretrained_cfg = meta['pretrained_cfg']
        model.default_cfg = model.pretrained_cfg
    return model


def _check_fits(path: str, meta: Dict[str, Any], model: nn.Module, shapes: Dict[str, Tuple[int, ...]]):
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = [f'{k}: file {shapes[k]} vs model {v}' for k, v in expected.items() if k in shapes and shapes[k] != v]
    if missing or extra or wrong:
        raise PackedFormatError(f'{path}: the stored tensors do not fit {type(model).__name__} '
                                f'{meta["model_args"]}: missing {missing[:5]}, unexpected {extra[:5]}, '
                                f'wrong shape {wrong[:5]}')


def load_packed(path: str, deployed: bool = False, dtype: Optional[torch.dtype] = None,
                device: Optional[torch.device] = None) -> nn.Module:
    """Rebuild a model from a file written by :func:`export_packed`.

    By default returns the **training model** (``BinaryViT`` / ``BinaryDeiT``, in eval mode) with
    latent weights chosen so that its binarisation reproduces the stored effective weights
    exactly (see :func:`_latent_weight`): identical eval logits, and it can be fine-tuned.
    ``deployed=True`` returns the deployed model, multiplying by exactly the stored weights: it is
    folded from a model whose binary weights stay on the ``meta`` device, and its binary layers keep
    the file's bits (their packed kernel form is made from the bits directly; a float or int8 form
    only if that kernel is chosen). ``dtype`` defaults to the dtype the weights were stored in.

    Raises :class:`PackedFormatError` naming the file and the problem for a truncated, corrupt or
    foreign file; ``FileNotFoundError`` when there is no file.
    """
    path = str(path)
    meta, tensors = _read_packed(path)
    packed: Dict[str, Any] = meta['packed']
    model = _rebuild(path, meta, device='meta' if deployed else None)
    binary = _binary_layers(model)
    unexpected = sorted(set(packed) - set(binary))
    if unexpected:
        raise PackedFormatError(f'{path}: packed weights {unexpected[:5]} do not belong to a binary layer of '
                                f'{type(model).__name__}')
    if dtype is None:
        dtype = next((tensors[e['scale']].dtype for e in packed.values()
                      if isinstance(e, dict) and e.get('scale') in tensors), torch.float32)
    effective = {key: _entry(path, key, entry, tensors, *binary[key]) for key, entry in packed.items()}
    used = {name for _, _, names in effective.values() for name in names}
    others = {k: v for k, v in tensors.items() if k not in used}
    _check_fits(path, meta, model, {**{k: tuple(v.shape) for k, v in others.items()},
                                    **{k: tuple(binary[k][0].weight.shape) for k in effective}})
    if deployed:
        model.load_state_dict(others, strict=False, assign=True)  # the binary weights stay on 'meta'
        model = model.to(dtype).eval()
        for key, (bits, scale, _) in effective.items():
            binary[key][0]._packed_effective = (bits, scale.to(torch.float64))
        deployed_model = deploy(model)
        return deployed_model.to(device) if device is not None else deployed_model
    return _training_model(path, model, binary, effective, others, dtype, device)


def _training_model(path, model, binary, effective, others, dtype, device) -> nn.Module:
    state = dict(others)
    inexact: List[str] = []
    signs_of = {}
    for key, (bits, scale, _) in effective.items():
        signs = bits.signs()
        latent, exact = _latent_weight(signs, scale, binary[key][1], dtype)
        if not bool(exact.all()):
            inexact.append(f'{key} ({int((~exact).sum())} of {len(exact)} channels)')
        state[key] = latent.reshape(binary[key][0].weight.shape)
        signs_of[key] = (signs, scale)
    model = model.to(dtype)
    model.load_state_dict(state, strict=True)
    model.eval()
    # check that the training model binarises back to exactly the stored weights
    with torch.no_grad():
        for key, (signs, scale) in signs_of.items():
            eff = binary[key][0].binary_weight().reshape(signs.shape[0], -1)
            want = scale.to(dtype)[:, None] * signs.to(dtype)
            if not torch.equal(eff, want) and not any(s.startswith(key + ' ') for s in inexact):
                inexact.append(f'{key} ({int((eff != want).any(dim=1).sum())} of {signs.shape[0]} channels)')
    if inexact:
        warnings.warn(f'{path}: the latent weights of the training model reproduce the stored binary weights only '
                      f'to rounding in {inexact[:5]}; load_packed(..., deployed=True) is exact')
    return model.to(device) if device is not None else model
