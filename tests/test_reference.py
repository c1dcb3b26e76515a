"""Our models reproduce the authors' code: eval logits, train logits and every stored gradient, in float64.

Data: ``../shared/reference/official`` (see its README). Agreement asked by the project: 1e-6
relative; what we get is ~1e-15 for logits and ~1e-8 for gradients (stored in float32).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import timm
from timm_binaryvit import checkpoint_filter_fn, convert_authors_state_dict
from timm_binaryvit.folded_eval import unfolded

from conftest import (AUTHORS_VARIANTS, QUICK_REFERENCE_TAGS, REFERENCE_DIR, reference_model_kwargs,
                      require_reference, slow_except)

TAGS = sorted(json.loads((REFERENCE_DIR / 'manifest.json').read_text())) if (REFERENCE_DIR / 'manifest.json').is_file() \
    else ['(reference data absent)']
RTOL = 1e-6
# A bias whose only path to the output runs through a train-mode BatchNorm has an analytically
# zero gradient; both codebases hold rounding noise there. Compare those absolutely.
GRAD_ABS_FLOOR = 1e-10


def _build(tag):
    reference = require_reference()
    info = json.loads((reference / 'manifest.json').read_text())[tag]
    model = timm.create_model(AUTHORS_VARIANTS[info['official_variant']], **reference_model_kwargs(info)).double()
    state_dict = load_file(reference / f'{tag}.official.safetensors')
    state_dict = {k: v.double() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    assert sum(p.numel() for p in model.parameters()) == info['num_params']
    return model, reference


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize('tag', TAGS)
def test_eval_logits(tag):
    model, reference = _build(tag)
    io = load_file(reference / f'{tag}.io.safetensors')
    with torch.no_grad():
        logits = model.eval()(io['input'].double())  # the layers' folded twins (timm_binaryvit.folded_eval)
        with unfolded():
            module_logits = model(io['input'].double())
    assert logits.dtype == torch.float64
    assert _rel(logits, io['logits']) < RTOL
    assert _rel(module_logits, io['logits']) < RTOL


@pytest.mark.parametrize('tag', TAGS)
def test_train_logits_and_gradients(tag):
    model, reference = _build(tag)
    io = load_file(reference / f'{tag}.io.safetensors')
    train = load_file(reference / f'{tag}.train.safetensors')
    logits = model.train()(io['input'].double())
    assert _rel(logits, train['__train_logits__']) < RTOL
    (logits * train['__grad_weight__']).sum().backward()

    stored = {k: v for k, v in train.items() if not k.startswith('__')}
    expected = convert_authors_state_dict(stored, model)
    params = dict(model.named_parameters())
    assert len(expected) >= 50
    checked = 0
    for name, grad_ref in expected.items():
        grad_ref = grad_ref.double()
        grad = params[name].grad
        assert grad is not None, f'{name} received no gradient'
        err = (grad - grad_ref).norm().item()
        if grad_ref.norm() < GRAD_ABS_FLOOR:
            assert err < GRAD_ABS_FLOOR, f'{name}: expected a zero gradient, error {err:.3g}'
        else:
            assert err / grad_ref.norm().item() < RTOL, f'{name}: relative error {err / grad_ref.norm().item():.3g}'
            checked += 1
    assert checked >= len(expected) // 2


@pytest.mark.parametrize('tag', slow_except(TAGS, QUICK_REFERENCE_TAGS))
def test_grad_checkpointing_matches_reference(tag):
    """Checkpointed training computes the same logits and gradients and leaves the same running stats."""
    model, reference = _build(tag)
    plain, _ = _build(tag)
    model.set_grad_checkpointing(True)
    x = load_file(reference / f'{tag}.io.safetensors')['input'].double()
    weight = load_file(reference / f'{tag}.train.safetensors')['__grad_weight__']
    for m in (model, plain):
        (m.train()(x) * weight).sum().backward()
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-9, atol=1e-12, msg=name)
    buffers = dict(plain.named_buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=0, atol=0, msg=name)


def test_reference_layout_parameter_counts(reference_dir):
    """Every full-size configuration of the authors has exactly our parameter count and key set."""
    layout = json.loads((reference_dir / 'official_state_dict_layout.json').read_text())
    assert set(layout) == set(AUTHORS_VARIANTS)
    for variant, name in AUTHORS_VARIANTS.items():
        model = timm.create_model(name, device='meta')
        assert sum(p.numel() for p in model.parameters()) == layout[variant]['num_params'], name
        shapes = {k: tuple(v) for k, v in layout[variant]['state_dict'].items()}
        converted = convert_authors_state_dict(shapes, model)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert converted == ours, name
