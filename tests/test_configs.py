"""The YAML training configs in examples/configs/ for timm's stock ``train.py -c``.

Every key must be one of ``train.py``'s own arguments (read from the ``train.py`` of the installed timm version, see
``timm_sources``; skipped with the reason when that file cannot be had) with a value of the argument's type, and the
values must be the paper's recipe (supplementary section 2). The checks that need no ``train.py`` (recipe values,
model, optimiser, scheduler and teacher names against the installed timm) always run.
"""
from pathlib import Path

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
def train_args():
    path = timm_sources.require_scripts(['train.py'])['train.py']
    return timm_sources.script_arguments(path)


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


def _type_ok(arg, value):
    if value is None:
        return True
    if arg['action'] in ('store_true', 'store_false'):
        return isinstance(value, bool)
    nargs = arg['nargs']
    values = value if nargs not in (None, '?') else [value]
    if nargs not in (None, '?') and not isinstance(value, list):
        return False
    kind = arg['type']
    for v in values:
        if kind == 'float' and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
            return False
        if kind == 'int' and not (isinstance(v, int) and not isinstance(v, bool)):
            return False
        if kind in (None, 'str') and arg['action'] is None and not isinstance(v, str):
            return False
    if arg['choices'] is not None:
        return all(v in arg['choices'] for v in values)
    return True


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_keys_are_train_py_arguments(path, train_args):
    cfg = _load(path)
    unknown = sorted(k for k in cfg if k not in train_args)
    assert not unknown, f'{path.name}: not arguments of timm {timm.__version__} train.py: {unknown}'
    bad = {k: v for k, v in cfg.items() if not _type_ok(train_args[k], v)}
    assert not bad, f'{path.name}: values of the wrong type for train.py: ' + ', '.join(
        f'{k}={v!r} ({train_args[k]["options"][0]}: type={train_args[k]["type"]}, nargs={train_args[k]["nargs"]}, '
        f'action={train_args[k]["action"]}, choices={train_args[k]["choices"]})' for k, v in bad.items())


def test_train_py_has_the_options_the_docs_use(train_args):
    """The options the README and the configs' comments tell users to pass."""
    for dest in ('config', 'data_dir', 'device_modules', 'model_kwargs', 'sync_bn', 'grad_accum_steps',
                 'batch_size', 'kd_model_name', 'distill_loss_weight', 'task_loss_weight', 'kd_temperature'):
        assert dest in train_args, f'timm {timm.__version__} train.py has no --{dest.replace("_", "-")}'
