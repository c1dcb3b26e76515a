"""The README's digits example (examples/train_digits.py) on a shortened schedule.

Runs ``main(['--quick', ...])`` in-process: export of scikit-learn's digits to an
ImageFolder, a full-precision teacher saved with ``save_for_hf`` and reloaded through
``local-dir:``, a binary student distilled from it with ``LogitDistillationTask`` and the
same student trained without a teacher, then the printed table and the PNG of the learning
curves and the distilled student's confusion matrix.
"""
import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location('train_digits', REPO_ROOT / 'examples' / 'train_digits.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Tee(io.StringIO):
    """Keeps what is printed and passes it on (visible with ``pytest -s``)."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text):
        self.stream.write(text)
        return super().write(text)


@pytest.fixture(scope='module')
def example():
    # scikit-learn sets KMP_* environment variables when first imported: import it once here, before the
    # tests, so that the conftest's check sees no test change the environment
    import sklearn.model_selection  # noqa: F401
    return _load_example()


@pytest.fixture(scope='module')
def quick_run(example, tmp_path_factory):
    out = tmp_path_factory.mktemp('digits')
    threads = torch.get_num_threads()
    log = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(log):
            # one thread: robust timing on a busy 2-core machine
            results = example.main(['--quick', '--output', str(out), '--threads', '1'])
    finally:
        torch.set_num_threads(threads)
    return out, results, log.getvalue()


def test_export_digits(example, tmp_path):
    counts = example.export_digits(tmp_path / 'd', val_fraction=0.2, seed=0)
    assert counts == {'train': 1437, 'validation': 360}
    for split, n in counts.items():
        classes = sorted(p.name for p in (tmp_path / 'd' / split).iterdir())
        assert classes == [str(i) for i in range(10)]
        pngs = list((tmp_path / 'd' / split).glob('*/*.png'))
        assert len(pngs) == n
    # stratified: every class is in the held-out split with about its share
    per_class = [len(list((tmp_path / 'd' / 'validation' / str(c)).glob('*.png'))) for c in range(10)]
    assert min(per_class) >= 34 and max(per_class) <= 38
    # fixed seed: the same files again
    again = example.export_digits(tmp_path / 'e', val_fraction=0.2, seed=0)
    assert again == counts
    names = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob('*.png'))  # noqa: E731
    assert names(tmp_path / 'd') == names(tmp_path / 'e')


@pytest.mark.slow
def test_quick_run_distils_binary_student(quick_run):
    out, results, _ = quick_run
    res = results['results']
    assert set(res) == {'teacher', 'student_kd', 'student_ce'}
    assert res['student_kd']['top1'] >= 50.0, res['student_kd']
    assert res['student_ce']['top1'] >= 20.0, res['student_ce']  # above chance (10%)
    assert res['teacher']['top1'] >= 50.0, res['teacher']
    # reloaded from save_for_hf, the binary student scores what it scored in memory
    assert res['student_kd']['reloaded_top1'] == pytest.approx(res['student_kd']['top1'])
    # the binary student is the same network with and without a teacher
    assert res['student_kd']['params'] == res['student_ce']['params']
    assert (out / 'results.json').is_file()
    assert json.loads((out / 'results.json').read_text())['results']['student_kd']['top1'] == res['student_kd']['top1']


@pytest.mark.slow
def test_teacher_saved_with_save_for_hf(quick_run):
    out, results, log = quick_run
    teacher_dir = Path(results['paths']['teacher'])
    assert teacher_dir == out / 'teacher'
    assert (teacher_dir / 'config.json').is_file()
    assert (teacher_dir / 'model.safetensors').is_file()
    config = json.loads((teacher_dir / 'config.json').read_text())
    assert config['architecture'] == 'resnet10t'
    assert config['num_classes'] == 10
    assert config['model_args']['in_chans'] == 1
    assert config['pretrained_cfg']['mean'] == [0.5]
    assert 'teacher reloaded from local-dir:' in log
    student_dir = Path(results['paths']['student_kd'])
    assert json.loads((student_dir / 'config.json').read_text())['architecture'] == 'binaryvit_small_patch4_224'
    assert (student_dir / 'model.safetensors').is_file()


@pytest.mark.slow
def test_printed_table_has_three_rows(example, quick_run):
    _, results, log = quick_run
    table = results['table']
    assert table in log
    rows = [line for line in table.splitlines()[2:] if line.startswith('|')]
    assert len(rows) == 3
    for key, row in zip(('teacher', 'student_kd', 'student_ce'), rows):
        assert example.ROW_NAMES[key] in row
        assert f'{results["results"][key]["top1"]:.2f}' in row
        assert f'{results["results"][key]["params"]:,}' in row
    # per-epoch progress lines were shown for all three runs
    for tag in ('[teacher] epoch', '[student+KD] epoch', '[student, no KD] epoch'):
        assert tag in log


def test_table_without_ops(example):
    res = dict(top1=91.0, top5=99.0, params=1234, ops=None, train_time_s=3.0)
    table = example.format_table({'teacher': res, 'student_kd': dict(res, ops=2.5e6)})
    lines = table.splitlines()
    assert len(lines) == 4
    cells = lambda line: [c.strip() for c in line.strip('|').split('|')]  # noqa: E731
    assert cells(lines[0])[4] == 'OPs / image'
    assert cells(lines[2])[4] == '-'
    assert cells(lines[3])[4] == '2.500M'
    assert cells(lines[2])[3] == '1,234'


PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _history(epochs, top1):
    return [dict(epoch=e + 1, train_loss=2.0 / (e + 1), train_top1=top1 * (e + 1) / epochs, loss=2.5 / (e + 1),
                 top1=top1 * (e + 1) / epochs, top5=100.0) for e in range(epochs)]


def test_plot_results(example, tmp_path):
    pytest.importorskip('matplotlib', reason='the plot extra (matplotlib) is not installed')
    history = {'teacher': _history(3, 99.0), 'student_kd': _history(4, 95.0), 'student_ce': _history(4, 90.0)}
    confusion = [[30 if i == j else (1 if j == (i + 1) % 10 else 0) for j in range(10)] for i in range(10)]
    path = example.plot_results(history, confusion, tmp_path / 'sub' / 'curves.png')
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000


def test_confusion_matrix_counts(example):
    class Fixed(torch.nn.Module):  # predicts (label + 1) % 10 for the first half, the label for the rest
        def forward(self, x):
            labels = x[:, 0, 0, 0].long()
            predicted = torch.where(torch.arange(len(x)) < len(x) // 2, (labels + 1) % 10, labels)
            return torch.nn.functional.one_hot(predicted, 10).float()

    targets = torch.arange(20) % 10
    images = targets.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    confusion = example.confusion_matrix(Fixed(), [(images, targets)])
    assert sum(map(sum, confusion)) == 20
    for i in range(10):
        assert confusion[i][(i + 1) % 10] == 1 and confusion[i][i] == 1


def test_plot_without_matplotlib_says_how_to_get_it(example, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "timm-binaryvit\[plot\]"'):
        example.plot_results({'student_kd': _history(2, 50.0)}, [[0] * 10] * 10, tmp_path / 'x.png')
    assert not (tmp_path / 'x.png').exists()


@pytest.mark.slow
def test_quick_run_draws_the_picture(quick_run):
    pytest.importorskip('matplotlib', reason='the plot extra (matplotlib) is not installed')
    out, results, log = quick_run
    path = out / 'digits_results.png'
    assert results['paths']['plot'] == str(path)
    assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 20_000
    assert f'learning curves and confusion matrix: {path}' in log
    confusion = results['confusion_student_kd']
    assert sum(map(sum, confusion)) == results['counts']['validation']
    correct = sum(confusion[i][i] for i in range(10))
    assert correct / sum(map(sum, confusion)) * 100 == pytest.approx(results['results']['student_kd']['top1'])


@pytest.mark.slow
def test_run_finishes_without_matplotlib(example, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    threads = torch.get_num_threads()
    try:
        results = example.main(['--quick', '--epochs', '1', '--teacher-epochs', '1', '--skip-baseline',
                                '--output', str(tmp_path), '--threads', '1'])
    finally:
        torch.set_num_threads(threads)
    log = capsys.readouterr().out
    assert 'no picture drawn' in log and 'pip install "timm-binaryvit[plot]"' in log
    assert results['paths']['plot'] is None and (tmp_path / 'results.json').is_file()
