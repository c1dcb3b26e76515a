"""Shared fixtures.

``reference_dir`` is ``../shared/reference/official`` beside the repository. Tests that need
it skip with the reason when it is absent, except under ``CI=true``, where its absence fails.
"""
import json
import os
from pathlib import Path

import pytest
import torch

import timm_binaryvit  # noqa: F401  registers the models

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / 'shared' / 'reference' / 'official'

from timm_binaryvit.hub import AUTHORS_VARIANTS  # noqa: E402,F401  the authors' variant names -> ours


def require_reference() -> Path:
    """The reference folder, or skip (fail under CI=true) with the reason."""
    if not (REFERENCE_DIR / 'manifest.json').is_file():
        reason = f'reference data not found at {REFERENCE_DIR} (the ../shared/reference beside the repository)'
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail(reason + '; CI=true requires it')
        pytest.skip(reason)
    return REFERENCE_DIR


def reference_model_kwargs(info: dict) -> dict:
    """timm keyword arguments for a manifest entry (its class count and size overrides)."""
    kwargs = dict(num_classes=info['num_classes'])
    overrides = info['config_overrides']
    if 'num_hidden_layers' in overrides:
        kwargs['depth'] = overrides['num_hidden_layers']
    if 'hidden_size' in overrides:
        widths = overrides['hidden_size']
        kwargs.update(
            embed_dims=tuple(widths),
            depths=tuple(overrides['depths']),
            num_heads=tuple(overrides['num_attention_heads']),
            mlp_ratios=tuple(i // w for i, w in zip(overrides['intermediate_size'], widths)),
        )
    return kwargs


#: The reference cases that stay in the quick selection (``-m "not slow"``) where a test runs every case:
#: the smallest of each family. The full suite runs them all.
QUICK_REFERENCE_TAGS = ('binaryvit_tinycfg', 'bideit_cls_d1')


def slow_except(values, quick):
    """``values`` as parameters, those not in ``quick`` marked ``slow``: the quick selection keeps a few
    cases of a parametrised test, the full suite runs every one."""
    return [v if v in quick else pytest.param(v, marks=pytest.mark.slow) for v in values]


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    return require_reference()


@pytest.fixture(scope='session')
def reference_manifest(reference_dir) -> dict:
    return json.loads((reference_dir / 'manifest.json').read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: Variables that pytest itself sets while a test runs.
_PYTEST_ENVIRON = ('PYTEST_CURRENT_TEST',)


def _global_state():
    from timm_binaryvit import kernels

    return dict(
        threads=torch.get_num_threads(),
        default_dtype=torch.get_default_dtype(),
        deterministic=(torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled()),
        grad_enabled=torch.is_grad_enabled(),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        kernel_mode=kernels._mode_override,
        environ={k: v for k, v in os.environ.items() if k not in _PYTEST_ENVIRON},
    )


def _restore(state):
    from timm_binaryvit import kernels

    torch.set_num_threads(state['threads'])
    torch.set_default_dtype(state['default_dtype'])
    enabled, warn_only = state['deterministic']
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.set_grad_enabled(state['grad_enabled'])
    torch.set_float32_matmul_precision(state['float32_matmul_precision'])
    kernels.set_mode(state['kernel_mode'])
    for name in set(os.environ) - set(state['environ']) - set(_PYTEST_ENVIRON):
        del os.environ[name]
    os.environ.update(state['environ'])


def _changes(before, after):
    changed = [f'{key}: {before[key]!r} -> {after[key]!r}' for key in before
               if key != 'environ' and before[key] != after[key]]
    env_before, env_after = before['environ'], after['environ']
    changed += [f'${name}: {env_before.get(name)!r} -> {env_after.get(name)!r}'
                for name in sorted(set(env_before) | set(env_after)) if env_before.get(name) != env_after.get(name)]
    return changed


@pytest.fixture(autouse=True)
def _keep_global_torch_state():
    """No test may leave process-wide state changed (torch's thread count, default dtype, deterministic
    algorithms, grad mode and float32 matmul precision, the kernel mode of timm_binaryvit.kernels, the
    environment variables), so that no test depends on the order of the tests before it. A test that does
    fails, and the state is put back for the tests after it: set such state with ``monkeypatch`` or a
    fixture that restores it."""
    before = _global_state()
    yield
    after = _global_state()
    if after != before:
        _restore(before)
        pytest.fail('the test left global state changed (now restored): ' + '; '.join(_changes(before, after)),
                    pytrace=False)
