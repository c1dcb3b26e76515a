"""Kernel choice in deployed models: every product runs the kernel ``timm_binaryvit.kernels`` chooses,
every kind gives the same integers (odd shapes, exact zeros and activations exactly at their
threshold included), a machine where a kind is slow (simulated) runs float32 and stays exact, the
packed weights come straight from a packed file's bits without a float weight, and a traced graph
never bakes in a packed kernel's results."""
import math
import warnings

import pytest
import torch

from timm_binaryvit import kernels, packed_ops
from timm_binaryvit.deploy import deploy, export_packed, load_packed
from timm_binaryvit.deploy.runtime import (
    ATTENTION, FFN, LINEAR, FoldedBinaryLinear, FoldedPReLU, SignBits, Workspace, attention_context, binary_ffn)
from timm_binaryvit.folded_eval import unfolded
from timm_binaryvit.layers import BinaryConv2d, BinaryLinear

from kernel_helpers import fake_clock, fresh_choices  # noqa: F401  (fresh_choices: autouse)
from deploy_helpers import RTOL, images, make, one_thread, rel  # noqa: F401

KINDS = {LINEAR: ('float', 'int8', 'packed'), FFN: ('float', 'int8', 'packed'), ATTENTION: ('float', 'bf16', 'packed')}


def _runnable(kind, dtype=torch.float64):
    # the kinds this machine offers (the packed extension may be unavailable: then it is not tested here)
    return kind != 'packed' or (packed_ops.available() and dtype in (torch.float32, torch.float64))


def _ternary(shape, g, zeros=0.2):
    values = torch.randint(0, 2, shape, generator=g).double() * 2 - 1
    return values * (torch.rand(shape, generator=g, dtype=torch.float64) >= zeros)


@pytest.mark.parametrize('M,K,N', [(1, 1, 1), (1, 64, 3), (7, 65, 9), (33, 130, 17), (64, 384, 40)])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_linear_kinds_agree_on_odd_shapes(M, K, N, dtype):
    g = torch.Generator().manual_seed(M * 1000 + K)
    weight = _ternary((N, K), g)  # exact zeros in the weight
    shift = torch.randn(K, generator=g, dtype=torch.float64)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    x[:, ::3] = -shift[::3]  # activations exactly at their threshold: sign 0
    scale = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(N, generator=g, dtype=torch.float64)
    layer = FoldedBinaryLinear(SignBits.from_signs(weight), scale, bias, shift, dtype)
    shortcut = torch.randn(M, N, generator=g, dtype=torch.float64).to(dtype)
    x = x.to(dtype)
    signs = torch.sign(x + shift.to(dtype)).double()
    want = (shortcut.double() + bias.to(dtype).double() + (signs @ weight.t()) * scale.to(dtype).double())
    for kind in KINDS[LINEAR]:
        if not _runnable(kind, dtype):
            continue
        out = layer.run(x.clone(), shortcut, torch.empty(M, N, dtype=dtype), Workspace(x), kind=kind)
        assert rel(out.double(), want) < (1e-12 if dtype == torch.float64 else 1e-5), kind


@pytest.mark.parametrize('M,K,N,C', [(1, 1, 1, 1), (7, 65, 9, 3), (33, 130, 48, 8), (33, 130, 48, 16),
                                     (64, 384, 40, 40)])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('slopes', ['below_one', 'any'])
def test_prelu_epilogue_equals_separate_prelu(M, K, N, C, dtype, slopes):
    # run_act puts the shortcut (repeated N / C times along the columns when C < N) and the PReLU into
    # the packed kernel's epilogue (slopes <= 1); any other kind, or a slope above 1, adds and applies
    # them around the product: every way gives the same values
    g = torch.Generator().manual_seed(M + K + N)
    layer = FoldedBinaryLinear(SignBits.from_signs(_ternary((N, K), g)), torch.rand(N, generator=g) + 0.5,
                               torch.randn(N, generator=g), torch.randn(K, generator=g), dtype)
    slope = torch.rand(N, generator=g, dtype=torch.float64) * (0.9 if slopes == 'below_one' else 2.0) - 0.2
    act = FoldedPReLU(slope, torch.randn(N, generator=g, dtype=torch.float64), dtype)
    assert act.general == (slopes == 'any')
    x = torch.randn(M, K, generator=g).to(dtype)
    shortcut = torch.randn(M, N, generator=g).to(dtype) if C == N else torch.randn(M, 1, C, generator=g).to(dtype)
    want = act.apply_(layer.run(x, shortcut, torch.empty(M, N, dtype=dtype), Workspace(x), kind='float'),
                      torch.empty(M, N, dtype=dtype)).double()
    E = 8 if N % 8 == 0 else 3 if N % 3 == 0 else 1  # groups the epilogue takes (8, 1) or leaves to a GEMV (3)
    for kind in KINDS[LINEAR]:
        if not _runnable(kind, dtype):
            continue
        means = torch.full((M, N // E), math.nan, dtype=dtype)
        out = layer.run_act(x, shortcut, torch.empty(M, N, dtype=dtype), Workspace(x), act,
                            torch.empty(M, N, dtype=dtype), kind=kind, means=means)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert rel(out.double(), want) < tol, kind
        assert rel(means.double(), want.view(M, N // E, E).mean(-1)) < tol, kind


@pytest.mark.parametrize('M,C,E', [(1, 1, 1), (5, 3, 3), (9, 8, 8), (40, 16, 4), (17, 24, 8), (64, 64, 8)])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('slopes', ['below_one', 'any'])
def test_ffn_kinds_agree(M, C, E, dtype, slopes):
    # binary_ffn with one kind for both layers; 'packed' hands the hidden signs over in bits where the
    # slopes (<= 1) and E (1, 2, 4, 8) allow it, else runs both layers packed with floats between them.
    # Hidden values exactly 0 (sign 0) included.
    g = torch.Generator().manual_seed(M * 100 + C * 10 + E)
    H = E * C
    scale1, bias1 = torch.rand(H, generator=g, dtype=torch.float64) + 0.5, torch.randn(H, generator=g, dtype=torch.float64)
    scale1[::C], bias1[::C] = 0, 0  # hidden column 0 of each group: 0 * acc + 0 + w[:, 0] = 0 below
    fc1 = FoldedBinaryLinear(SignBits.from_signs(_ternary((H, C), g)), scale1, bias1, None, dtype)
    fc2 = FoldedBinaryLinear(SignBits.from_signs(_ternary((C, H), g)), torch.rand(C, generator=g) + 0.5,
                             torch.randn(C, generator=g), None, dtype)
    spread = 0.9 if slopes == 'below_one' else 2.0
    act1 = FoldedPReLU(torch.rand(H, generator=g, dtype=torch.float64) * spread - 0.2, torch.zeros(H), dtype)
    act2 = FoldedPReLU(torch.rand(C, generator=g, dtype=torch.float64) * spread - 0.2,
                       torch.randn(C, generator=g, dtype=torch.float64), dtype)
    w = torch.randn(M, C, generator=g).to(dtype)
    w[:, 0] = 0
    want = binary_ffn(fc1, act1, fc2, act2, w, torch.empty(M, C, dtype=dtype), Workspace(w), kind='float').double()
    for kind in KINDS[FFN]:
        if not _runnable(kind, dtype):
            continue
        out = binary_ffn(fc1, act1, fc2, act2, w, torch.empty(M, C, dtype=dtype), Workspace(w), kind=kind)
        assert rel(out.double(), want) < (1e-12 if dtype == torch.float64 else 1e-5), kind
    if _runnable('packed', dtype) and slopes == 'below_one' and E in (1, 2, 4, 8):
        signs = fc1.run_signs(w, w.view(M, 1, C), Workspace(w), act1)
        hidden = fc1.run_act(w, w.view(M, 1, C), torch.empty(M, H, dtype=dtype), Workspace(w), act1,
                             torch.empty(M, H, dtype=dtype), kind='float')
        assert signs.has_zeros and torch.equal(signs.unpack().double(), hidden.sign().double())


@pytest.mark.parametrize('g,N,h,d,Nk', [(1, 1, 1, 1, 1), (2, 5, 3, 7, 9), (1, 17, 2, 64, 65), (3, 30, 1, 16, 300)])
def test_attention_kinds_agree_on_odd_shapes(g, N, h, d, Nk):
    gen = torch.Generator().manual_seed(N * 100 + Nk)
    q = torch.randn(g, N, h, d, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, g, Nk, h, d, generator=gen, dtype=torch.float64)
    q[..., 0] = 0  # sign(0) = 0 in queries and values
    v[:, ::2, :, -1] = 0
    scale = torch.tensor([d ** -0.5], dtype=torch.float64)
    threshold = torch.tensor(0.7 / Nk, dtype=torch.float64)
    qs, ks, vs = (t.sign().transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(qs @ ks.transpose(-1, -2) * scale, -1)
    want = (probs > threshold).double() @ vs
    assert Nk == 1 or 0 < (probs > threshold).double().mean() < 1  # a mixed mask
    for kind in KINDS[ATTENTION]:
        if not _runnable(kind) or (kind == 'bf16' and max(d, Nk) > 256):
            continue
        ctx = attention_context(q, k, v, scale, threshold, Workspace(q), kind=kind)
        assert torch.equal(ctx.double(), want), kind


def _deployed_choices():
    return [c for c in kernels.choices() if c.product in KINDS]


@pytest.mark.parametrize('name', ['binaryvit_small_patch4_224', 'binary_deit_small_gap_mb_affine_patch16_224'])
def test_machine_where_int8_bf16_and_packed_are_slow_runs_float(monkeypatch, name):
    # an AVX2-only Zen 3: torch._int_mm 40x slower than float32, bfloat16 emulated
    fake_clock(monkeypatch, {'float': 0.001, 'int8': 0.040, 'bf16': 0.030, 'packed': 0.020}, KINDS)
    model = make(name)
    x = images(model)
    with torch.no_grad(), unfolded():
        ref = model(x)
    assert rel(deploy(model)(x), ref) < RTOL
    made = _deployed_choices()
    assert {c.product for c in made} == {LINEAR, FFN, ATTENTION}
    assert all(c.kind == 'float' for c in made), [(c.product, c.shape, c.kind) for c in made]
    assert any('int8' in c.times and c.times['int8'] > c.times['float'] for c in made)
    assert any('bf16' in c.times and c.times['bf16'] > c.times['float'] for c in made)


def test_machine_where_int8_and_bf16_are_fast_uses_them(monkeypatch):
    fake_clock(monkeypatch, {'float': 0.010, 'int8': 0.002, 'bf16': 0.002, 'packed': 0.020}, KINDS)
    model = make('binary_deit_small_gap_mb_affine_patch16_224')
    x = images(model)
    with torch.no_grad(), unfolded():
        ref = model(x)
    assert rel(deploy(model)(x), ref) < RTOL
    kinds = {(c.product, c.kind) for c in _deployed_choices()}
    assert kinds == {(LINEAR, 'int8'), (FFN, 'int8'), (ATTENTION, 'bf16')}


def test_packed_unavailable_falls_back_to_float(monkeypatch):
    monkeypatch.setattr(packed_ops, 'available', lambda: False)
    monkeypatch.setattr(packed_ops, 'unavailable_reason', lambda: 'no compiler (simulated)')
    model = make('binaryvit_small_patch4_224')
    x = images(model)
    with torch.no_grad(), unfolded():
        ref = model(x)
    with kernels.kernel_mode('packed'):
        assert rel(deploy(model)(x), ref) < RTOL
    made = _deployed_choices()
    assert made and all(c.kind == 'float' and 'no compiler (simulated)' in c.reason for c in made)


def _binary_layers(deployed):
    return [m for m in deployed.modules() if isinstance(m, FoldedBinaryLinear)]


@pytest.mark.parametrize('mode', ['float', 'int8', 'packed'])
def test_deployed_from_file_never_materialises_float_binary_weights(tmp_path, monkeypatch, mode):
    if mode == 'packed' and not packed_ops.available():
        pytest.skip(f'packed kernels unavailable: {packed_ops.unavailable_reason()}')
    model = make('binaryvit_small_patch4_224')
    path = tmp_path / 'm.packed'
    export_packed(model, str(path))
    x = images(model)
    with torch.no_grad(), unfolded():
        ref = model(x)

    def refuse(self):
        raise AssertionError('a binary layer was asked for its float weight')
    monkeypatch.setattr(BinaryLinear, 'binary_weight', refuse)
    monkeypatch.setattr(BinaryConv2d, 'binary_weight', refuse)
    with kernels.kernel_mode(mode):
        deployed = load_packed(str(path), deployed=True)
        layers = _binary_layers(deployed)
        assert layers and all(not m._forms for m in layers)  # nothing but the bits until a kernel runs
        assert rel(deployed(x), ref) < RTOL
    for m in layers:
        # the bits (1 bit a weight) and the form of the kernel that ran; no float tensor of weight size
        assert {key[0] for key in m._forms} == {mode}
        assert m.bits.dtype == torch.uint8 and m.bits.numel() == m.out_features * ((m.in_features + 7) // 8)
        floats = [b for b in m.buffers() if b.is_floating_point()]
        assert all(b.numel() <= max(m.in_features, m.out_features) for b in floats)
        forms = [f for f in m._forms.values() if isinstance(f, torch.Tensor)]
        assert all(f.dtype == torch.int8 for f in forms) if mode == 'int8' else True


def test_tracing_a_deployed_model_is_refused():
    # the runtime writes into reused buffers, which torch.jit.trace (and the legacy ONNX exporter) would record
    # as constants and replay; with any kernel forced the deployed model must refuse instead of tracing wrong
    model = make('binary_deit_small_gap_mb_affine_patch16_224', img_size=64)
    deployed = deploy(model)
    x = images(model)
    with kernels.kernel_mode('packed'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(RuntimeError, match='cannot be traced, exported or compiled'):
            torch.jit.trace(deployed, x, check_trace=False)
    with torch.no_grad(), unfolded():  # and it still runs eagerly afterwards
        assert rel(deployed(x), model(x)) < RTOL


def test_report_names_the_deploy_products():
    model = make('binary_deit_small_gap_mb_affine_patch16_224', dtype=torch.float32)
    deploy(model)(images(model, dtype=torch.float32))
    report = kernels.report()
    assert LINEAR in report and ATTENTION in report and 'measured' in report
