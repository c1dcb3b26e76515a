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
import inspect
import sys
from typing import Callable, Optional, Sequence

from .cli_commands import (DEFAULT_KERNEL_MODELS, CliError, cmd_capability, cmd_convert, cmd_demo, cmd_export,
                           cmd_kernels, cmd_list, cmd_profile)

__all__ = ['main', 'build_parser']

PROG = 'timm-binaryvit'


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


def _add_command(sub, name: str, func: Callable[[argparse.Namespace], int],
                 parents: Sequence[argparse.ArgumentParser], *examples: str) -> argparse.ArgumentParser:
    """Add the sub-command ``name``, run by ``func``, whose docstring gives its help: the first line in
    the list of commands, the rest (one paragraph) in its ``--help``, followed by the ``examples``
    (command lines after the program name)."""
    summary, _, description = inspect.cleandoc(func.__doc__ or '').partition('\n')
    lines = [f'{PROG} {example}' for example in examples]
    epilog = f'example: {lines[0]}' if len(lines) == 1 else 'examples:\n' + '\n'.join(f'  {x}' for x in lines)
    p = sub.add_parser(name, parents=list(parents), help=summary, description=' '.join(description.split()),
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


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
    models = [_model_options()]

    p = _add_command(sub, 'list', cmd_list, [], 'list --filter "binaryvit*"')
    p.add_argument('--filter', metavar='PATTERN', help='only names matching this wildcard pattern')
    p.add_argument('--no-profile', action='store_true', help='parameters only, do not profile')

    p = _add_command(sub, 'profile', cmd_profile, models, 'profile binaryvit',
                     'profile binary_deit_small_patch16_224 --input-size 3 224 224',
                     'profile binaryvit --embed-dims 16 32 64 128 --depths 1 1 1 1')
    p.add_argument('model', help='registered model name, or hf-hub:ORG/REPO / local-dir:PATH')
    p.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'),
                   help='input size (default: the model\'s)')
    p.add_argument('--plot', metavar='FILE.png',
                   help='also draw the per-layer OPs, binary and full-precision, by stage (needs matplotlib: '
                        'pip install "timm-binaryvit[plot]")')

    p = _add_command(sub, 'capability', cmd_capability, models,
                     'capability deit_small', 'capability resnet34', 'capability binaryvit',
                     'capability deit_small --no-attention   # the variant the supplementary prints')
    p.add_argument('model', help='deit_small, resnet18, resnet34 or a registered model name')
    p.add_argument('--no-attention', action='store_true',
                   help='leave out the attention-product term (the figure the supplementary prints for DeiT-S)')

    p = _add_command(sub, 'convert', cmd_convert, models,
                     'convert checkpoint.pth --model binaryvit_small_patch4_224 --out binaryvit-in1k',
                     'convert tiny.safetensors --model binaryvit --out tiny --num-classes 10 '
                     '--embed-dims 16 32 64 128 --depths 1 1 1 1 --mlp-ratios 8 8 4 4',
                     'convert deit.pth --model reactdeit_avgpool_mb_ls --out bideit --depth 12')
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

    p = _add_command(sub, 'export', cmd_export, models, 'export local-dir:binaryvit-in1k --out binaryvit.packed',
                     'export checkpoint.pth --model binaryvit --out binaryvit.packed')
    p.add_argument('model_or_checkpoint', metavar='MODEL_OR_CHECKPOINT')
    p.add_argument('--out', required=True, metavar='FILE', help='the packed file to write')
    p.add_argument('--model', metavar='NAME', help='the model a checkpoint file belongs to')
    p.add_argument('--trust-pickle', action='store_true', help='read a .pth that pickles arbitrary objects')

    p = _add_command(sub, 'kernels', cmd_kernels, [],
                     'kernels', 'kernels --model binaryvit_small_patch4_224 --batch-size 4',
                     'kernels --mode float    # what plain float32 products cost')
    p.add_argument('--model', action='append', metavar='NAME',
                   help=f'a model to run (repeatable; default: {" and ".join(DEFAULT_KERNEL_MODELS)})')
    p.add_argument('--batch-size', type=int, default=16, metavar='N', help='images per pass (default 16)')
    p.add_argument('--img-size', type=int, nargs='+', metavar='PX', help='input size: H or H W (default: the model\'s)')
    p.add_argument('--mode', choices=MODES,
                   help='force one kind of kernel (default: TIMM_BINARYVIT_KERNELS, else auto = measure)')
    p.add_argument('--model-kwargs', nargs='+', metavar='KEY=VALUE',
                   help='other constructor arguments for every model, values as JSON / Python literals')

    p = _add_command(sub, 'demo', cmd_demo, [], 'demo -- --help    # the options of the script itself')
    p.add_argument('args', nargs=argparse.REMAINDER, help='arguments for examples/train_digits.py')
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
