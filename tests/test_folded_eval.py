"""Eval mode through the layers' folded twins (timm_binaryvit.folded_eval): the same function as the
module-by-module path for every model, rebuilt whenever a parameter or running statistic changes,
never where a gradient, a hook or a batch-statistics BatchNorm needs the modules, and never touching
the caller's tensors."""
import pytest
import torch

from timm_binaryvit import folded_eval
from timm_binaryvit.blocks import Block
from timm_binaryvit.folded_eval import unfolded

from deploy_helpers import MODELS, RTOL, images, make, one_thread, rel  # noqa: F401


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, Block)]


def _twins(model):
    return [folded_eval._twins.get(b) for b in _blocks(model)]


def _reference(model, x):
    with torch.no_grad(), unfolded():
        return model(x)


@pytest.mark.parametrize('name', MODELS)
def test_eval_runs_folded_twins_equal_to_module_path(name):
    model = make(name)
    x = images(model)
    ref = _reference(model, x)
    assert all(t is None for t in _twins(model))  # unfolded() builds none
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)
    assert all(t is not None for t in _twins(model))
    assert rel(out, ref) < RTOL
    with torch.no_grad(), unfolded():
        assert rel(features, model.forward_features(x)) < RTOL


def test_twin_is_kept_until_a_parameter_or_statistic_changes():
    model = make('binaryvit_small_patch4_224')
    x = images(model)
    with torch.inference_mode():
        model(x)
        first = _twins(model)
        model(x)
        assert _twins(model) == first  # same objects: nothing changed, nothing refolded
    block = _blocks(model)[0]
    with torch.no_grad():
        block.mlp.fc1.norm.bn.running_mean.add_(0.5)  # a buffer changed in place
        block.attn.q.linear.weight.mul_(-1)  # and a weight
        out = model(x)
    assert _twins(model)[0] is not first[0] and _twins(model)[1:] == first[1:]
    assert rel(out, _reference(model, x)) < RTOL


def test_training_steps_and_state_dict_loads_are_seen():
    model = make('binary_deit_small_gap_mb_affine_patch16_224')
    x = images(model, batch=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        model.train()
        assert all(t is None for t in _twins(model))  # going back to training drops the twins
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            assert rel(model(x), _reference(model, x)) < RTOL
    other = make('binary_deit_small_gap_mb_affine_patch16_224', seed=5)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert rel(model(x), _reference(other, x)) < RTOL


def test_module_path_where_gradients_or_hooks_are_wanted():
    model = make('binaryvit_small_patch4_224')
    x = images(model)
    ref = _reference(model, x)
    out = model(x)  # eval mode, gradients on: the modules, with their autograd
    assert out.requires_grad and all(t is None for t in _twins(model))
    out.sum().backward()
    assert model.stages[0].blocks[0].attn.q.linear.weight.grad is not None
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)
    seen = []
    handle = model.stages[1].blocks[0].mlp.register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen == [1] and _twins(model)[1] is None  # the hooked block ran module by module


def test_batch_statistics_batchnorm_uses_module_path():
    model = make('binary_deit_small_gap_mb_affine_patch16_224')
    bn = model.blocks[0].norm1.bn
    bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    x = images(model)
    with torch.no_grad():
        out = model(x)
    assert _twins(model)[0] is None
    torch.testing.assert_close(out, _reference(model, x), rtol=0, atol=0)


def test_callers_tensors_are_left_alone():
    model = make('binaryvit_small_patch4_224')
    x = images(model)
    with torch.no_grad(), unfolded():
        ref_final, ref_inter = model.forward_intermediates(x)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
    assert rel(final, ref_final) < RTOL
    assert len(inter) == len(ref_inter) and all(rel(a, b) < RTOL for a, b in zip(inter, ref_inter))
    block = _blocks(model)[0]
    tokens = torch.randn(2, 32 * 32, 16, dtype=torch.float64)
    kept = tokens.clone()
    with torch.no_grad():
        block(tokens, (32, 32))
    assert torch.equal(tokens, kept)


def test_inference_mode_parameters_still_fold():
    # tensors made under inference_mode keep no version counter: folded on every call, still exact
    with torch.inference_mode():
        model = make('binary_deit_small_gap_mb_affine_patch16_224')
        x = images(model)
        out = model(x)
        with unfolded():
            ref = model(x)
    assert rel(out, ref) < RTOL
    assert all(t is None for t in _twins(model))
