"""Inference deployment (``deploy``): the deployed model's eval logits equal the training model's.

* In float64 (1e-6 relative; we see ~1e-15) for every registered model (reduced in size and
  perturbed, see ``deploy_helpers``), under every kernel mode: each kind of kernel forced
  (``float``, ``int8``, ``bf16``, ``packed``) and the measured choice (``auto``).
* The same against the authors' reference checkpoints in ``../shared/reference`` (skipped with
  the reason when absent, failing under ``CI=true``), their packed files included.
* The deployed model is inference-only and keeps the API timm's tooling uses.

Kernel choice and the packed kernels' weight forms are in ``test_deploy_kernels.py``; the packed
file format in ``test_deploy_packed.py``.
"""
import pytest
import torch

import timm
from timm_binaryvit import kernels
from timm_binaryvit.deploy import (
    DeployedBinaryDeiT, DeployedBinaryViT, deploy, export_packed, is_deployed, load_packed)
from timm_binaryvit.folded_eval import unfolded
from timm_binaryvit.layers import ElasticBinarizer

from conftest import slow_except
from deploy_helpers import (  # noqa: F401  one_thread: a module fixture
    MODELS, MODES, RTOL, TAGS, images, is_pyramid, make, one_thread, reference_model, rel)


@pytest.fixture(params=slow_except(MODES, ('auto', 'packed')))
def mode(request):
    """Runs the test under each kernel mode, and puts the previous mode back. The measured choice and the
    packed kernels run in the quick selection (``-m "not slow"``); every forced kind runs in the full."""
    with kernels.kernel_mode(request.param):
        yield request.param


def test_every_family_is_covered():
    assert any(is_pyramid(n) for n in MODELS) and any(not is_pyramid(n) for n in MODELS)
    assert len(MODELS) >= 7


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('slopes', ['below_one', 'any'])
def test_deployed_logits_equal_training_model(name, slopes, mode):
    model = make(name, slopes=slopes)
    x = images(model)
    fractions = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: fractions.append((out > 0).double().mean().item()))
             for m in model.modules() if isinstance(m, ElasticBinarizer)]
    with torch.no_grad():
        ref_logits, ref_features = model(x), model.forward_features(x)
    for h in hooks:
        h.remove()
    # the binarised attention really is mixed (else the threshold fold would go untested)
    assert fractions and all(0.02 < f < 0.98 for f in fractions), fractions

    deployed = deploy(model)
    logits = deployed(x)
    features = deployed.forward_features(x)
    assert logits.dtype == torch.float64
    assert rel(logits, ref_logits) < RTOL
    assert features.shape == ref_features.shape
    assert rel(features, ref_features) < RTOL
    assert rel(deployed.forward_head(features), ref_logits) < RTOL
    with torch.no_grad():
        ref_pre = model.forward_head(ref_features, pre_logits=True)
    assert rel(deployed.forward_head(features, pre_logits=True), ref_pre) < RTOL


@pytest.mark.parametrize('name,extra', [
    ('binaryvit_small_patch4_224', dict(fp_transitions=False)),
    ('binaryvit_small_patch4_224', dict(fp_transitions=True)),
    ('binaryvit_small_patch4_224', dict(global_pool='', num_classes=0)),
    ('binaryvit_small_patch4_224', dict(num_classes=0)),
    ('binaryvit_small_patch4_224', dict(sr_ratios=(2, 2, 1, 1), num_heads=(2, 2, 2, 2), img_size=64)),
    ('binary_deit_small_patch16_224', dict(global_pool='token')),
    ('binary_deit_small_patch16_224', dict(global_pool='avg')),
    ('binary_deit_small_patch16_224', dict(global_pool='')),
    ('binary_deit_small_gap_mb_affine_patch16_224', dict(num_classes=0)),
    ('binary_deit_small_gap_mb_affine_patch16_224', dict(embed_dim=96, num_heads=2, depth=2, in_chans=1)),
])
def test_deployed_variants(name, extra):
    model = make(name, **extra)
    x = images(model)
    with torch.no_grad(), unfolded():
        ref = model(x)
    out = deploy(model)(x)
    assert out.shape == ref.shape
    assert rel(out, ref) < RTOL


@pytest.mark.parametrize('mode', ['auto', 'bf16', 'packed'])
def test_attention_over_256_keys(mode):
    # more than 256 keys: 0/1 x sign sums may leave bfloat16's exact integers, so bf16 is not offered
    model = make('binary_deit_small_gap_patch16_224', img_size=272)  # 17 x 17 = 289 tokens
    x = images(model)
    with torch.no_grad(), unfolded():
        ref = model(x)
    with kernels.kernel_mode(mode):
        assert rel(deploy(model)(x), ref) < RTOL
    made = [c for c in kernels.choices() if c.product == 'deploy_attention' and c.shape[3] == 289]
    assert made and all(c.kind != 'bf16' for c in made)


def test_deployed_float32_close_and_non_positive_binariser_scale(mode):
    model = make('binary_deit_small_gap_mb_affine_patch16_224', dtype=torch.float32)
    x = images(model, dtype=torch.float32)
    with torch.no_grad(), unfolded():
        ref = model(x)
    assert rel(deploy(model)(x), ref) < 1e-3  # float32: rounding may flip a rare sign
    # s <= 0 binarises every probability to 0
    model = make('binaryvit_small_patch4_224')
    with torch.no_grad(), unfolded():
        model.stages[0].blocks[0].attn.prob_binarizer.scale.fill_(-0.01)
        model.stages[2].blocks[0].attn.prob_binarizer.scale.fill_(0.)
        x = images(model)
        ref = model(x)
    assert torch.isfinite(ref).all()
    assert rel(deploy(model)(x), ref) < RTOL


def test_deploy_leaves_the_training_model_alone_and_is_inference_only():
    model = make('binaryvit_small_patch4_224')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = deploy(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(deployed, DeployedBinaryViT) and is_deployed(deployed) and not is_deployed(model)
    assert not deployed.training
    assert not any(p.requires_grad for p in deployed.parameters())
    assert deploy(deployed) is deployed
    with pytest.raises(RuntimeError, match='inference-only'):
        deployed.train()
    deployed.eval()
    x = images(model).requires_grad_(True)
    out = deployed(x)
    assert not out.requires_grad
    with torch.inference_mode():
        deployed(x.detach())
    # no custom autograd function, DropPath or checkpointing is left: only folded modules
    names = {type(m).__name__ for m in deployed.modules()}
    assert not names & {'BinaryLinear', 'BinaryConv2d', 'TokenBatchNorm', 'DropPath', 'RPReLU', 'Block'}
    with pytest.raises(TypeError, match='BinaryViT or BinaryDeiT'):
        deploy(torch.nn.Linear(2, 2))


def test_deployed_api_for_timm_tooling():
    model = make('binary_deit_small_gap_mb_affine_patch16_224', dtype=torch.float32)
    deployed = deploy(model)
    assert isinstance(deployed, DeployedBinaryDeiT)
    for attr in ('num_classes', 'num_features', 'head_hidden_size', 'global_pool', 'img_size', 'in_chans'):
        assert getattr(deployed, attr) == getattr(model, attr), attr
    assert deployed.pretrained_cfg == model.pretrained_cfg
    assert timm.data.resolve_data_config(model=deployed) == timm.data.resolve_data_config(model=model)
    assert deployed.get_classifier().weight.shape == (10, model.num_features)
    deployed.reset_classifier(3)
    assert deployed(images(model, dtype=torch.float32)).shape == (2, 3)
    deployed.reset_classifier(0)
    assert deployed(images(model, dtype=torch.float32)).shape == (2, model.num_features)
    with pytest.raises(ValueError, match='expects input of shape'):
        deployed(torch.zeros(1, 3, 32, 32))
    # dtype conversion after deploying keeps working (signs and folded constants are buffers; the
    # kernels' weight forms are made again for the new dtype)
    d64 = deploy(model)
    d64(images(model, dtype=torch.float32))
    d64 = d64.double()
    with torch.no_grad(), unfolded():
        assert rel(d64(images(model)), model.double()(images(model))) < 1e-5


@pytest.mark.reference
@pytest.mark.parametrize('tag', TAGS)
def test_reference_checkpoints_deploy_and_pack(tag, tmp_path, mode):
    model, x, expected = reference_model(tag)
    with torch.no_grad(), unfolded():
        ref = model(x)
    assert rel(ref, expected) < RTOL
    deployed = deploy(model)
    assert rel(deployed(x), expected) < RTOL
    assert rel(deployed(x), ref) < RTOL
    # the packed file of the checkpoint reproduces the same logits, as a training and a deployed model
    path = tmp_path / f'{tag}.packed.safetensors'
    export_packed(model, str(path))
    with torch.no_grad(), unfolded():
        assert torch.equal(load_packed(str(path)).eval()(x), ref)
    assert rel(load_packed(str(path), deployed=True)(x), expected) < RTOL
