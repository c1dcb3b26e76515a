"""What each ``timm-binaryvit`` command does (:mod:`timm_binaryvit.cli` parses the command line).

Every ``cmd_*`` function takes the parsed ``argparse.Namespace``, prints its result and returns the
exit status; a failure is raised as :class:`CliError` with the status to exit with. Its docstring
is the command's help: the first line in the list of commands, the rest in ``COMMAND --help``. The
helpers above them turn command-line model options into a model: a registered or authors' variant
name, a Hub repo or folder, or a checkpoint file.
"""
import argparse
import ast
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ['CliError', 'cmd_list', 'cmd_profile', 'cmd_capability', 'cmd_convert', 'cmd_export', 'cmd_kernels',
           'cmd_demo', 'DEFAULT_KERNEL_MODELS']

_CHECKPOINT_EXTS = ('.pth', '.pt', '.bin', '.safetensors', '.tar', '.ckpt')
#: the options that size the architecture (one value per stage for BinaryViT)
_SIZE_OPTIONS = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios')


class CliError(Exception):
    """A failure reported as ``timm-binaryvit: error: <message>`` with exit status ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Model names and arguments


def _available() -> List[str]:
    from .hub import registered_models

    return registered_models()


def _unknown_model(name: str, extra: Sequence[str] = ()) -> CliError:
    from .hub import AUTHORS_VARIANTS

    names = list(extra) + _available()
    return CliError(
        f"unknown model {name!r}. Available models: {', '.join(names)} "
        f"(the authors' variant names {', '.join(sorted(AUTHORS_VARIANTS))} are accepted too; "
        f"repos as hf-hub:ORG/REPO or local-dir:PATH where a command loads weights)", code=2)


def _resolve_name(name: str) -> str:
    from .hub import resolve_model_name

    try:
        resolved = resolve_model_name(name)
    except ValueError:
        raise _unknown_model(name) from None
    if resolved not in _available():
        raise _unknown_model(name)
    return resolved


def _is_repo(name: str) -> bool:
    return name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')) or (
        ':' not in name and os.path.isdir(name))


def _parse_value(text: str) -> Any:
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    return text


def _key_values(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise CliError(f'--model-kwargs takes KEY=VALUE items, got {item!r}', code=2)
        out[key.strip().replace('-', '_')] = _parse_value(value.strip())
    return out


def _model_kwargs(args: argparse.Namespace, name: str) -> Dict[str, Any]:
    """The model options of a command line, shaped for the model family of ``name``."""
    kwargs: Dict[str, Any] = {}
    per_stage = {'embed_dims': 'embed_dim', 'depths': 'depth', 'num_heads': 'num_heads',
                 'mlp_ratios': 'mlp_ratio', 'sr_ratios': None}
    given = {k: getattr(args, k, None) for k in per_stage}
    if any(v is not None for v in given.values()):
        from .hub import model_family

        family = model_family(name)
        for key, single in per_stage.items():
            value = given[key]
            if value is None:
                continue
            flag = '--' + key.replace('_', '-')
            if family == 'pyramid':
                kwargs[key] = tuple(value)
            elif single is None:
                raise CliError(f'{flag}: {name} has no key/value reduction (a DeiT model)', code=2)
            elif len(value) != 1:
                raise CliError(f'{flag}: {name} is a DeiT model and takes one value, got {len(value)}', code=2)
            else:
                kwargs[single] = value[0]
    if getattr(args, 'img_size', None) is not None:
        size = args.img_size
        if len(size) > 2:
            raise CliError('--img-size takes H or H W', code=2)
        kwargs['img_size'] = size[0] if len(size) == 1 else tuple(size)
    if getattr(args, 'in_chans', None) is not None:
        kwargs['in_chans'] = args.in_chans
    if getattr(args, 'num_classes', None) is not None:
        kwargs['num_classes'] = args.num_classes
    kwargs.update(_key_values(getattr(args, 'model_kwargs', None)))
    return kwargs


def _create(name: str, kwargs: Dict[str, Any], device: Optional[str] = None, quiet: bool = False):
    import timm

    if not quiet:
        _progress(f'building {name}{" on the meta device" if device == "meta" else ""}...')
    try:
        return timm.create_model(name, device=device, **kwargs) if device else timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise CliError(f'cannot build {name} with {kwargs}: {e}', code=2) from e


def _load_any(spec: str, args: argparse.Namespace, pretrained: bool):
    """A model from a registered name, an authors' variant name, or a repo (hf-hub: / local-dir: / folder)."""
    from .hub import LoadError, load_model

    if _is_repo(spec):
        fixed = [k for k in _SIZE_OPTIONS if getattr(args, k, None) is not None]
        if fixed:
            raise CliError(f'{spec}: the architecture comes from its config.json; '
                           f'--{fixed[0].replace("_", "-")} does not apply', code=2)
        extra = _model_kwargs(args, '')
        _progress(f'loading {spec}...')
        try:
            return load_model(spec, pretrained=pretrained, **extra)
        except LoadError as e:
            raise CliError(str(e)) from e
    name = _resolve_name(spec)
    return _create(name, _model_kwargs(args, name))


def _has_model_flags(args: argparse.Namespace) -> bool:
    keys = _SIZE_OPTIONS + ('img_size', 'in_chans', 'num_classes', 'model_kwargs')
    return any(getattr(args, k, None) is not None for k in keys)


# ---------------------------------------------------------------------------------------------
# Formatting


def _si(value: Optional[float], unit: str = '') -> str:
    if value is None:
        return '-'
    for factor, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
        if abs(value) >= factor:
            return f'{value / factor:.2f} {prefix}{unit}'
    return f'{value:.0f} {unit}'.rstrip()


def _table(rows: List[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append('  '.join(cells).rstrip())
        if n == 0:
            lines.append('  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def _input_size(model) -> Tuple[int, int, int]:
    return (int(model.in_chans), *(int(s) for s in model.img_size))


def _profile_model(profile_fn: Callable, name: str, kwargs: Dict[str, Any], input_size=None):
    """Run ``profile`` on a meta-device model, or on a real one if the meta device is not supported."""
    model = _create(name, kwargs, device='meta', quiet=True)
    size = tuple(input_size) if input_size else _input_size(model)
    try:
        return profile_fn(model, size)
    except Exception:  # noqa: BLE001  (not every profiler runs on meta tensors)
        pass
    _progress(f'  profiling {name} with real weights (the profiler does not take meta tensors)...')
    model = _create(name, kwargs, quiet=True).eval()
    return profile_fn(model, size)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_list(args: argparse.Namespace) -> int:
    """every registered model with parameters, binary share, OPs and size

    List every model this package registers with timm, with its parameters, the share of them that
    are binary, its operations (OPs = BOPs / 64 + FLOPs) and its size, from timm_binaryvit.profile
    (parameters only when that module is not available).
    """
    import fnmatch

    names = [n for n in _available() if not args.filter or fnmatch.fnmatch(n, args.filter)]
    if not names:
        raise CliError(f'no registered model matches {args.filter!r}; models: {", ".join(_available())}', code=2)
    from .profile import profile

    profile_fn = None if args.no_profile else profile
    rows = [('model', 'params', 'binary', 'OPs', 'BOPs', 'FLOPs', 'size')]
    failures = []
    for i, name in enumerate(names, 1):
        _progress(f'[{i}/{len(names)}] building {name}...')
        stats = None
        if profile_fn is not None:
            try:
                stats = _profile_model(profile_fn, name, {})
            except Exception as e:  # noqa: BLE001  (one model's failure must not hide the others)
                failures.append(f'{name}: {type(e).__name__}: {e}')
        if stats is not None:
            binary, fp = float(stats.params_binary), float(stats.params_fp)
            total = binary + fp
            rows.append((name, _si(total), f'{100 * binary / total:.1f}%' if total else '-',
                         _si(float(stats.ops)), _si(float(stats.bops)), _si(float(stats.flops)),
                         f'{float(stats.size_bits) / 8 / 1e6:.2f} MB'))
        else:
            model = _create(name, {}, device='meta', quiet=True)
            total = sum(p.numel() for p in model.parameters())
            rows.append((name, _si(total), '-', '-', '-', '-', f'{total * 4 / 1e6:.2f} MB (fp32)'))
    print(_table(rows, right=(False, True, True, True, True, True, True)))
    print('\nparams: all parameters; binary: share of them used as 1-bit weights; OPs = BOPs / 64 + FLOPs '
          'at the default input size; size: binary weights at 1 bit, the rest at 32 bits.')
    if profile_fn is None:
        print('binary share, OPs and size: skipped (--no-profile).')
    for failure in failures:
        print(f'profile failed for {failure}')
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """per-layer operations / parameters / size of one model

    Print the per-layer table of timm_binaryvit.profile: binary and full-precision operations,
    parameters and storage of every layer, with the totals.
    """
    from .profile import profile

    if _is_repo(args.model):
        model = _load_any(args.model, args, pretrained=False)
        size = tuple(args.input_size) if args.input_size else _input_size(model)
        result = profile(model.eval(), size)
    else:
        name = _resolve_name(args.model)
        kwargs = _model_kwargs(args, name)
        if args.input_size:
            c, h, w = args.input_size
            kwargs.setdefault('in_chans', c)
            kwargs.setdefault('img_size', (h, w))
        _progress(f'building {name}...')
        result = _profile_model(profile, name, kwargs, args.input_size)
    print(result)
    if args.plot:
        from .plot import plot_profile

        try:
            print(f'wrote {plot_profile(result, args.plot)}')
        except ImportError as e:  # the table is printed; the picture needs the optional extra
            raise CliError(str(e), code=1) from e
    return 0


def cmd_capability(args: argparse.Namespace) -> int:
    """representational capability, term by term

    Element-wise representational capability by the rules of the BinaryViT supplementary (section 3),
    printed term by term. MODEL is deit_small, resnet18, resnet34 or a model name of this package
    (optionally with a configuration).
    """
    from .capability import PRESETS, representational_capability as capability

    key = args.model.strip().lower().replace('-', '_')
    if key in PRESETS and not _has_model_flags(args):
        report = capability(key, include_attention=not args.no_attention)
    elif _is_repo(args.model):
        report = capability(_load_any(args.model, args, pretrained=False), include_attention=not args.no_attention)
    else:
        try:
            name = _resolve_name(args.model)
        except CliError:
            raise _unknown_model(args.model, extra=sorted(PRESETS)) from None
        if _has_model_flags(args):
            model = _create(name, _model_kwargs(args, name), device='meta')
            report = capability(model, include_attention=not args.no_attention)
        else:
            _progress(f'building {name}...')
            report = capability(name, include_attention=not args.no_attention)
    print(report)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """authors' checkpoint -> Hugging Face Hub repo folder

    Convert a checkpoint trained with the authors' BinaryViT code (.pth, optionally wrapped as
    {'model': state_dict, ...}, or .safetensors) into a repo folder: config.json (architecture and
    model arguments), model.safetensors and a README.md model card. The folder loads with
    timm.create_model('local-dir:DIR', pretrained=True) and, uploaded, with 'hf-hub:ORG/REPO'. Give
    the configuration the checkpoint was trained with when it is not the registered one.
    """
    from .checkpoints import convert_checkpoint
    from .hub import LoadError

    name = _resolve_name(args.model)
    out = Path(args.out)
    if (out / 'config.json').exists() and not args.force:
        raise CliError(f'{out} already holds a model (config.json); use --force to overwrite it', code=1)
    kwargs = _model_kwargs(args, name)
    num_classes = kwargs.pop('num_classes', None)
    _progress(f'converting {args.checkpoint} into {name}{f" {kwargs}" if kwargs else ""}...')
    try:
        model = convert_checkpoint(
            args.checkpoint, name, out, num_classes=num_classes, model_kwargs=kwargs, source=args.source,
            repo_id=args.repo_id, license=args.license, trust_pickle=args.trust_pickle, verify=not args.no_verify)
    except LoadError as e:
        raise CliError(str(e)) from e
    except ValueError as e:
        raise CliError(str(e), code=2) from e
    params = sum(p.numel() for p in model.parameters())
    files = ', '.join(sorted(p.name for p in out.iterdir()))
    print(f'wrote {out} ({files})')
    print(f'  {name}: {params:,} parameters, {model.num_classes} classes, input {_input_size(model)}')
    if not args.no_verify:
        print('  verified: the folder reloads to the same logits')
    print(f"  load with timm.create_model('local-dir:{out}', pretrained=True) after `import timm_binaryvit`, "
          f'or upload the folder to the Hub and use hf-hub:ORG/REPO')
    return 0


def _model_for_export(args: argparse.Namespace):
    from .checkpoints import _infer_num_classes, load_checkpoint_file
    from .convert import checkpoint_filter_fn
    from .hub import LoadError

    spec = args.model_or_checkpoint
    if os.path.isfile(spec):
        if not args.model:
            raise CliError(f'{spec} is a checkpoint file: say which model it is with --model NAME', code=2)
        name = _resolve_name(args.model)
        try:
            state_dict = load_checkpoint_file(spec, trust_pickle=args.trust_pickle)
        except LoadError as e:
            raise CliError(str(e)) from e
        kwargs = _model_kwargs(args, name)
        if 'num_classes' not in kwargs:
            inferred = _infer_num_classes(state_dict)
            if inferred is not None:
                kwargs['num_classes'] = inferred
        model = _create(name, kwargs)
        try:
            model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
        except (ValueError, RuntimeError) as e:
            raise CliError(f'{spec}: does not fit {name} with {kwargs}: {e}') from e
        return model
    if not _is_repo(spec):
        try:
            name = _resolve_name(spec)
        except CliError:
            if os.path.splitext(spec)[1] in _CHECKPOINT_EXTS:
                raise CliError(f'{spec}: no such checkpoint file', code=1) from None
            raise
        _progress(f'note: {name} has no pretrained weights; exporting randomly initialised weights')
        return _create(name, _model_kwargs(args, name))
    return _load_any(spec, args, pretrained=True)


def cmd_export(args: argparse.Namespace) -> int:
    """model or checkpoint -> packed 1-bit deployment file

    Export a model to the packed 1-bit format of timm_binaryvit.deploy.export_packed and print the
    float32 and packed sizes. MODEL_OR_CHECKPOINT is a repo (hf-hub:ORG/REPO, local-dir:PATH or a
    folder), a checkpoint file (with --model), or a registered name (random weights).
    """
    spec = args.model_or_checkpoint
    if args.model:
        _resolve_name(args.model)
    elif not os.path.isfile(spec) and not _is_repo(spec) and os.path.splitext(spec)[1] not in _CHECKPOINT_EXTS:
        _resolve_name(spec)  # unknown names are usage errors, whatever is installed
    from .deploy import export_packed, format_size_report

    model = _model_for_export(args).eval()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _progress(f'packing into {out}...')
    report = format_size_report(export_packed(model, str(out)))
    print(f'wrote {out}')
    print('\n'.join(f'  {line}' for line in report.splitlines()))
    return 0


DEFAULT_KERNEL_MODELS = ('binaryvit_small_patch4_224', 'binary_deit_small_gap_mb_affine_patch16_224')


def _time_passes(model, batch_size: int) -> Tuple[float, float]:
    """Seconds for one training-mode forward + backward and one eval forward on random images."""
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *_input_size(model), generator=generator)
    model.train()
    start = time.perf_counter()
    model(x).float().square().mean().backward()  # any scalar: the backward products are what is timed
    train_s = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    return train_s, time.perf_counter() - start


def cmd_kernels(args: argparse.Namespace) -> int:
    """the CPU, torch build and kernel chosen for each product, with timings

    Run one training step (forward + backward) and one eval forward of each model on random images,
    then print what timm_binaryvit.kernels chose for every product shape and why: the CPU and its
    flags, the torch build, the mode, and the measured time of each candidate. The mode can also be
    forced with the environment variable TIMM_BINARYVIT_KERNELS.
    """
    import contextlib

    from . import kernels

    if args.batch_size < 1:
        raise CliError(f'--batch-size must be at least 1, got {args.batch_size}', code=2)
    names = [_resolve_name(n) for n in (args.model or DEFAULT_KERNEL_MODELS)]
    rows = [('model', 'input', 'train step (fwd+bwd)', 'eval forward')]
    with kernels.kernel_mode(args.mode) if args.mode else contextlib.nullcontext():
        for name in names:
            model = _create(name, _model_kwargs(args, name))
            _progress(f'  running {name} at batch {args.batch_size} (the first pass of each shape measures '
                      f'its kernels)...')
            train_s, eval_s = _time_passes(model, args.batch_size)
            size = 'x'.join(map(str, _input_size(model)))
            rows.append((name, f'{args.batch_size}x{size}', f'{train_s:.3f} s', f'{eval_s:.3f} s'))
        print(_table(rows, right=(False, False, True, True)))
        print('(first passes, random data; they include the one-off kernel measurements)\n')
        print(kernels.report())
    return 0


def _demo_script() -> Optional[Path]:
    candidates = [Path.cwd() / 'examples' / 'train_digits.py',
                  Path(__file__).resolve().parents[2] / 'examples' / 'train_digits.py']
    return next((p for p in candidates if p.is_file()), None)


def cmd_demo(args: argparse.Namespace) -> int:
    """train a tiny binary model on scikit-learn's digits

    Run examples/train_digits.py (from the source repository): trains a small BinaryViT on
    scikit-learn's 8x8 digits on the CPU. Every argument after `demo` goes to the script.
    """
    script = _demo_script()
    if script is None:
        raise CliError('examples/train_digits.py was not found: the demo ships with the source repository '
                       '(run the command from its root)', code=1)
    import importlib.util

    spec = importlib.util.spec_from_file_location('timm_binaryvit_demo', script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main_fn = getattr(module, 'main', None)
    if main_fn is None:
        raise CliError(f'{script} has no main()', code=1)
    _progress(f'running {script} {" ".join(args.args)}'.rstrip())
    saved = sys.argv
    sys.argv = [str(script), *args.args]
    try:
        takes_argv = bool(inspect.signature(main_fn).parameters)
        result = main_fn(list(args.args)) if takes_argv else main_fn()
    finally:
        sys.argv = saved
    return result if isinstance(result, int) else 0
