"""timm's stock scripts (train.py, validate.py, inference.py, benchmark.py) run on our models.

The scripts of the installed timm version are fetched at test time (see ``timm_sources``) and run unmodified as
subprocesses on CPU, on a tiny ImageFolder made from scikit-learn's bundled 8x8 digits (upscaled to 32x32 RGB PNG,
``train/`` and ``validation/`` splits), with reduced-size models passed through ``--model-kwargs``.

Both ways of making timm's scripts know our models are exercised: ``--device-modules timm_binaryvit`` (with the
``.pth`` autoload hook switched off by ``TIMM_BINARYVIT_AUTOLOAD=0``), and the autoload hook alone (skipped when the
hook is not installed).

Options are passed only after checking that the script defines them (read with ``ast``), so a renamed option fails
with its name instead of an argparse usage message.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import timm_sources

pytestmark = pytest.mark.slow

NUM_CLASSES = 10
IMG = 32
PYRAMID = 'binaryvit_small_patch4_224'
PYRAMID_KWARGS = [
    f'img_size={IMG}', 'embed_dims=[8,16,32,64]', 'depths=[1,1,1,1]', 'num_heads=[1,1,2,2]',
    'mlp_ratios=[2,2,2,2]', 'sr_ratios=[2,2,1,1]',
]
DEIT = 'binary_deit_small_gap_mb_affine_patch16_224'
DEIT_IMG = 64  # 4 x 4 patches of 16
DEIT_KWARGS = [f'img_size={DEIT_IMG}', 'embed_dim=32', 'depth=2', 'num_heads=2', 'mlp_ratio=2']
TIMEOUT = 600

# options train.py may have for a teacher checkpoint file (timm's teacher is otherwise always loaded from the Hub)
KD_PATH_OPTIONS = ('kd_pretrained_path', 'kd_model_path', 'kd_checkpoint', 'kd_teacher_path', 'kd_pretrained')


@pytest.fixture(scope='module')
def scripts():
    return timm_sources.require_scripts()


@pytest.fixture(scope='module')
def options(scripts):
    return {name: timm_sources.script_arguments(path) for name, path in scripts.items()}


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """ImageFolder of sklearn's digits: 10 classes, 8 train and 3 validation images each, 32x32 RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    root = tmp_path_factory.mktemp('digits')
    counts = {}
    for image, label in zip(data.images, data.target):
        n = counts.get(label, 0)
        if n >= 11:
            continue
        counts[label] = n + 1
        split = 'train' if n < 8 else 'validation'
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255.0 / 16.0)).clip(0, 255).astype('uint8')
        Image.fromarray(pixels, mode='L').resize((IMG, IMG), Image.NEAREST).convert('RGB').save(folder / f'{n}.png')
    assert len(counts) == NUM_CLASSES and all(v == 11 for v in counts.values())
    return root


def _autoload_installed():
    code = "import timm; print('binaryvit_small_patch4_224' in timm.list_models())"
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_BINARYVIT_AUTOLOAD'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    return out.stdout.strip().endswith('True')


def _argv(script_opts, script, required, optional=()):
    """Command-line arguments from (dest, values) pairs; a required dest the script lacks fails the test."""
    argv = []
    for dest, values in list(required) + list(optional):
        if dest not in script_opts:
            if (dest, values) in required:
                pytest.fail(f'timm {timm_sources.timm_version()} {script} has no option for {dest!r}')
            continue
        flag = next((o for o in script_opts[dest]['options'] if o.startswith('--')), script_opts[dest]['options'][0])
        argv.append(flag)
        if values is True:
            continue
        argv.extend(str(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    return argv


def _run(script_path, argv, cwd, autoload):
    env = dict(os.environ)
    env['TIMM_BINARYVIT_AUTOLOAD'] = '1' if autoload else '0'
    env['CUDA_VISIBLE_DEVICES'] = ''
    env.setdefault('OMP_NUM_THREADS', '2')
    proc = subprocess.run(
        [sys.executable, str(script_path), *argv], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'{Path(script_path).name} {" ".join(argv)}\nexit {proc.returncode}:\n{output[-6000:]}'
    return output


def _train_argv(opts, digits, out, experiment, model, kwargs, img, explicit_import, extra=()):
    required = [
        ('data_dir', str(digits)),
        ('model', model),
        ('model_kwargs', kwargs),
        ('num_classes', NUM_CLASSES),
        ('input_size', [3, img, img]),
        ('batch_size', 16),
        ('epochs', 1),
        ('opt', 'adamw'),
        ('lr', 5e-4),
        ('weight_decay', 0.0),
        ('sched', 'cosine'),
        ('warmup_epochs', 0),
        ('workers', 0),
        ('output', str(out)),
        ('experiment', experiment),
        *extra,
    ]
    if explicit_import:
        required.append(('device_modules', 'timm_binaryvit'))
    optional = [
        ('device', 'cpu'),
        ('validation_batch_size', 16),
        ('no_prefetcher', True),
        ('log_interval', 1),
        ('checkpoint_hist', 1),
        ('seed', 0),
    ]
    return _argv(opts, 'train.py', required, optional)


def _check_train_outputs(exp_dir):
    assert exp_dir.is_dir(), f'no experiment folder {exp_dir}'
    summary = exp_dir / 'summary.csv'
    assert summary.is_file(), f'no summary.csv in {sorted(p.name for p in exp_dir.iterdir())}'
    with open(summary) as f:
        rows = list(csv.DictReader(f))
    assert rows and any('top1' in k for k in rows[0]), rows
    checkpoints = sorted(exp_dir.glob('*.pth.tar'))
    assert checkpoints, f'no checkpoint in {sorted(p.name for p in exp_dir.iterdir())}'
    best = exp_dir / 'model_best.pth.tar'
    return best if best.is_file() else (exp_dir / 'last.pth.tar' if (exp_dir / 'last.pth.tar').is_file()
                                        else checkpoints[-1])


@pytest.fixture(scope='module')
def trained(scripts, options, digits, tmp_path_factory):
    """train.py for one epoch on the tiny pyramid BinaryViT, models registered by --device-modules only."""
    out = tmp_path_factory.mktemp('train')
    argv = _train_argv(options['train.py'], digits, out, 'device_modules', PYRAMID, PYRAMID_KWARGS, IMG, True)
    output = _run(scripts['train.py'], argv, out, autoload=False)
    return _check_train_outputs(out / 'device_modules'), output


def _script_registration(opts, script):
    """How to make ``script`` see our models: the autoload hook if installed, else --device-modules."""
    if _autoload_installed():
        return [], True
    if 'device_modules' in opts:
        return ['--device-modules', 'timm_binaryvit'], False
    pytest.skip(f'{script} has no --device-modules and the timm_binaryvit autoload hook is not installed')


def test_train_with_device_modules(trained):
    checkpoint, _ = trained
    assert checkpoint.is_file()


def test_train_with_autoload_hook(scripts, options, digits, tmp_path):
    if not _autoload_installed():
        pytest.skip('timm_binaryvit_autoload.pth is not installed (plain `import timm` does not register the models)')
    argv = _train_argv(options['train.py'], digits, tmp_path, 'autoload', PYRAMID, PYRAMID_KWARGS, IMG, False)
    _run(scripts['train.py'], argv, tmp_path, autoload=True)
    _check_train_outputs(tmp_path / 'autoload')


def _eval_args(data_dir, checkpoint):
    # what validate.py and inference.py both need: the data, the trained reduced pyramid, a small CPU batch
    return [
        ('data_dir', str(data_dir)),
        ('model', PYRAMID),
        ('model_kwargs', PYRAMID_KWARGS),
        ('num_classes', NUM_CLASSES),
        ('input_size', [3, IMG, IMG]),
        ('checkpoint', str(checkpoint)),
        ('batch_size', 8),
        ('workers', 0),
    ]


def test_validate(scripts, options, digits, trained, tmp_path):
    checkpoint, _ = trained
    opts = options['validate.py']
    extra, autoload = _script_registration(opts, 'validate.py')
    results = tmp_path / 'validate.csv'
    argv = _argv(opts, 'validate.py', _eval_args(digits, checkpoint) + [('results_file', str(results))],
                 [('split', 'validation'), ('device', 'cpu'), ('no_prefetcher', True)]) + extra
    output = _run(scripts['validate.py'], argv, tmp_path, autoload)
    assert 'top1' in output.lower() or 'acc@1' in output.lower(), output[-3000:]
    assert results.is_file()
    assert 'top1' in results.read_text()


def test_inference(scripts, options, digits, trained, tmp_path):
    checkpoint, _ = trained
    opts = options['inference.py']
    extra, autoload = _script_registration(opts, 'inference.py')
    results_dir = tmp_path / 'inference'
    required = _eval_args(digits / 'validation', checkpoint)
    if 'results_dir' in opts:
        required += [('results_dir', str(results_dir))]
        optional = [('results_file', 'topk'), ('results_format', 'csv'), ('topk', 3), ('device', 'cpu'),
                    ('no_prefetcher', True)]
    else:
        required += [('output_dir', str(results_dir))]
        optional = [('topk', 3), ('device', 'cpu'), ('no_prefetcher', True)]
    argv = _argv(opts, 'inference.py', required, optional) + extra
    _run(scripts['inference.py'], argv, tmp_path, autoload)
    written = sorted(p for p in results_dir.rglob('*') if p.is_file()) if results_dir.exists() else []
    assert written, f'inference.py wrote nothing into {results_dir}'
    text = written[0].read_text()
    # one line per validation image (30), plus a header
    assert len([line for line in text.splitlines() if line.strip()]) >= 3 * NUM_CLASSES, text[:2000]


def test_benchmark(scripts, options, tmp_path):
    opts = options['benchmark.py']
    extra, autoload = _script_registration(opts, 'benchmark.py')
    results = tmp_path / 'bench.csv'
    argv = _argv(opts, 'benchmark.py', [
        ('model', PYRAMID),
        ('model_kwargs', PYRAMID_KWARGS),
        ('num_classes', NUM_CLASSES),
        ('input_size', [3, IMG, IMG]),
        ('batch_size', 2),
        ('bench', 'both'),
        ('num_warm_iter', 1),
        ('num_bench_iter', 2),
        ('results_file', str(results)),
    ], [('device', 'cpu'), ('results_format', 'csv')]) + extra
    output = _run(scripts['benchmark.py'], argv, tmp_path, autoload)
    assert results.is_file(), output[-3000:]
    text = results.read_text()
    assert PYRAMID in text or 'samples_per_sec' in text, text[:2000]


def test_train_binary_deit_with_distillation(scripts, options, digits, tmp_path):
    """train.py on a tiny fully-binary DeiT-S (Table 3 row 4) with the recipe's logit distillation.

    timm loads the teacher with pretrained weights; offline, that works only from a file, so the test trains no
    teacher: it saves a freshly initialised ``test_resnet`` re-headed to the 10 digit classes and passes it as the
    teacher's weights file. Without such an option in train.py, the distillation part is skipped."""
    opts = options['train.py']
    kd_path = next((d for d in KD_PATH_OPTIONS if d in opts), None)
    extra = []
    if kd_path is not None:
        import timm
        import torch

        teacher = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
        teacher_file = tmp_path / 'teacher.pth'
        torch.save(teacher.state_dict(), teacher_file)
        extra = [('kd_model_name', 'test_resnet'), (kd_path, str(teacher_file)), ('distill_loss_weight', 1.0),
                 ('task_loss_weight', 0.0), ('kd_temperature', 1.0)]
    argv = _train_argv(opts, digits, tmp_path, 'deit', DEIT, DEIT_KWARGS, DEIT_IMG, True, extra=extra)
    output = _run(scripts['train.py'], argv, tmp_path, autoload=False)
    _check_train_outputs(tmp_path / 'deit')
    if kd_path is None:
        pytest.skip(f'trained without distillation: train.py has none of the options {KD_PATH_OPTIONS} for a '
                    'teacher weights file, and the Hub is out of reach')
    assert 'distill' in output.lower() or 'kd' in output.lower()
