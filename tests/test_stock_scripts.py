"""timm's stock scripts run, unmodified, on our models: train.py (plain, logit distillation, ``--amp``,
``--torchscript``, ``--grad-checkpointing``, ``--torchcompile``), validate.py, inference.py, benchmark.py,
onnx_export.py (TorchScript and ``--dynamo`` exporters) and onnx_validate.py.

The scripts are read from ``../shared/timm-scripts`` (or ``$TIMM_SCRIPTS_DIR``, see ``timm_sources``) and run as
subprocesses on the CPU, on an ImageFolder of scikit-learn's 8x8 digits (upscaled to 32x32 RGB PNG; 4 train and 2
validation images per class), for one pyramid (BinaryViT) and one DeiT (Table 3 row 4) row at tiny sizes. Nothing is
skipped: under ``CI=true`` a missing script folder fails.

How the scripts know our models: train.py of the pyramid row gets ``--device-modules timm_binaryvit`` with the
autoload hook switched off (``TIMM_BINARYVIT_AUTOLOAD=0``); every other run relies on the autoload hook installed with
the package (onnx_export.py, validate.py and inference.py have no ``--device-modules``).
onnx_export.py has no ``--model-kwargs`` either: a tiny trained model reaches it the way a timm user passes any
non-default architecture, as a ``local-dir:`` folder written by ``timm.models.save_for_hf`` (``config.json`` carries
the constructor arguments and the input size).

Training runs start from one initial checkpoint per row (``--initial-checkpoint``) and the same seed, so every
option's run can be held against the plain run: a parameter that plain training moves must move under the option
too (TorchScript's plain ``torch.sign`` once left every input shift at exactly zero gradient).
"""
import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import timm
import timm_sources

pytestmark = pytest.mark.slow

NUM_CLASSES = 10
IMG = 32
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2
BATCH = 10  # divides both splits: no ragged last batch, so torch.compile sees one shape per mode
TIMEOUT = 900

ROWS = {
    'pyramid': ('binaryvit_small_patch4_224', dict(
        embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), img_size=IMG)),
    'deit': ('binary_deit_small_gap_mb_affine_patch16_224', dict(
        depth=2, embed_dim=64, num_heads=2, patch_size=8, img_size=IMG)),
}
# train.py options checked against the plain run, by test id
TRAIN_OPTIONS = {
    'amp_bf16': ['--amp', '--amp-dtype', 'bfloat16'],
    'torchscript': ['--torchscript'],
    'grad_checkpointing': ['--grad-checkpointing'],
}
EXPORTERS = {'legacy': [], 'dynamo': ['--dynamo']}


def _kwargs_argv(kwargs):
    # timm's ParseKwargs reads each value with ast.literal_eval
    return [f'{k}={v!r}'.replace(' ', '') for k, v in kwargs.items()]


def _create(row, **extra):
    name, kwargs = ROWS[row]
    return timm.create_model(name, num_classes=NUM_CLASSES, **dict(kwargs, **extra))


# --- running a script --------------------------------------------------------------------------------------------

def _run(script, argv, cwd, autoload=True, timeout=TIMEOUT):
    env = dict(os.environ)
    env['TIMM_BINARYVIT_AUTOLOAD'] = '1' if autoload else '0'
    env['CUDA_VISIBLE_DEVICES'] = ''
    env['HF_HUB_OFFLINE'] = '1'  # everything here is local: a network access is a bug
    env.setdefault('OMP_NUM_THREADS', '2')
    cmd = [sys.executable, str(script), *map(str, argv)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f'{Path(script).name} {" ".join(map(str, argv))}\nexit {proc.returncode}:\n{output[-8000:]}')
    return output


@pytest.fixture(scope='module')
def scripts():
    return timm_sources.require_scripts()


@pytest.fixture(scope='module')
def autoload_hook():
    """The ``.pth`` hook that registers our models on ``import timm``: the only way onnx_export.py, validate.py and
    inference.py can see them."""
    code = "import timm; print('binaryvit_small_patch4_224' in timm.list_models())"
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_BINARYVIT_AUTOLOAD'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip().endswith('True'), (
        'plain `import timm` does not register timm_binaryvit\'s models: the timm_binaryvit_autoload.pth hook is not '
        'installed in this environment (reinstall with `pip install -e ".[test]"`)\n' + out.stdout + out.stderr)


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """ImageFolder of sklearn's digits: ``train/`` and ``validation/``, 10 classes, 32x32 RGB PNG."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    root = tmp_path_factory.mktemp('digits')
    counts = {}
    for image, label in zip(data.images, data.target):
        n = counts.get(label, 0)
        if n >= TRAIN_PER_CLASS + VAL_PER_CLASS:
            continue
        counts[label] = n + 1
        folder = root / ('train' if n < TRAIN_PER_CLASS else 'validation') / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255.0 / 16.0)).clip(0, 255).astype('uint8')
        Image.fromarray(pixels, mode='L').resize((IMG, IMG), Image.NEAREST).convert('RGB').save(folder / f'{n}.png')
    assert sorted(counts.values()) == [TRAIN_PER_CLASS + VAL_PER_CLASS] * NUM_CLASSES
    return root


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp('stock')


@pytest.fixture(scope='module')
def initial(workdir):
    """One initial checkpoint per row: every training run of a row starts from the same weights."""
    found = {}
    for row in ROWS:
        torch.manual_seed(0)
        model = _create(row)
        path = workdir / f'init_{row}.pth'
        torch.save({'state_dict': model.state_dict()}, path)
        found[row] = (path, [n for n, _ in model.named_parameters()])
    return found


# --- train.py ----------------------------------------------------------------------------------------------------

def _train(scripts, digits, workdir, initial, row, experiment, extra=(), explicit_import=False):
    name, kwargs = ROWS[row]
    out = workdir / 'output'
    argv = [
        '--data-dir', digits, '--model', name, '--model-kwargs', *_kwargs_argv(kwargs),
        '--num-classes', NUM_CLASSES, '--input-size', 3, IMG, IMG, '--initial-checkpoint', initial[row][0],
        '--batch-size', BATCH, '--validation-batch-size', BATCH, '--epochs', 1, '--warmup-epochs', 0,
        '--opt', 'adamw', '--lr', 5e-4, '--weight-decay', 0.0, '--sched', 'cosine',
        '--workers', 0, '--no-prefetcher', '--device', 'cpu', '--seed', 0, '--log-interval', 1,
        '--checkpoint-hist', 1, '--output', out, '--experiment', experiment, *extra,
    ]
    if explicit_import:
        argv += ['--device-modules', 'timm_binaryvit']
    output = _run(scripts['train.py'], argv, workdir, autoload=not explicit_import)
    exp = out / experiment
    with open(exp / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1, rows
    for key in ('train_loss', 'eval_loss', 'eval_top1'):
        assert math.isfinite(float(rows[0][key])), f'{experiment}: {key}={rows[0][key]!r}\n{output[-3000:]}'
    checkpoint = exp / 'last.pth.tar'
    assert checkpoint.is_file(), sorted(p.name for p in exp.iterdir())
    return checkpoint, output


def _unchanged(initial, row, checkpoint):
    """Names of the parameters whose trained value equals the initial one, exactly."""
    path, names = initial[row]
    start = torch.load(path, map_location='cpu')['state_dict']
    end = torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict']
    assert set(start) == set(end), f'checkpoint keys differ from the model\'s: {sorted(set(start) ^ set(end))[:10]}'
    return {n for n in names if torch.equal(start[n], end[n])}


@pytest.fixture(scope='module')
def trained(scripts, digits, workdir, initial):
    """The plain run of each row (the pyramid's with ``--device-modules`` and the autoload hook off)."""
    cache = {}

    def get(row):
        if row not in cache:
            cache[row] = _train(scripts, digits, workdir, initial, row, f'plain_{row}',
                                explicit_import=row == 'pyramid')
        return cache[row]
    return get


@pytest.mark.parametrize('row', ROWS)
def test_train(trained, initial, row):
    checkpoint, _ = trained(row)
    unchanged = _unchanged(initial, row, checkpoint)
    # every binary linear layer's input shift gets a gradient (ApproxSign); the attention's q/k sign shifts may
    # not: with a single key token (the tiny pyramid's reduced keys) the softmax is constant
    shifts = {n for n in initial[row][1] if n.endswith('linear.shift')}
    assert shifts, 'no binary linear layer input shifts found'
    assert not unchanged & shifts, f'shifts that one epoch of training left untouched: {sorted(unchanged & shifts)}'


@pytest.fixture(scope='module')
def teacher_dir(workdir):
    """A full-precision teacher as a local Hub folder, so train.py loads it offline by name
    (``--kd-model-name local-dir:...``, created with ``pretrained=True`` like any teacher)."""
    from timm.models import save_for_hf

    torch.manual_seed(1)
    teacher = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    folder = workdir / 'teacher'
    save_for_hf(teacher, folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize('row', ROWS)
def test_train_logit_distillation(scripts, digits, workdir, initial, teacher_dir, autoload_hook, row):
    """The paper's recipe: logit distillation only (``distill_loss_weight=1``, ``task_loss_weight=0``, T=1)."""
    checkpoint, output = _train(scripts, digits, workdir, initial, row, f'kd_{row}', extra=[
        '--kd-model-name', f'local-dir:{teacher_dir}', '--kd-distill-type', 'logit',
        '--distill-loss-weight', 1.0, '--task-loss-weight', 0.0, '--kd-temperature', 1.0])
    assert 'Creating KD teacher model' in output, output[-3000:]
    assert 'task_weight=0.0, distill_weight=1.0' in output, output[-3000:]
    # the saved checkpoint is the student alone (keys checked against the model inside _unchanged)
    assert not _unchanged(initial, row, checkpoint) & {n for n in initial[row][1] if n.endswith('linear.shift')}


@pytest.mark.parametrize('option', TRAIN_OPTIONS)
@pytest.mark.parametrize('row', ROWS)
def test_train_option(scripts, digits, workdir, initial, trained, autoload_hook, row, option):
    checkpoint, _ = _train(scripts, digits, workdir, initial, row, f'{option}_{row}', extra=TRAIN_OPTIONS[option])
    frozen = _unchanged(initial, row, checkpoint) - _unchanged(initial, row, trained(row)[0])
    assert not frozen, (
        f'train.py {" ".join(TRAIN_OPTIONS[option])}: {len(frozen)} parameters that plain training moves stayed at '
        f'their initial value (zero gradient): {sorted(frozen)[:12]}')


def test_train_recipe_variants_and_resume(scripts, digits, workdir, initial, trained, autoload_hook):
    """Options a timm user combines with the recipe: EMA weights, channels-last, stochastic depth, mixup + cutmix with
    BCE, LAMB; then ``--resume`` of the plain run for a second epoch."""
    checkpoint, _ = _train(scripts, digits, workdir, initial, 'pyramid', 'variants_pyramid', extra=[
        '--model-ema', '--model-ema-decay', 0.5, '--channels-last', '--drop-path', 0.1, '--mixup', 0.2,
        '--cutmix', 0.2, '--bce-loss', '--opt', 'lamb'])
    saved = torch.load(checkpoint, map_location='cpu', weights_only=False)
    assert 'state_dict_ema' in saved and set(saved['state_dict_ema']) == set(saved['state_dict'])
    assert any(not torch.equal(saved['state_dict_ema'][k], saved['state_dict'][k]) for k in initial['pyramid'][1])

    _, output = _train(scripts, digits, workdir, initial, 'pyramid', 'resume_pyramid', extra=[
        '--resume', trained('pyramid')[0], '--epochs', 2])
    with open(workdir / 'output' / 'resume_pyramid' / 'summary.csv') as f:
        epochs = [int(r['epoch']) for r in csv.DictReader(f)]
    assert epochs == [1], f'--resume of a 1-epoch checkpoint with --epochs 2 ran epochs {epochs}\n{output[-2000:]}'


def test_train_torchcompile(scripts, digits, workdir, initial, trained, autoload_hook):
    """``--torchcompile inductor`` on the pyramid (whose stages differ in token count), train and eval steps."""
    checkpoint, _ = _train(scripts, digits, workdir, initial, 'pyramid', 'torchcompile_pyramid',
                           extra=['--torchcompile', 'inductor'])
    frozen = _unchanged(initial, 'pyramid', checkpoint) - _unchanged(initial, 'pyramid', trained('pyramid')[0])
    assert not frozen, f'--torchcompile: parameters left at their initial value: {sorted(frozen)[:12]}'


# --- validate.py, inference.py, benchmark.py ---------------------------------------------------------------------

def _model_argv(row, checkpoint=None):
    name, kwargs = ROWS[row]
    argv = ['--model', name, '--model-kwargs', *_kwargs_argv(kwargs), '--num-classes', NUM_CLASSES]
    return argv + (['--checkpoint', checkpoint] if checkpoint else [])


@pytest.mark.parametrize('row', ROWS)
def test_validate(scripts, digits, workdir, trained, autoload_hook, row):
    """No ``--input-size``: the model built with ``img_size=32`` must tell timm its input size itself."""
    checkpoint, _ = trained(row)
    results = workdir / f'validate_{row}.csv'
    output = _run(scripts['validate.py'], [
        digits, '--split', 'validation', *_model_argv(row, checkpoint), '--batch-size', BATCH, '--workers', 0,
        '--device', 'cpu', '--no-prefetcher', '--results-file', results], workdir)
    with open(results) as f:
        result = next(csv.DictReader(f))
    assert int(result['img_size']) == IMG, result
    assert 0.0 <= float(result['top1']) <= 100.0 and float(result['top1']) <= float(result['top5']), result
    assert 'Acc@1' in output


@pytest.mark.parametrize('row', ROWS)
def test_inference(scripts, digits, workdir, trained, autoload_hook, row):
    checkpoint, _ = trained(row)
    results_dir = workdir / f'inference_{row}'
    _run(scripts['inference.py'], [
        digits / 'validation', *_model_argv(row, checkpoint), '--input-size', 3, IMG, IMG, '--batch-size', BATCH,
        '--workers', 0, '--device', 'cpu', '--topk', 3, '--include-index', '--fullname', '--results-dir', results_dir, '--results-file', 'topk',
        '--results-format', 'csv'], workdir)
    with open(results_dir / 'topk.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == NUM_CLASSES * VAL_PER_CLASS, rows[:3]
    for r in rows:
        top = [int(x) for x in re.findall(r'\d+', r['index'])]
        assert len(set(top)) == 3 and all(0 <= x < NUM_CLASSES for x in top), r


@pytest.mark.parametrize('row', ROWS)
def test_benchmark(scripts, workdir, autoload_hook, row):
    results = workdir / f'bench_{row}.csv'
    _run(scripts['benchmark.py'], [
        *_model_argv(row), '--input-size', 3, IMG, IMG, '--batch-size', 2, '--bench', 'both', '--device', 'cpu',
        '--num-warm-iter', 1, '--num-bench-iter', 5, '--results-file', results, '--results-format', 'csv'], workdir)
    with open(results) as f:
        result = next(csv.DictReader(f))
    assert result['model'] == ROWS[row][0], result
    for key in ('infer_samples_per_sec', 'train_samples_per_sec'):
        assert float(result[key]) > 0, result


# --- onnx_export.py and onnx_validate.py -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def hub_dirs(workdir, trained, initial):
    """Each row's trained model as a ``local-dir:`` folder (``timm.models.save_for_hf``)."""
    from timm.models import load_checkpoint, save_for_hf

    cache = {}

    def get(row):
        if row not in cache:
            model = _create(row)
            load_checkpoint(model, str(trained(row)[0]), weights_only=False)
            folder = workdir / f'hub_{row}'
            save_for_hf(model, folder, safe_serialization=True)
            cache[row] = folder
        return cache[row]
    return get


def _eval_batch(folder, digits):
    """The validation images as onnx_validate.py loads them, and the eager model of ``folder``'s logits."""
    from timm.data import create_dataset, create_loader, resolve_data_config

    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    cfg = resolve_data_config({}, model=model)
    assert cfg['input_size'] == (3, IMG, IMG), cfg
    loader = create_loader(
        create_dataset('', digits / 'validation'), input_size=cfg['input_size'], batch_size=NUM_CLASSES * VAL_PER_CLASS,
        use_prefetcher=False, interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'], num_workers=0,
        crop_pct=cfg['crop_pct'])
    images, targets = next(iter(loader))
    with torch.no_grad():
        logits = model(images)
    return images, targets, logits, cfg


@pytest.fixture(scope='module')
def exported(scripts, workdir, hub_dirs, autoload_hook):
    cache = {}

    def get(row, exporter):
        if (row, exporter) not in cache:
            path = workdir / f'{row}_{exporter}.onnx'
            _run(scripts['onnx_export.py'], [path, '--model', f'local-dir:{hub_dirs(row)}', *EXPORTERS[exporter]],
                 workdir)
            cache[row, exporter] = path
        return cache[row, exporter]
    return get


@pytest.mark.parametrize('exporter', EXPORTERS)
@pytest.mark.parametrize('row', ROWS)
def test_onnx_export_matches_eager(exported, hub_dirs, digits, row, exporter):
    """onnx_export.py's file under onnxruntime gives the eager model's eval logits (float32 tolerance), for a batch
    size other than the one it was exported with."""
    import onnxruntime

    path = exported(row, exporter)
    images, _, logits, _ = _eval_batch(hub_dirs(row), digits)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    assert out.shape == logits.shape
    err = (out - logits).abs().max().item()
    assert err <= 1e-4 * max(1.0, logits.abs().max().item()), f'{exporter}: max |onnxruntime - eager| = {err}'


@pytest.mark.parametrize('exporter', EXPORTERS)
@pytest.mark.parametrize('row', ROWS)
def test_onnx_validate(scripts, exported, hub_dirs, digits, workdir, row, exporter):
    """onnx_validate.py's top-1 / top-5 on the exported file equal the eager model's on the same images."""
    path = exported(row, exporter)
    images, targets, logits, cfg = _eval_batch(hub_dirs(row), digits)
    output = _run(scripts['onnx_validate.py'], [
        digits / 'validation', '--onnx-input', path, '--workers', 0, '--batch-size', BATCH, '--img-size', IMG,
        '--interpolation', cfg['interpolation'], '--crop-pct', cfg['crop_pct'],
        '--mean', *cfg['mean'], '--std', *cfg['std']], workdir)
    found = re.search(r'\* Prec@1 ([\d.]+) \([\d.]+\) Prec@5 ([\d.]+)', output)
    assert found, output[-3000:]
    top5 = logits.topk(5, dim=1).indices
    want1 = 100.0 * (top5[:, 0] == targets).float().mean().item()
    want5 = 100.0 * (top5 == targets[:, None]).any(1).float().mean().item()
    assert float(found.group(1)) == pytest.approx(want1, abs=1e-3), output[-2000:]
    assert float(found.group(2)) == pytest.approx(want5, abs=1e-3), output[-2000:]


@pytest.mark.parametrize('row', ROWS)
def test_deployed_onnx_is_never_silently_wrong(hub_dirs, digits, workdir, row):
    """A deployed model (``timm_binaryvit.deploy``) either exports with the TorchScript exporter and gives the
    deployed eager logits under onnxruntime, or refuses to export; a graph that runs and gives other numbers is the
    one outcome not allowed."""
    import onnxruntime
    from timm_binaryvit.deploy import deploy

    images, _, logits, _ = _eval_batch(hub_dirs(row), digits)
    model = deploy(timm.create_model(f'local-dir:{hub_dirs(row)}', pretrained=True).eval())
    with torch.no_grad():
        ref = model(images)
    path = workdir / f'deployed_{row}.onnx'
    try:
        torch.onnx.export(model, images[:2], str(path), dynamo=False, input_names=['input0'],
                          output_names=['output0'], dynamic_axes={'input0': {0: 'batch'}, 'output0': {0: 'batch'}})
    except Exception as e:  # a refusal is acceptable; say which, for the record
        print(f'deployed {row}: legacy ONNX export refused: {type(e).__name__}: {str(e).splitlines()[0][:300]}')
        return
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), (
        f'deployed {row}: the exported graph runs but gives other logits (max |diff| {err})')
