"""Each binariser's pseudo-gradient, checked against a float64 reference written here with stock
autograd only (``torch.where`` formulas of the paper's rules and straight-through compositions), never
with the package's own helpers. Runs on a fresh clone (no ../shared needed)."""
import os

import pytest
import torch

from timm_binaryvit import batchnorm, dispatch, layers, quantizers

DT = torch.float64


def _inputs(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=DT) * scale
    # Values exactly on the rule's boundaries: 0 (sign), +-1 (end of the ApproxSign window).
    flat = x.view(-1)
    flat[:4] = torch.tensor([0., 1., -1., 0.5], dtype=DT)
    return x


def _approx_sign_reference_grad(g, x):
    # Bi-Real Net: 2 + 2x on [-1, 0], 2 - 2x on (0, 1], 0 elsewhere.
    d = torch.where((x >= -1) & (x <= 0), 2 + 2 * x, torch.where((x > 0) & (x <= 1), 2 - 2 * x, torch.zeros_like(x)))
    return g * d


def test_approx_sign_forward_and_ste_gradient():
    x = _inputs(7, 9, scale=1.5).requires_grad_()
    y = quantizers.approx_sign(x)
    assert torch.equal(y.detach(), torch.sign(x.detach()))
    assert y[0, 0] == 0  # sign(0) = 0
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, _approx_sign_reference_grad(g, x.detach()), rtol=0, atol=1e-15)


@pytest.fixture(params=['one_pass', 'stock'])
def path(request, monkeypatch):
    """The compiled one-pass kernels (CPU, extension built) or the stock operators they stand in for."""
    if request.param == 'stock':
        monkeypatch.setattr(quantizers, 'one_pass_kernels', lambda *tensors: None)
        monkeypatch.setattr(layers, 'one_pass_kernels', lambda *tensors: None)
    elif quantizers.one_pass_kernels(torch.zeros(1, dtype=DT)) is None:
        from timm_binaryvit import packed_ops
        reason = f'compiled extension unavailable: {packed_ops.unavailable_reason()}'
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail(reason + '; CI=true requires it')
        pytest.skip(reason)
    return request.param


@pytest.mark.parametrize('doubled', [False, True])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_approx_sign_backward_matches_reference(doubled, dtype, path):
    x = _inputs(37, 9, scale=1.5).to(dtype)
    x[1, 1] = float('nan')  # stays NaN, as clamp and abs keep it
    g = torch.randn(37, 9, dtype=DT).to(dtype)
    expected = _approx_sign_reference_grad(g.double(), x.double())
    expected[1, 1] = float('nan')
    got = quantizers.approx_sign_backward_(g * 2 if doubled else g.clone(), x.clone(), doubled=doubled)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-15 if dtype == DT else 1e-6, equal_nan=True)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_prelu_backward_and_its_sums_match_stock_autograd(dtype, path):
    z = _inputs(301, 13, seed=3).to(dtype).requires_grad_()  # rows over several threads' tasks; z = 0 included
    slope = (torch.rand(13, dtype=DT) * 1.5 - 0.25).to(dtype).requires_grad_()
    g = torch.randn(301, 13, dtype=DT).to(dtype)
    torch.nn.functional.prelu(z, slope).backward(g)
    grad_z, grad_slope, grad_sum = layers._prelu_backward(g, z.detach(), slope.detach(), True, need_sum=True)
    tol = dict(rtol=0, atol=1e-12) if dtype == DT else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_z, z.grad, rtol=0, atol=0)  # per element: exactly grad or slope * grad
    torch.testing.assert_close(grad_slope, slope.grad, **tol)
    torch.testing.assert_close(grad_sum, z.grad.sum(0), **tol)


def test_shifted_sign_function_matches_reference():
    x = _inputs(4, 6, 8).requires_grad_()
    shift = (torch.randn(8, dtype=DT) * 0.3).requires_grad_()
    y = layers.shifted_sign(x, shift)
    g = torch.randn_like(y)
    y.backward(g)
    u = (x + shift).detach()
    assert torch.equal(y.detach(), torch.sign(u))
    ref = _approx_sign_reference_grad(g, u)
    torch.testing.assert_close(x.grad, ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(shift.grad, ref.sum((0, 1)), rtol=1e-12, atol=1e-12)


def _centred_reference(w):
    # a * sign(W - mean_in W), a = mean_in |W| constant; gradient straight through clamp(W - mean_in W, -1, 1),
    # bounds included.
    scale = w.detach().abs().mean(1, keepdim=True)
    centred = w - w.mean(1, keepdim=True)
    clipped = torch.where(centred.abs() <= 1, centred, centred.detach())
    return scale * torch.sign(centred.detach()) + (clipped - clipped.detach())


def test_centred_weight_sign_ste_and_backward():
    w = _inputs(6, 10, scale=0.9).requires_grad_()
    g = torch.randn(6, 10, dtype=DT)
    ours = quantizers.centred_sign_weight(w)
    ref_w = w.detach().clone().requires_grad_()
    ref = _centred_reference(ref_w)
    assert torch.equal(ours.detach(), ref.detach())
    ours.backward(g)
    ref.backward(g)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=0, atol=1e-14)
    # The custom functions' backward helper gives the same.
    torch.testing.assert_close(quantizers.centred_sign_backward(w.detach(), g), ref_w.grad, rtol=0, atol=1e-14)
    signs, scale = quantizers.centred_sign_factors(w.detach())
    assert torch.equal(scale.unsqueeze(1) * signs, ref.detach())
    centred = (w - w.mean(1, keepdim=True)).detach().abs()
    assert (centred > 1).any() and (centred < 1).any()  # both sides of the clipping exercised


def test_scaled_weight_sign_ste_and_backward():
    w = _inputs(4, 3, 2, 2, scale=0.9).requires_grad_()
    g = torch.randn_like(w)
    scale = w.detach().abs().mean((1, 2, 3), keepdim=True)
    ours = quantizers.scaled_sign_weight(w)
    assert torch.equal(ours.detach(), scale * torch.sign(w.detach()))
    ours.backward(g)
    expected = torch.where(w.detach().abs() <= 1, g, torch.zeros_like(g))
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(quantizers.scaled_sign_backward(w.detach(), g), expected, rtol=0, atol=0)


def _elastic_reference(g, p, s):
    q = p / s
    inside = (q >= 0) & (q <= 1)
    grad_p = torch.where(inside, g, torch.zeros_like(g))
    grad_s = (g * (torch.round(q) - q))[inside].sum() + g[q > 1].sum()
    return grad_p, grad_s


def test_elastic_binariser_ste_and_backward():
    g0 = torch.Generator().manual_seed(3)
    p = torch.rand(2, 3, 5, 7, generator=g0, dtype=DT) * 0.03
    p.view(-1)[:3] = torch.tensor([0., 0.02, 0.01], dtype=DT)  # q = 0, 1 (bound), 0.5 (tie, rounds to 0)
    s = torch.tensor(0.02, dtype=DT)
    g = torch.randn(p.shape, generator=g0, dtype=DT)
    ref_p, ref_s = _elastic_reference(g, p, s)
    value = s * torch.clamp(torch.round(p / s), 0, 1)

    # the straight-through composition of stock operators, and the layers' custom autograd function
    for binarize in (quantizers.elastic_binarize_ste, layers.elastic_binarize):
        pp, ss = p.clone().requires_grad_(), s.clone().requires_grad_()
        y = binarize(pp, ss)
        assert torch.equal(y.detach(), value), binarize.__name__
        y.backward(g)
        named = lambda m: f'{binarize.__name__}: {m}'  # noqa: E731
        torch.testing.assert_close(pp.grad, ref_p, rtol=0, atol=1e-12, msg=named)
        torch.testing.assert_close(ss.grad, ref_s, rtol=1e-10, atol=1e-12, msg=named)

    grad_p, grad_s = quantizers.elastic_backward(g, p, s, True)
    torch.testing.assert_close(grad_p, ref_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_s, ref_s, rtol=1e-10, atol=1e-12)


def test_binary_conv2d_function_matches_stock_autograd():
    x = _inputs(2, 3, 6, 6).requires_grad_()
    shift = (torch.randn(1, 3, 1, 1, dtype=DT) * 0.2).requires_grad_()
    w = _inputs(5, 3, 2, 2, seed=1, scale=0.9).requires_grad_()
    y = layers.binary_conv2d(x, shift, w, stride=2, padding=1)
    g = torch.randn_like(y)
    y.backward(g)
    custom = [t.grad.clone() for t in (x, shift, w)]
    refs = [t.detach().clone().requires_grad_() for t in (x, shift, w)]
    # Stock composition written here: ApproxSign via its piecewise quadratic, clipped weight.
    u = refs[0] + refs[1]
    c = u.clamp(-1, 1)
    smooth = 2 * c - c * c.abs()
    signs = torch.sign(u).detach() + (smooth - smooth.detach())
    scale = refs[2].detach().abs().mean((1, 2, 3), keepdim=True)
    clipped = torch.where(refs[2].abs() <= 1, refs[2], refs[2].detach())  # straight through, bounds included
    weight = scale * torch.sign(refs[2].detach()) + (clipped - clipped.detach())
    y_ref = torch.nn.functional.conv2d(signs, weight, stride=2, padding=1)
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=0, atol=1e-14)
    y_ref.backward(g)
    for a, b in zip(custom, refs):
        torch.testing.assert_close(a, b.grad, rtol=1e-12, atol=1e-12)


def test_rprelu_function_gradcheck():
    # RPReLU is smooth away from its kink: gradcheck its custom backward there.
    g0 = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, generator=g0, dtype=DT)
    x = torch.where(x.abs() < 0.05, x + 0.2, x).requires_grad_()
    params = [torch.zeros(5, dtype=DT, requires_grad=True), torch.full((5,), 0.25, dtype=DT, requires_grad=True),
              (torch.randn(5, generator=g0, dtype=DT) * 0.1).requires_grad_()]
    assert torch.autograd.gradcheck(layers.rprelu, (x, *params))


def test_norm_add_rprelu_gradcheck():
    # BN + shortcut + RPReLU (+ affine, + residual) as one function: smooth away from the PReLU kink.
    torch.manual_seed(0)
    norm, act, affine = batchnorm.TokenBatchNorm(6, dtype=DT), layers.RPReLU(6, dtype=DT), layers.Affine(6, dtype=DT)
    with torch.no_grad():
        for p in list(norm.parameters()) + list(act.parameters()) + list(affine.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    y = torch.randn(2, 5, 6, dtype=DT, requires_grad=True)
    shortcut = torch.randn(2, 5, 6, dtype=DT, requires_grad=True)
    residual = torch.randn(2, 5, 6, dtype=DT, requires_grad=True)

    def fused(y, shortcut, residual):
        return batchnorm.norm_add_rprelu(y, shortcut, norm, act, affine=affine, residual=residual)

    with batchnorm.frozen_batchnorm_stats():  # gradcheck calls it many times; keep the statistics still
        assert torch.autograd.gradcheck(fused, (y, shortcut, residual), atol=1e-6)
        with dispatch.stock_operators():
            reference = residual + affine(act(norm(y) + shortcut))
        torch.testing.assert_close(fused(y, shortcut, residual), reference, rtol=1e-12, atol=1e-12)
