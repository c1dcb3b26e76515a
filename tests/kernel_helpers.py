"""Shared pieces of the kernel-choice tests (test_kernels.py, test_deploy_kernels.py): a fixture that
starts each test with no choice made and no mode forced, and a fake clock that simulates a machine on
which each kind of kernel costs what the test says."""
from typing import Dict, Iterable

import pytest

from timm_binaryvit import kernels


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """No earlier choice, no forced mode and no disk cache from the environment, before and after each test
    (a module that imports this fixture uses it for every test)."""
    monkeypatch.delenv(kernels.ENV_MODE, raising=False)
    monkeypatch.delenv(kernels.ENV_CACHE, raising=False)
    kernels.clear_cache()
    yield
    kernels.clear_cache()
    kernels.set_mode(None)


def fake_clock(monkeypatch, cost: Dict[str, float], products: Iterable[str] = ('sign_mm',)) -> None:
    """Make each timed run of a candidate of ``products`` cost ``cost[kind]`` seconds on a fake clock: the
    candidates are wrapped so that the clock advances by their cost when they run (they still run, so a
    kernel that fails on a shape still fails)."""
    now = [0.0]
    monkeypatch.setattr(kernels, 'timer', lambda: now[0])
    for product in products:
        registry = {}
        for kind, candidate in kernels._registry[product].items():
            def make(shape, dtype, device, _kind=kind, _make=candidate.make):
                run = _make(shape, dtype, device)

                def timed():
                    run()
                    now[0] += cost[_kind]
                return timed
            registry[kind] = kernels._Candidate(make, candidate.unavailable)
        monkeypatch.setitem(kernels._registry, product, registry)
