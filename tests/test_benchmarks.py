"""The benchmark scripts run end to end (quick mode) and print the table with ratios.

No timing goal is asserted: CI machines are too noisy for that. ``python benchmarks/bench.py``
(full mode) reports the goals; the README quotes its output.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / 'benchmarks'
MODELS = ('deit_small_patch16_224', 'pvt_v2_b2', 'binaryvit_small_patch4_224',
          'binary_deit_small_gap_mb_affine_patch16_224')


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'results.json'
    proc = subprocess.run(
        [sys.executable, str(BENCH / 'bench.py'), '--quick', '--json', str(out)],
        capture_output=True, text=True, timeout=1800, cwd=ROOT)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_quick_mode_prints_table_and_ratios(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert text.startswith('Machine: ')
    assert re.search(r'^model\s+mode\s+s/step\s+cpu s\s+img/s\s+peak MiB\s+t/deit\s+m/deit\s+t/pvt\s+m/pvt', text, re.M)
    ratio = r'\d+\.\d\dx'
    for model in MODELS:
        for mode in ('train', 'eval'):
            assert re.search(rf'^{model}\s+{mode}\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d\s+\d+(\s+{ratio}){{4}}$', text, re.M), \
                (model, mode, text)
    for model in MODELS[2:]:
        assert re.search(rf'^{model}\s+train_gc\s+\d', text, re.M)
        assert re.search(rf'^{model}\s+eval_dep\s+(\d|n/a)', text, re.M)  # n/a without timm_binaryvit.deploy
    assert re.search(rf'^deit_small_patch16_224\s+train\s.*\s1\.00x\s+1\.00x\s+{ratio}\s+{ratio}$', text, re.M)
    assert 'Goals' not in text  # the quick mode checks no goal


def test_quick_mode_json(quick_run):
    _, results = quick_run
    assert results is not None and results['batch'] == 2
    rows = {(r['model'], r['mode']): r for r in results['rows']}
    deit = rows[('deit_small_patch16_224', 'train')]
    assert deit['status'] == 'ok' and deit['mem'] > 100 and deit['time'] > 0
    assert deit['ratios']['deit_small_patch16_224'] == [1.0, 1.0]
    binary = rows[('binaryvit_small_patch4_224', 'train')]
    assert binary['status'] == 'ok' and binary['params'] > 20e6


def _import_bench():
    sys.path.insert(0, str(BENCH))
    try:
        import bench
    finally:
        sys.path.remove(str(BENCH))
    return bench


@pytest.mark.parametrize('script', ['bench.py', 'bench_train.py', 'bench_eval.py'])
def test_scripts_have_help(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), '--help'], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and '--quick' in proc.stdout and '--rounds' in proc.stdout


def test_goal_check_formatting(capsys):
    bench = _import_bench()
    rows = [
        dict(model=bench.BINARYVIT, mode='train', status='ok', ratios={bench.DEIT: (1.9, 1.4)}),
        dict(model=bench.BINARY_DEIT, mode='train', status='ok', ratios={bench.DEIT: (1.35, 1.2)}),
    ]
    assert not bench.check_goals(rows)
    out = capsys.readouterr().out
    assert re.search(r'binaryvit_small_patch4_224 train time\s+<= 2\.50x: 1\.90x  MET', out)
    assert re.search(r'binary_deit_small_gap_mb_affine_patch16_224 train time\s+<= 1\.30x: 1\.35x  NOT MET', out)
    assert 'All goals met: no' in out


def test_summary_ratios_from_lockstep_rounds():
    """Ratios to DeiT-S are the lockstep ones of each round; to PVT-v2-b2 they go through PVT's own ratio to
    DeiT-S in the same round; every figure is the median over rounds."""
    bench = _import_bench()

    def row(model, t, m):
        return dict(model=model, mode='train', status='ok', time=t, cpu=2 * t, mem=m, batch=16)

    rounds = []
    for deit_t, pvt_ratio, bin_ratio in ((2.0, 1.6, 1.2), (3.0, 1.8, 1.4), (2.5, 1.7, 1.1)):
        results = {(bench.DEIT, 'train'): row(bench.DEIT, deit_t, 2000.),
                   (bench.PVT, 'train'): row(bench.PVT, deit_t * pvt_ratio, 3600.),
                   (bench.BINARY_DEIT, 'train'): row(bench.BINARY_DEIT, deit_t * bin_ratio, 2800.)}
        ratios = {(bench.DEIT, 'train'): (1.0, 1.0), (bench.PVT, 'train'): (pvt_ratio, 1.8),
                  (bench.BINARY_DEIT, 'train'): (bin_ratio, 1.4)}
        rounds.append((results, ratios))
    jobs = [(bench.DEIT, 'train'), (bench.PVT, 'train'), (bench.BINARY_DEIT, 'train')]
    rows = {r['model']: r for r in bench.summarise(rounds, jobs)}
    binary = rows[bench.BINARY_DEIT]
    assert binary['ratios'][bench.DEIT] == (pytest.approx(1.2), pytest.approx(1.4))
    # per round 1.2 / 1.6, 1.4 / 1.8, 1.1 / 1.7: median 0.75
    assert binary['ratios'][bench.PVT][0] == pytest.approx(0.75)
    assert binary['time'] == pytest.approx(2.75) and binary['per_round_ratio'] == [1.2, 1.4, 1.1]
    assert rows[bench.DEIT]['ratios'][bench.DEIT] == (1.0, 1.0)
    assert rows[bench.DEIT]['ratios'][bench.PVT][0] == pytest.approx(1 / 1.7)
    assert rows[bench.PVT]['ratios'][bench.PVT] == (pytest.approx(1.0), pytest.approx(1.0))
