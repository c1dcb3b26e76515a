"""Run timm's own model test-suite (``tests/test_models.py`` of the installed timm version) on our models.

timm's file is fetched at test time (see ``timm_sources``) and run unmodified by pytest in a subprocess, in a temporary
folder holding a copy of it, timm's ``tests/conftest.py`` and two generated files:

* ``_binaryvit_suite_plugin.py``, loaded with ``-p``: imports ``timm_binaryvit`` before ``test_models.py`` builds its
  model lists (so our models are in them even without the ``.pth`` autoload hook), keeps only the items parametrised
  by one of our model names, and writes a JSON report of every outcome.
* ``test_binaryvit_extra.py``: timm's tests that pick models by the *module* that registered them (timm's
  ``FEAT_INTER_FILTERS`` names timm's own modules, so they never pick a plugin's models) run on our models by calling
  timm's test functions directly. It also runs ``test_model_default_cfgs_non_std`` on our DeiT-S family (see
  ``NON_STD``), for which the plugin marks ``test_model_default_cfgs`` not applicable.

By default the suite runs on ``DEFAULT_MODELS`` (one model per code path, to keep CPU time down);
``TIMM_BINARYVIT_FULL_SUITE=1`` runs it on every registered model, ``TIMM_BINARYVIT_SUITE_MODELS=a,b`` on those
named. The parent test asserts: the models were collected, every timm test function listed in ``EXPECTED`` ran on
each of them and none failed. Per-function pass/skip counts are printed (``pytest -s``) and written to
``timm_suite_report.json`` in pytest's temp folder.
"""
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

import timm_sources

pytestmark = pytest.mark.slow

# Which of our models timm's suite runs on. At full size a BinaryViT / DeiT-S forward takes seconds on a 2-core CPU and
# timm's tests run several per model, so by default one model per distinct code path: the pyramid with binary and with
# full-precision stage transitions, DeiT-S with the class token (Table 3 row 1) and with average pooling, multi-branch
# pooling and the affine (row 4, a superset of rows 2 and 3). `binaryvit` is an alias of binaryvit_small_patch4_224.
# TIMM_BINARYVIT_FULL_SUITE=1 runs every registered model, and timm's slow, unmarked
# test_prune_intermediate_layers_contract too.
DEFAULT_MODELS = (
    'binaryvit_small_patch4_224',
    'binaryvit_small_fpembed_patch4_224',
    'binary_deit_small_patch16_224',
    'binary_deit_small_gap_mb_affine_patch16_224',
)
FULL = os.environ.get('TIMM_BINARYVIT_FULL_SUITE', '').lower() not in ('', '0', 'false', 'no')

# Token-sequence models: timm sends its own ViT-style families (its NON_STD_FILTERS: 'deit*', 'vit_*', ...) through
# test_model_default_cfgs_non_std, because test_model_default_cfgs wants an NCHW/NHWC feature map from forward_features
# and a spatial `pool_size`. Our DeiT-S family is such a model, but its names do not match timm's patterns: the plugin
# marks test_model_default_cfgs not applicable for these and test_binaryvit_extra.py runs the non_std variant.
NON_STD = ('binary_deit_*',)

# timm test function -> which of the models run it must select and pass: 'all', 'std' or 'non_std'. Anything else of
# timm's that picks one of them is run and must not fail either.
EXPECTED = {
    'test_model_forward': 'all',
    'test_model_backward': 'all',
    'test_model_default_cfgs': 'std',
    'test_model_default_cfgs_non_std': 'non_std',  # test_binaryvit_extra.py
    'test_model_forward_torchscript': 'all',
    'test_model_forward_features': 'all',
    'test_model_forward_fx': 'all',
    'test_model_backward_fx': 'all',
    'test_model_forward_fx_torchscript': 'all',
    'test_model_forward_intermediates': 'all',  # test_binaryvit_extra.py
    'test_model_forward_intermediates_features': 'all',  # test_binaryvit_extra.py
}
if FULL:
    EXPECTED['test_prune_intermediate_layers_contract'] = 'all'  # test_binaryvit_extra.py

PLUGIN = r'''
"""Restrict timm's tests/test_models.py to timm_binaryvit's models and report every outcome as JSON."""
import fnmatch
import json
import os

import pytest
import timm
import timm_binaryvit  # noqa: F401  registers the models before test_models.py is imported


def _our_models():
    names = os.environ.get('BINARYVIT_SUITE_MODELS')
    if names:
        return sorted(n for n in names.split(',') if n)
    ours = []
    for name in timm.list_models():
        fn = timm.models.model_entrypoint(name)
        if (getattr(fn, '__module__', None) or '').split('.')[0] == 'timm_binaryvit':
            ours.append(name)
    return sorted(ours)


OUR_MODELS = _our_models()
_OURS = set(OUR_MODELS)
_NON_STD_FILTERS = [f for f in os.environ.get('BINARYVIT_SUITE_NON_STD', '').split(',') if f]
NON_STD_MODELS = [m for m in OUR_MODELS if any(fnmatch.fnmatch(m, f) for f in _NON_STD_FILTERS)]
_RESULTS = {}
_NOT_APPLICABLE = pytest.mark.skip(reason=(
    'not applicable: a token-sequence model without a spatial feature map; as for timm\'s own deit*/vit_* models, '
    'test_model_default_cfgs_non_std runs instead'))


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        name = params.get('model_name')
        # list_models(include_tags=True) gives 'name.tag'
        (keep if isinstance(name, str) and name.split('.')[0] in _OURS else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    for item in keep:
        name = item.callspec.params['model_name'].split('.')[0]
        if item.originalname == 'test_model_default_cfgs' and name in NON_STD_MODELS:
            item.add_marker(_NOT_APPLICABLE)


def _message(report):
    crash = getattr(report.longrepr, 'reprcrash', None)
    if crash is not None:
        return crash.message
    if isinstance(report.longrepr, tuple):  # skip: (file, line, reason)
        return str(report.longrepr[2])
    return str(report.longrepr)[-2000:]


def pytest_runtest_logreport(report):
    entry = _RESULTS.setdefault(report.nodeid, dict(outcome='passed', message='', duration=0.0))
    entry['duration'] += report.duration
    if report.when == 'call' and report.passed:
        return
    if report.failed:
        entry['outcome'] = 'failed' if report.when == 'call' else 'error'
        entry['message'] = f'[{report.when}] ' + _message(report)
    elif report.skipped and entry['outcome'] == 'passed':
        entry['outcome'] = 'skipped'
        entry['message'] = _message(report)


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get('BINARYVIT_SUITE_REPORT')
    if not out:
        return
    items = {}
    for item in session.items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        items[item.nodeid] = dict(
            file=item.nodeid.split('::')[0], function=item.originalname, model=params.get('model_name'),
            **_RESULTS.get(item.nodeid, dict(outcome='not run', message='', duration=0.0)),
        )
    with open(out, 'w') as f:
        json.dump(dict(models=OUR_MODELS, exitstatus=int(exitstatus), items=items), f, indent=1)
'''

EXTRA = r'''
"""timm's model-parametrised tests that select models by registering module, run on timm_binaryvit's models."""
import os

import pytest

import test_models as _timm_tests
from _binaryvit_suite_plugin import NON_STD_MODELS, OUR_MODELS


@pytest.mark.parametrize('model_name', NON_STD_MODELS)
@pytest.mark.parametrize('batch_size', [1])
def test_model_default_cfgs_non_std(model_name, batch_size):
    # the cfg_device fixture of test_models.py, which is not visible from this file
    cfg_device = 'meta' if _timm_tests._HAS_DEVICE_CONTEXT else _timm_tests.torch_device
    _timm_tests.test_model_default_cfgs_non_std(model_name, batch_size, cfg_device)


@pytest.mark.parametrize('model_name', OUR_MODELS)
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_intermediates(model_name, batch_size):
    _timm_tests.test_model_forward_intermediates(model_name, batch_size)


@pytest.mark.parametrize('model_name', OUR_MODELS)
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_intermediates_features(model_name, batch_size):
    _timm_tests.test_model_forward_intermediates_features(model_name, batch_size)


@pytest.mark.parametrize('model_name', OUR_MODELS)
def test_prune_intermediate_layers_contract(model_name):
    if os.environ.get('BINARYVIT_SUITE_FULL') != '1':
        pytest.skip("slow, not run by timm's CI either; TIMM_BINARYVIT_FULL_SUITE=1 runs it")
    _timm_tests.test_prune_intermediate_layers_contract(model_name)
'''

PYTEST_INI = '''[pytest]
filterwarnings =
    ignore::pytest.PytestUnknownMarkWarning
'''


def _suite_models():
    ours = _our_registered_models()
    chosen = os.environ.get('TIMM_BINARYVIT_SUITE_MODELS')
    if chosen:
        return [m for m in chosen.split(',') if m in ours]
    return ours if FULL else [m for m in DEFAULT_MODELS if m in ours]


def _our_registered_models():
    import timm
    import timm_binaryvit  # noqa: F401

    return sorted(
        n for n in timm.list_models()
        if (getattr(timm.models.model_entrypoint(n), '__module__', None) or '').split('.')[0] == 'timm_binaryvit'
    )


@pytest.fixture(scope='module')
def suite(tmp_path_factory):
    test_models = timm_sources.require_test_models()
    ours = _suite_models()
    if not ours:
        pytest.fail('importing timm_binaryvit registered none of the models to test with timm', pytrace=False)

    work = tmp_path_factory.mktemp('timm_suite')
    shutil.copy2(test_models, work / 'test_models.py')
    conftest = test_models.parent / 'conftest.py'
    if conftest.is_file():
        shutil.copy2(conftest, work / 'conftest.py')
    (work / '_binaryvit_suite_plugin.py').write_text(PLUGIN)
    (work / 'test_binaryvit_extra.py').write_text(EXTRA)
    (work / 'pytest.ini').write_text(PYTEST_INI)
    report = work / 'report.json'

    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(work)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env['BINARYVIT_SUITE_REPORT'] = str(report)
    env['BINARYVIT_SUITE_MODELS'] = ','.join(ours)
    env['BINARYVIT_SUITE_FULL'] = '1' if FULL else '0'
    env['BINARYVIT_SUITE_NON_STD'] = ','.join(NON_STD)
    env.setdefault('TORCH_DEVICE', 'cpu')
    cmd = [
        sys.executable, '-m', 'pytest', '-p', '_binaryvit_suite_plugin', '-p', 'no:cacheprovider',
        '-q', '-rN', '--tb=short', '-o', 'console_output_style=classic', '--rootdir', str(work),
        'test_models.py', 'test_binaryvit_extra.py',
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=3000)
    elapsed = time.time() - t0
    (work / 'pytest_output.txt').write_text(proc.stdout + proc.stderr)
    if not report.exists():
        pytest.fail(
            f'timm test suite produced no report (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}',
            pytrace=False)
    data = json.loads(report.read_text())
    data.update(returncode=proc.returncode, elapsed=elapsed, output=proc.stdout + proc.stderr, work=str(work))

    # summary per timm test function, kept for the report to the maintainers
    per_fn = defaultdict(Counter)
    for item in data['items'].values():
        per_fn[f"{item['file']}::{item['function']}"][item['outcome']] += 1
    summary = {k: dict(v) for k, v in sorted(per_fn.items())}
    failures = {k: v['message'] for k, v in sorted(data['items'].items()) if v['outcome'] in ('failed', 'error')}
    (tmp_path_factory.getbasetemp() / 'timm_suite_report.json').write_text(
        json.dumps(dict(models=data['models'], summary=summary, failures=failures, elapsed=elapsed), indent=1))
    print(f'\ntimm {timm_sources.timm_version()} tests/test_models.py on {len(data["models"])} models '
          f'in {elapsed:.0f}s (exit {proc.returncode})')
    for k, v in summary.items():
        print(f'  {k}: {v}')
    for k, v in failures.items():
        first = next((line for line in v.splitlines() if line.strip() and line.strip() != '[call] RuntimeError:'), '')
        print(f'  FAILED {k}: {first.strip()}')
    return data


def _items(suite, function):
    return [v for v in suite['items'].values() if v['function'] == function]


def test_suite_ran_on_our_models(suite):
    assert suite['models'] == sorted(_suite_models())
    assert suite['items'], 'no test of timm\'s test_models.py was collected for our models:\n' + suite['output'][-4000:]
    assert suite['returncode'] in (0, 1), f"pytest exit {suite['returncode']}:\n" + suite['output'][-4000:]


def _non_std(model):
    return any(fnmatch.fnmatch(model, f) for f in NON_STD)


@pytest.mark.parametrize('function', list(EXPECTED))
def test_timm_test_function(suite, function):
    which = EXPECTED[function]
    wanted = sorted(m for m in suite['models'] if which == 'all' or (which == 'non_std') == _non_std(m))
    if not wanted:
        pytest.skip(f'none of the models run is {which}')
    items = [v for v in _items(suite, function) if v['model'].split('.')[0] in wanted]
    tested = sorted({v['model'].split('.')[0] for v in items})
    assert tested == wanted, f'{function} did not select all of {wanted}: {tested}'
    bad = {v['model']: v['message'] for v in items if v['outcome'] in ('failed', 'error', 'not run')}
    assert not bad, f'{function} failed for:\n' + '\n'.join(f'{m}: {e}' for m, e in sorted(bad.items()))
    passed = [v for v in items if v['outcome'] == 'passed']
    assert passed, f'{function} skipped every model: ' + '; '.join(sorted({v["message"] for v in items}))


def test_no_other_timm_test_fails(suite):
    """Any other of timm's tests that picks one of our models (e.g. pretrained-weight tests) must not fail."""
    others = [v for v in suite['items'].values() if v['function'] not in EXPECTED]
    bad = [f"{v['function']}[{v['model']}]: {v['message']}" for v in others if v['outcome'] in ('failed', 'error')]
    assert not bad, '\n'.join(bad)
