"""Mixed precision (``torch.autocast``, bfloat16 and float16) against float32.

A binary network is discontinuous: an activation within the autocast dtype's rounding of its threshold
may flip its sign, and one flipped sign moves the gradient by far more than the rounding. So the claim
is made at two levels:

* every binary layer, on inputs whose signs the rounding cannot flip, gives the float32 outputs and
  gradients to the autocast dtype's tolerance (the products of signs themselves run in float32: exact);
* a whole model's autocast gradients are no further from its float32 gradients than the float32 model's
  own gradients move when its inputs and parameters are merely rounded to the autocast dtype: autocast
  adds no error beyond the dtype's own rounding.
"""
import copy

import pytest
import torch

import timm
from timm_binaryvit.batchnorm import TokenBatchNorm
from timm_binaryvit.layers import Affine, BinaryActivation, BinaryConv2d, BinaryLinear, ElasticBinarizer, RPReLU

DTYPES = [torch.bfloat16, torch.float16]
PYRAMID = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), img_size=32)
DEIT = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)
MARGIN = 0.1


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _away_from(threshold, shape, gen):
    """Values at least MARGIN from ``threshold`` on either side: no rounding of the dtypes here crosses it."""
    r = torch.randn(shape, generator=gen)
    return threshold + torch.where(r < 0, -1.0, 1.0) * (MARGIN + r.abs())


def _perturbed(module, gen, scale=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def _run(module, x, grad_out, dtype=None):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=dtype, enabled=dtype is not None):
        out = module(x)
    out.float().backward(grad_out)
    grads = {'input': x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return out.detach().float(), grads


def _leaf_cases(gen):
    activation = _perturbed(BinaryActivation(24), gen)
    linear = _perturbed(BinaryLinear(1536, 16), gen)  # fan-in above 256: bfloat16 could not hold the sums
    conv = _perturbed(BinaryConv2d(8, 12, 3, padding=1), gen)
    elastic = ElasticBinarizer(init_scale=0.02)
    # p / scale in (0.1, 0.4), (0.6, 0.9) or (1.2, 2): away from the rounding point and from the clip bounds
    unit = torch.rand(4, 2, 9, 9, generator=gen)
    levels = torch.tensor([0.1, 0.6, 1.2])[torch.randint(0, 3, unit.shape, generator=gen)]
    widths = torch.where(levels > 1, 0.8, 0.3)
    rprelu = _perturbed(RPReLU(24), gen)
    return {
        'activation': (activation, _away_from(-activation.shift.detach(), (4, 7, 24), gen)),
        'linear': (linear, _away_from(-linear.shift.detach(), (4, 5, 1536), gen)),
        'conv': (conv, _away_from(-conv.shift.detach(), (2, 8, 6, 6), gen)),
        'elastic': (elastic, elastic.scale.detach() * (levels + unit * widths)),
        'rprelu': (rprelu, _away_from(rprelu.shift_in.detach(), (4, 7, 24), gen)),
        'token_batchnorm': (_perturbed(TokenBatchNorm(24), gen), torch.randn(4, 7, 24, generator=gen)),
        'affine': (_perturbed(Affine(24), gen), torch.randn(4, 7, 24, generator=gen)),
    }


def _relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('case', ['activation', 'linear', 'conv', 'elastic', 'rprelu', 'token_batchnorm', 'affine'])
def test_binary_layers_match_float32_to_the_dtype_tolerance(case, dtype):
    module, x = _leaf_cases(_generator())[case]
    module.train()
    grad_out_shape = module(x).shape
    grad_out = torch.randn(grad_out_shape, generator=_generator(1))
    ref_out, ref = _run(module, x, grad_out)
    out, got = _run(module, x, grad_out, dtype)
    tolerance = 4 * torch.finfo(dtype).eps
    assert _relative(out, ref_out) <= tolerance
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        assert _relative(got[name], ref[name]) <= tolerance, (name, _relative(got[name], ref[name]))


def test_products_of_signs_stay_exact_under_autocast():
    # A fan-in of 1,536 signs: bfloat16 would round the sums, the product runs in float32 instead.
    lin = BinaryLinear(1536, 8)
    x = torch.randn(4, 1536)
    with torch.no_grad():
        expected = torch.sign(x + lin.shift).double() @ lin.binary_weight().double().t()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = lin(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)


def _model(name):
    config = PYRAMID if name.startswith('binaryvit') else DEIT
    with torch.random.fork_rng():  # the same model every run, without touching the global generator
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=5, **config)
    gen = _generator()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            if pname.endswith('prob_binarizer.scale'):
                p.fill_(0.02)
    return model


def _model_grads(model, x, dtype=None):
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast('cpu', dtype=dtype, enabled=dtype is not None):
        out = model(x)
    target = torch.randn(out.shape, generator=_generator(1))
    (out.float() * target).sum().backward()
    model.load_state_dict(state)  # the step must not move the BatchNorm statistics for the next run
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _distance(a, b):
    names = sorted(b)
    assert sorted(a) == names
    return float(torch.cat([(a[n] - b[n]).reshape(-1) for n in names]).norm()
                 / torch.cat([b[n].reshape(-1) for n in names]).norm())


@pytest.mark.slow
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', timm.list_models(['binaryvit*', 'binary_deit*']))
def test_model_autocast_gradients_within_the_dtype_rounding(name, dtype):
    model = _model(name).train()
    x = torch.randn(4, 3, 32, 32, generator=_generator(2))
    reference = _model_grads(model, x)
    autocast = _model_grads(model, x, dtype)
    assert all(torch.isfinite(g).all() for g in autocast.values())
    trained = {n for n, g in reference.items() if g.any()}
    assert trained and trained <= {n for n, g in autocast.items() if g.any()}
    # the dtype's own rounding: the float32 model with its inputs and parameters moved by relative errors of
    # the dtype's epsilon (a few draws, since whether a sign flips is a matter of chance)
    eps = torch.finfo(dtype).eps
    rounding = []
    for seed in range(3):
        gen, rounded = _generator(10 + seed), copy.deepcopy(model)
        with torch.no_grad():
            for p in rounded.parameters():
                p.mul_(1 + eps * torch.randn(p.shape, generator=gen))
        rounding.append(_distance(_model_grads(rounded, x * (1 + eps * torch.randn(x.shape, generator=gen))), reference))
    assert _distance(autocast, reference) <= 2 * max(rounding) + 4 * eps, rounding
