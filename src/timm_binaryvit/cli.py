"""The ``timm-binaryvit`` console script.

Commands (``timm-binaryvit COMMAND --help`` for each):

* ``list``        every registered model with parameters, binary share, OPs and size
* ``profile``     per-layer operation / size table of one model
* ``capability``  representational capability (BinaryViT supplementary, section 3), term by term
* ``convert``     a checkpoint trained with the authors' code -> a Hugging Face Hub repo folder
* ``export``      a model -> the packed 1-bit deployment file
* ``kernels``     the CPU, torch's build and the kernel chosen for each product (timm_binaryvit.kernels)
* ``demo``        train a tiny model on scikit-learn's digits (examples/train_digits.py)

Exit status: 0 on success, 1 when the work fails (a file that cannot be read, matplotlib
missing for ``--plot``), 2 for a usage error (unknown model name, bad arguments).
"""
import argparse
import ast
import inspect
import json
import os
import sys
from pathlib import Path
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ['main', 'build_parser']

PROG = 'timm-binaryvit'
_CHECKPOINT_EXTS = ('.pth', '.pt', '.bin', '.safetensors', '.tar', '.ckpt')


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
        fixed = [k for k in ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios')
                 if getattr(args, k, None) is not None]
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
    keys = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios', 'img_size', 'in_chans', 'num_classes',
            'model_kwargs')
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
    from .hub import LoadError, convert_checkpoint

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
    from .convert import checkpoint_filter_fn
    from .hub import LoadError, _infer_num_classes, load_checkpoint_file

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


# ---------------------------------------------------------------------------------------------
# Parser


def _model_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        'model configuration', 'override the registered configuration; per-stage options take one value per stage '
                               'for BinaryViT and a single value for the DeiT models')
    group.add_argument('--num-classes', type=int, metavar='N', help='classes of the head')
    group.add_argument('--img-size', type=int, nargs='+', metavar='PX', help='input size: H or H W')
    group.add_argument('--in-chans', type=int, metavar='C', help='input channels')
    group.add_argument('--embed-dims', '--embed-dim', dest='embed_dims', type=int, nargs='+', metavar='C',
                       help='widths (BinaryViT: per stage) / embed_dim (DeiT)')
    group.add_argument('--depths', '--depth', dest='depths', type=int, nargs='+', metavar='L',
                       help='layers (BinaryViT: per stage) / depth (DeiT)')
    group.add_argument('--num-heads', type=int, nargs='+', metavar='H', help='attention heads')
    group.add_argument('--mlp-ratios', '--mlp-ratio', dest='mlp_ratios', type=int, nargs='+', metavar='E',
                       help='FFN expansion')
    group.add_argument('--sr-ratios', type=int, nargs='+', metavar='R', help='key/value reduction (BinaryViT only)')
    group.add_argument('--model-kwargs', nargs='+', metavar='KEY=VALUE',
                       help='any other constructor argument, values as JSON / Python literals '
                            '(e.g. fp_transitions=true class_token=False global_pool=avg)')
    return parent


def build_parser() -> argparse.ArgumentParser:
    from .kernels import MODES

    parser = argparse.ArgumentParser(
        prog=PROG,
        description='BinaryViT (Le & Li, CVPR 2023 Workshops, arXiv 2306.16678) and fully-binary DeiT-S for timm: '
                    'inspect, convert and export the models this package registers.',
        epilog=f'Run `{PROG} COMMAND --help` for the options of a command. Exit status: 0 ok, 1 failure, '
               '2 usage error (e.g. unknown model).',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=f'%(prog)s {_version()}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    models = _model_options()
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        'list', help='every registered model with parameters, binary share, OPs and size', formatter_class=raw,
        description='List every model this package registers with timm, with its parameters, the share of them '
                    'that are binary, its operations (OPs = BOPs / 64 + FLOPs) and its size, from '
                    'timm_binaryvit.profile (parameters only when that module is not available).',
        epilog=f'example: {PROG} list --filter "binaryvit*"')
    p.add_argument('--filter', metavar='PATTERN', help='only names matching this wildcard pattern')
    p.add_argument('--no-profile', action='store_true', help='parameters only, do not profile')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        'profile', parents=[models], help='per-layer operations / parameters / size of one model', formatter_class=raw,
        description='Print the per-layer table of timm_binaryvit.profile: binary and full-precision operations, '
                    'parameters and storage of every layer, with the totals.',
        epilog=f'examples:\n  {PROG} profile binaryvit\n  {PROG} profile binary_deit_small_patch16_224 '
               f'--input-size 3 224 224\n  {PROG} profile binaryvit --embed-dims 16 32 64 128 --depths 1 1 1 1')
    p.add_argument('model', help='registered model name, or hf-hub:ORG/REPO / local-dir:PATH')
    p.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'),
                   help='input size (default: the model\'s)')
    p.add_argument('--plot', metavar='FILE.png',
                   help='also draw the per-layer OPs, binary and full-precision, by stage (needs matplotlib: '
                        'pip install "timm-binaryvit[plot]")')
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        'capability', parents=[models], help='representational capability, term by term', formatter_class=raw,
        description='Element-wise representational capability by the rules of the BinaryViT supplementary '
                    '(section 3), printed term by term. MODEL is deit_small, resnet18, resnet34 or a model name '
                    'of this package (optionally with a configuration).',
        epilog=f'examples:\n  {PROG} capability deit_small\n  {PROG} capability resnet34\n'
               f'  {PROG} capability binaryvit\n  {PROG} capability deit_small --no-attention   '
               f'# the variant the supplementary prints')
    p.add_argument('model', help='deit_small, resnet18, resnet34 or a registered model name')
    p.add_argument('--no-attention', action='store_true',
                   help='leave out the attention-product term (the figure the supplementary prints for DeiT-S)')
    p.set_defaults(func=cmd_capability)

    p = sub.add_parser(
        'convert', parents=[models], help="authors' checkpoint -> Hugging Face Hub repo folder", formatter_class=raw,
        description="Convert a checkpoint trained with the authors' BinaryViT code (.pth, optionally wrapped as "
                    "{'model': state_dict, ...}, or .safetensors) into a repo folder: config.json (architecture "
                    'and model arguments), model.safetensors and a README.md model card. The folder loads with '
                    "timm.create_model('local-dir:DIR', pretrained=True) and, uploaded, with 'hf-hub:ORG/REPO'. "
                    'Give the configuration the checkpoint was trained with when it is not the registered one.',
        epilog=f'examples:\n  {PROG} convert checkpoint.pth --model binaryvit_small_patch4_224 --out binaryvit-in1k\n'
               f'  {PROG} convert tiny.safetensors --model binaryvit --out tiny --num-classes 10 '
               f'--embed-dims 16 32 64 128 --depths 1 1 1 1 --mlp-ratios 8 8 4 4\n'
               f'  {PROG} convert deit.pth --model reactdeit_avgpool_mb_ls --out bideit --depth 12')
    p.add_argument('checkpoint', help='the checkpoint file')
    p.add_argument('--model', required=True, metavar='NAME',
                   help="registered model name or the authors' variant name (reactdeit, reactdeit_avgpool, "
                        'reactdeit_avgpool_mb, reactdeit_avgpool_mb_ls, binaryvit, binaryvit_somefp)')
    p.add_argument('--out', required=True, metavar='DIR', help='the repo folder to write')
    p.add_argument('--source', metavar='TEXT', help='provenance of the weights, for the model card')
    p.add_argument('--repo-id', metavar='ORG/REPO', help='the Hub repo the folder is meant for (model card)')
    p.add_argument('--license', metavar='ID', help='license of the weights for the model card (default apache-2.0)')
    p.add_argument('--trust-pickle', action='store_true',
                   help='read a .pth that pickles arbitrary objects (only for files you trust)')
    p.add_argument('--no-verify', action='store_true', help='do not reload the folder to check its logits')
    p.add_argument('--force', action='store_true', help='overwrite a folder that already holds a model')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        'export', parents=[models], help='model or checkpoint -> packed 1-bit deployment file', formatter_class=raw,
        description='Export a model to the packed 1-bit format of timm_binaryvit.deploy.export_packed and print the '
                    'float32 and packed sizes. MODEL_OR_CHECKPOINT is a repo (hf-hub:ORG/REPO, local-dir:PATH or a '
                    'folder), a checkpoint file (with --model), or a registered name (random weights).',
        epilog=f'examples:\n  {PROG} export local-dir:binaryvit-in1k --out binaryvit.packed\n'
               f'  {PROG} export checkpoint.pth --model binaryvit --out binaryvit.packed')
    p.add_argument('model_or_checkpoint', metavar='MODEL_OR_CHECKPOINT')
    p.add_argument('--out', required=True, metavar='FILE', help='the packed file to write')
    p.add_argument('--model', metavar='NAME', help='the model a checkpoint file belongs to')
    p.add_argument('--trust-pickle', action='store_true', help='read a .pth that pickles arbitrary objects')
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        'kernels', help='the CPU, torch build and kernel chosen for each product, with timings', formatter_class=raw,
        description='Run one training step (forward + backward) and one eval forward of each model on random '
                    'images, then print what timm_binaryvit.kernels chose for every product shape and why: the '
                    'CPU and its flags, the torch build, the mode, and the measured time of each candidate. '
                    'The mode can also be forced with the environment variable TIMM_BINARYVIT_KERNELS.',
        epilog=f'examples:\n  {PROG} kernels\n  {PROG} kernels --model binaryvit_small_patch4_224 --batch-size 4\n'
               f'  {PROG} kernels --mode float    # what plain float32 products cost')
    p.add_argument('--model', action='append', metavar='NAME',
                   help=f'a model to run (repeatable; default: {" and ".join(DEFAULT_KERNEL_MODELS)})')
    p.add_argument('--batch-size', type=int, default=16, metavar='N', help='images per pass (default 16)')
    p.add_argument('--img-size', type=int, nargs='+', metavar='PX', help='input size: H or H W (default: the model\'s)')
    p.add_argument('--mode', choices=MODES,
                   help='force one kind of kernel (default: TIMM_BINARYVIT_KERNELS, else auto = measure)')
    p.add_argument('--model-kwargs', nargs='+', metavar='KEY=VALUE',
                   help='other constructor arguments for every model, values as JSON / Python literals')
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser(
        'demo', help="train a tiny binary model on scikit-learn's digits", formatter_class=raw,
        description="Run examples/train_digits.py (from the source repository): trains a small BinaryViT on "
                    "scikit-learn's 8x8 digits on the CPU. Every argument after `demo` goes to the script.",
        epilog=f'example: {PROG} demo -- --help    # the options of the script itself')
    p.add_argument('args', nargs=argparse.REMAINDER, help='arguments for examples/train_digits.py')
    p.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version('timm-binaryvit')
    except Exception:  # noqa: BLE001
        return 'unknown'


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['demo'] and argv[1:] not in (['-h'], ['--help']):
        # everything after `demo` belongs to the script, options included
        rest = argv[1:]
        args = parser.parse_args(['demo'])
        args.args = rest[1:] if rest[:1] == ['--'] else rest
    else:
        args = parser.parse_args(argv)
    if not getattr(args, 'command', None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f'{PROG}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
