"""The YAML training configs in examples/configs/ for timm's stock ``train.py -c``.

The values must be the paper's recipe (supplementary section 2), with names that resolve in the installed timm. Every
key is checked against the argument parser of timm's real, unmodified ``train.py`` (``../shared/timm-scripts`` or
``$TIMM_SCRIPTS_DIR``, see ``timm_sources``; a failure under ``CI=true`` when absent, a skip otherwise): the script is
imported as a module, which builds its parser but trains nothing. Each key must be an argument's destination, each
value must be what that option gives when passed on the command line (``train.py -c`` sets the YAML values as parser
defaults, so a wrong type would otherwise pass through unconverted), the config must load through train.py's own
``_parse_args``, and every ``--option`` the comments tell users to add must exist.
"""
import argparse
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

import timm
import timm_binaryvit  # noqa: F401  registers the models

import timm_sources

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'examples' / 'configs'
CONFIGS = sorted(CONFIG_DIR.glob('*.yaml'))

# one config per model: Table 3's four rows, BinaryViT and BinaryViT with full-precision stage transitions
EXPECTED_MODELS = {
    'binaryvit_small_patch4_224',
    'binaryvit_small_fpembed_patch4_224',
    'binary_deit_small_patch16_224',
    'binary_deit_small_gap_patch16_224',
    'binary_deit_small_gap_mb_patch16_224',
    'binary_deit_small_gap_mb_affine_patch16_224',
}

# the recipe: key -> value every config must hold
RECIPE = dict(
    epochs=300,
    opt='adamw',
    weight_decay=0.0,
    lr=5e-4,
    sched='cosine',
    warmup_epochs=0,
    mixup=0.0,
    cutmix=0.0,
    reprob=0.0,
    drop_path=0.0,
    smoothing=0.0,
    color_jitter=0.0,
    aa=None,
    aug_repeats=0,
    hflip=0.5,
    kd_model_name='deit_small_patch16_224',
    distill_loss_weight=1.0,
    task_loss_weight=0.0,
    kd_temperature=1.0,
)
GLOBAL_BATCH = 512
GPUS = 8


def _load(path):
    with open(path) as f:
        cfg = yaml.safe_load(f)
    assert isinstance(cfg, dict), f'{path.name} is not a mapping'
    return cfg


@pytest.fixture(scope='module')
def train_script():
    return timm_sources.require_scripts(['train.py'])['train.py']


@pytest.fixture
def train_module(train_script):
    """timm's train.py imported afresh (a new module per test: ``-c`` changes its parser's defaults)."""
    return timm_sources.load_script_module(train_script)


def _actions(module):
    # train.py reads -c/--config with a first parser of its own, then everything else with `parser`
    return {a.dest: a for p in (module.config_parser, module.parser) for a in p._actions if a.dest != 'help'}


def test_one_config_per_model():
    assert {_load(p)['model'] for p in CONFIGS} == EXPECTED_MODELS
    for p in CONFIGS:
        assert p.name == f"{_load(p)['model']}_in1k.yaml"


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_recipe_values(path):
    cfg = _load(path)
    for key, value in RECIPE.items():
        assert key in cfg, f'{path.name}: {key} missing'
        if isinstance(value, float):
            assert isinstance(cfg[key], (int, float)) and not isinstance(cfg[key], bool), \
                f'{path.name}: {key}={cfg[key]!r} is not a number (YAML reads 5e-4 as a string, write 0.0005)'
            assert cfg[key] == pytest.approx(value, abs=1e-12), f'{path.name}: {key}={cfg[key]!r}, want {value!r}'
        else:
            assert cfg[key] == value, f'{path.name}: {key}={cfg[key]!r}, want {value!r}'
    # lr is given, so train.py does not derive it from lr_base and the global batch size
    assert 'lr_base' not in cfg and 'lr_base_size' not in cfg and 'lr_base_scale' not in cfg
    assert cfg['batch_size'] * GPUS == GLOBAL_BATCH
    assert cfg.get('num_classes', 1000) == 1000
    assert not cfg.get('model_ema', False)
    assert cfg.get('scale', [0.08, 1.0]) == [0.08, 1.0]


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_names_resolve_in_installed_timm(path):
    from timm.optim import list_optimizers
    cfg = _load(path)
    assert cfg['model'] in timm.list_models(), f"{cfg['model']} is not registered after importing timm_binaryvit"
    assert cfg['kd_model_name'] in timm.list_models()
    assert cfg['opt'] in list_optimizers()
    # the teacher is the same family the paper distils from: a full-precision DeiT-S with ImageNet weights
    assert timm.is_model_pretrained(cfg['kd_model_name'])
    model = timm.create_model(cfg['model'], pretrained=False, num_classes=0, device='meta')
    assert model.pretrained_cfg['input_size'] == (3, 224, 224)


def _command_line(action, value):
    """The command-line words that give ``value`` for ``action``, or None where the option cannot give it."""
    option = next(o for o in action.option_strings if o.startswith('--'))
    if isinstance(action, argparse._StoreTrueAction):
        return [option] if value is True else ([] if value is False else None)
    if isinstance(action, argparse._StoreFalseAction):
        return [option] if value is False else ([] if value is True else None)
    if isinstance(value, dict):  # timm's ParseKwargs (--model-kwargs)
        return [option] + [f'{k}={v!r}'.replace(' ', '') for k, v in value.items()]
    if action.nargs in (None, '?'):
        return None if isinstance(value, (list, dict)) else [option, str(value)]
    if not isinstance(value, list):
        return None
    return [option] + [str(v) for v in value]


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
                and not isinstance(b, bool) and a == pytest.approx(b, rel=1e-12, abs=1e-15))
    return a == b and type(a) is type(b)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_keys_are_train_py_arguments(path, train_module):
    """Each YAML value equals what train.py's parser makes of the same option on the command line."""
    cfg = _load(path)
    actions = _actions(train_module)
    unknown = sorted(k for k in cfg if k not in actions)
    assert not unknown, f'{path.name}: not arguments of timm\'s train.py: {unknown}'
    bad = []
    for key, value in cfg.items():
        action = actions[key]
        if value is None:
            if action.default is not None:
                bad.append(f'{key}: null, but no command line gives None (default {action.default!r})')
            continue
        words = _command_line(action, value)
        if words is None:
            bad.append(f'{key}={value!r}: {action.option_strings[0]} (nargs={action.nargs}) cannot take that value')
            continue
        try:
            with mock.patch('sys.stderr'):
                parsed = getattr(train_module.parser.parse_args(words), key)
        except SystemExit:
            bad.append(f'{key}={value!r}: train.py rejects `{" ".join(words)}` (choices {action.choices})')
            continue
        if not _same(parsed, value):
            bad.append(f'{key}={value!r} ({type(value).__name__}): `{" ".join(words)}` gives {parsed!r} '
                       f'({type(parsed).__name__})')
    assert not bad, f'{path.name}:\n  ' + '\n  '.join(bad)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_loads_through_train_py(path, train_module):
    """train.py's own config loading (``-c``), as ``torchrun ... train.py -c CONFIG --data-dir DIR`` runs it."""
    cfg = _load(path)
    argv = ['train.py', '-c', str(path), '--data-dir', '/nonexistent/imagenet']
    with mock.patch.object(sys, 'argv', argv):
        args, args_text = train_module._parse_args()
    assert args.data_dir == '/nonexistent/imagenet'
    for key, value in cfg.items():
        assert _same(getattr(args, key), value) or (value is None and getattr(args, key) is None), \
            f'{path.name}: train.py -c gives {key}={getattr(args, key)!r}, the file says {value!r}'
    assert yaml.safe_load(args_text)['model'] == cfg['model']


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_options_in_comments_exist(path, train_module):
    """Every ``--option`` a config's comments tell users to add is one of train.py's, and every ``key: value`` shown
    commented-out is a valid argument too."""
    actions = _actions(train_module)
    options = {o for a in actions.values() for o in a.option_strings}
    comments = [line.split('#', 1)[1] for line in path.read_text().splitlines() if '#' in line]
    # on a launcher's line (`torchrun --nproc_per_node=8 train.py ...`), the options before train.py are its own
    mentioned = {m for c in comments for m in re.findall(r'(?<![\w-])--[a-z][a-z0-9_-]*', c.split('train.py')[-1])}
    assert mentioned, f'{path.name}: no command-line option in the comments'
    missing = sorted(m for m in mentioned if m not in options)
    assert not missing, f'{path.name}: the comments mention options train.py does not have: {missing}'
    shown = [re.match(r'\s+([a-z_]+): (\S+)\s*$', c) for c in comments]
    for m in filter(None, shown):
        key, value = m.group(1), yaml.safe_load(m.group(2))
        assert key in actions, f'{path.name}: commented-out key {key!r} is not a train.py argument'
        words = _command_line(actions[key], value)
        assert words is not None, f'{path.name}: commented-out {key}: {value!r} is not a value of {key}'


def test_train_py_has_the_options_the_docs_use(train_module):
    """The options the README, the configs' comments and docs/timm-tools.md tell users to pass."""
    actions = _actions(train_module)
    for dest in ('config', 'data_dir', 'device_modules', 'model_kwargs', 'sync_bn', 'grad_accum_steps',
                 'batch_size', 'kd_model_name', 'kd_distill_type', 'distill_loss_weight', 'task_loss_weight',
                 'kd_temperature', 'amp', 'amp_dtype', 'torchcompile', 'torchscript', 'grad_checkpointing'):
        assert dest in actions, f'timm\'s train.py has no --{dest.replace("_", "-")}'
    assert 'bfloat16' in (actions['amp_dtype'].choices or ['float16', 'bfloat16'])
