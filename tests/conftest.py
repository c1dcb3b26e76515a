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


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    return require_reference()


@pytest.fixture(scope='session')
def reference_manifest(reference_dir) -> dict:
    return json.loads((reference_dir / 'manifest.json').read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _global_state():
    from timm_binaryvit import kernels

    return dict(
        threads=torch.get_num_threads(),
        default_dtype=torch.get_default_dtype(),
        deterministic=(torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled()),
        grad_enabled=torch.is_grad_enabled(),
        kernel_mode=kernels._mode_override,
    )


def _restore(state):
    from timm_binaryvit import kernels

    torch.set_num_threads(state['threads'])
    torch.set_default_dtype(state['default_dtype'])
    enabled, warn_only = state['deterministic']
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.set_grad_enabled(state['grad_enabled'])
    kernels.set_mode(state['kernel_mode'])


@pytest.fixture(autouse=True)
def _keep_global_torch_state():
    """Whatever a test sets process-wide (threads, default dtype, deterministic algorithms, grad mode, the
    kernel mode of timm_binaryvit.kernels) is put back afterwards, so no test depends on the order of the
    tests before it."""
    state = _global_state()
    yield
    if _global_state() != state:
        _restore(state)
