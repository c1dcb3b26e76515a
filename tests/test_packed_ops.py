"""Packed sign products (``timm_binaryvit.packed_ops``): exact against float64 on odd shapes, on
every instruction-set path this CPU runs, and the float fallback without the extension.

The extension is built once per test session (the module caches it); the tests that need it skip
with the reason when it cannot be built, and fail under ``CI=true`` (CI must build it).
"""
import itertools
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from timm_binaryvit import packed_ops

KS = (1, 7, 63, 64, 65, 130, 389)
MNS = ((1, 1), (3, 17), (17, 64), (64, 3), (1, 65))


@pytest.fixture(scope='module')
def ext():
    if not packed_ops.available():
        reason = f'packed-sign extension unavailable: {packed_ops.unavailable_reason()}'
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail(reason + '; CI=true requires it')
        pytest.skip(reason)
    return packed_ops


def _require_isa(name):
    if name not in packed_ops.supported_isas():
        pytest.skip(f'this CPU does not run the {name} path (runs: {", ".join(packed_ops.supported_isas())})')


def ternary(rows, cols, zeros, seed, batch=()):
    g = torch.Generator().manual_seed(seed)
    if zeros:
        return torch.randint(-1, 2, batch + (rows, cols), generator=g).double()
    return torch.randint(0, 2, batch + (rows, cols), generator=g).double().mul_(2).sub_(1)


@pytest.mark.parametrize('isa', packed_ops.ISAS)  # each path the CPU runs
@pytest.mark.parametrize('K', KS)
def test_sign_gemm_exact(ext, isa, K):
    _require_isa(isa)
    with packed_ops.use_isa(isa):
        for (M, N), (za, zb) in itertools.product(MNS, itertools.product((False, True), repeat=2)):
            a, b = ternary(M, K, za, 1), ternary(N, K, zb, 2)
            if za:
                a[0, 0] = 0  # at least one zero, also when M * K is 1
            pa, pb = packed_ops.pack_signs(a), packed_ops.pack_sign_values(b.to(torch.int8))
            assert pa.has_zeros == bool((a == 0).any()) and pb.has_zeros == bool((b == 0).any())
            got = packed_ops.sign_gemm(pa, pb)
            assert got.dtype == torch.int32
            assert torch.equal(got.double(), a @ b.t()), (isa, M, K, N, za, zb)


@pytest.mark.parametrize('isa', packed_ops.ISAS)  # each path the CPU runs
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_epilogue_scale_bias_out(ext, isa, dtype):
    _require_isa(isa)
    M, K, N = 19, 130, 29
    a, b = ternary(M, K, True, 3), ternary(N, K, False, 4)
    scale = torch.rand(N, dtype=dtype) + 0.5
    bias_n, bias_mn = torch.randn(N, dtype=dtype), torch.randn(M, N, dtype=dtype)
    acc = a @ b.t()
    with packed_ops.use_isa(isa):
        pa, pb = packed_ops.pack_signs(a), packed_ops.pack_signs(b)
        for bias in (bias_n, bias_mn):
            got = packed_ops.sign_gemm(pa, pb, scale, bias)
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), acc * scale.double() + bias.double(), rtol=1e-6, atol=1e-5)
        # into a column slice of a wider buffer (row stride != N): the rest stays untouched
        buf = torch.full((M, N + 5), 7.0, dtype=dtype)
        packed_ops.sign_gemm(pa, pb, scale, None, out=buf[:, 2:2 + N])
        torch.testing.assert_close(buf[:, 2:2 + N].double(), acc * scale.double(), rtol=1e-6, atol=1e-5)
        assert bool((buf[:, :2] == 7).all()) and bool((buf[:, 2 + N:] == 7).all())
        # the PReLU epilogue: max(y, slope * y + offset) per column, on full and partial column blocks
        slope, offset = torch.rand(N, dtype=dtype) - 0.2, torch.randn(N, dtype=dtype)
        y = acc * scale.double() + bias_mn.double()
        got = packed_ops.sign_gemm(pa, pb, scale, bias_mn, prelu=(slope, offset))
        torch.testing.assert_close(got.double(), torch.maximum(y, slope.double() * y + offset.double()),
                                   rtol=1e-6, atol=1e-5)
        assert bool((got.double() > y + 1e-3).any())  # the PReLU changed something
        # a shortcut added in the epilogue: full width, and repeated along the columns (runs of 8)
        b24 = ternary(24, K, True, 5)
        acc24 = a @ b24.t()
        pb24 = packed_ops.pack_signs(b24)
        for P in (24, 8):
            rows = torch.randn(M, P, dtype=dtype)
            got = packed_ops.sign_gemm(pa, pb24, scale[:24], bias_n[:24], shortcut=rows)
            want = acc24 * scale[:24].double() + bias_n[:24].double() + rows.double().repeat(1, 24 // P)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
        # group means of 1, 2, 4 or 8 consecutive result columns, in the same epilogue
        for E in (1, 2, 4, 8):
            means = torch.full((M, 24 // E), math.nan, dtype=dtype)
            got = packed_ops.sign_gemm(pa, pb24, scale[:24], bias_n[:24], means=means)
            torch.testing.assert_close(means.double(), got.double().view(M, 24 // E, E).mean(-1), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match='float result'):
        packed_ops.sign_gemm(pa, pb, prelu=(slope, offset))
    with pytest.raises(ValueError, match='means must be'):
        packed_ops.sign_gemm(pa, pb24, scale[:24], means=torch.zeros(M, 8, dtype=dtype))  # groups of 3
    with pytest.raises(ValueError, match='multiple of 8'):
        packed_ops.sign_gemm(pa, pb24, scale[:24], shortcut=torch.zeros(M, 6, dtype=dtype))


@pytest.mark.parametrize('isa', packed_ops.ISAS)  # each path the CPU runs
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_packed_sign_output(ext, isa, dtype):
    # packed=True: the signs of the epilogue's result, packed as pack_signs packs them, and the same
    # group means; partial row panels, partial column panels and words, exact zeros in the result
    _require_isa(isa)
    with packed_ops.use_isa(isa):
        for M, K, N in ((1, 1, 1), (19, 130, 29), (40, 64, 128), (9, 65, 64), (64, 384, 512), (16, 7, 72)):
            g = torch.Generator().manual_seed(M + K + N)
            pa, pb = packed_ops.pack_signs(ternary(M, K, True, M)), packed_ops.pack_signs(ternary(N, K, True, N))
            scale, bias = (torch.rand(N, generator=g) + 0.5).to(dtype), torch.randn(N, generator=g).to(dtype)
            scale[::3], bias[::3] = 0, 0  # result 0 where the shortcut is 0 too
            shortcut = torch.randn(M, N, generator=g).to(dtype)
            shortcut[:, ::3] = 0
            prelu = (torch.rand(N, generator=g).to(dtype) - 0.2, torch.randn(N, generator=g).to(dtype))
            prelu[1][::3] = 0
            E = 8 if N % 8 == 0 else 1
            means, means_ref = (torch.full((M, N // E), math.nan, dtype=dtype) for _ in range(2))
            want = packed_ops.sign_gemm(pa, pb, scale, bias, prelu=prelu, shortcut=shortcut, means=means_ref)
            got = packed_ops.sign_gemm(pa, pb, scale, bias, prelu=prelu, shortcut=shortcut, means=means, packed=True)
            ref = packed_ops.pack_signs(want)
            assert bool((want == 0).any()) and got.has_zeros == ref.has_zeros
            for name in ('neg', 'nz', 'counts'):
                assert torch.equal(getattr(got, name), getattr(ref, name)), (M, K, N, name)
            assert torch.equal(got.unpack(), want.sign().float()) and torch.equal(means, means_ref), (M, K, N)
            torch.testing.assert_close(means, want.view(M, -1, E).mean(-1))
            if M % 8 == 0 and N % 32 == 0:  # the vectorised means of 4 on full panels too
                m4 = torch.empty(M, N // 4, dtype=dtype)
                packed_ops.sign_gemm(pa, pb, scale, bias, means=m4, packed=True)
                torch.testing.assert_close(m4, packed_ops.sign_gemm(pa, pb, scale, bias).view(M, -1, 4).mean(-1))
        # a NaN result packs as 0, as pack_signs packs it
        shortcut[::2, 1::5] = math.nan
        want = packed_ops.sign_gemm(pa, pb, scale, bias, shortcut=shortcut)
        got = packed_ops.sign_gemm(pa, pb, scale, bias, shortcut=shortcut, packed=True)
        assert bool(want.isnan().any()) and torch.equal(got.unpack(), want.nan_to_num(0).sign().float())
        assert torch.equal(got.nz, packed_ops.pack_signs(want).nz)
    with pytest.raises(ValueError, match='out is not taken'):
        packed_ops.sign_gemm(pa, pb, scale, bias, out=torch.empty(M, N, dtype=dtype), packed=True)
    with pytest.raises(ValueError, match='float result'):
        packed_ops.sign_gemm(pa, pb, packed=True)


@pytest.mark.parametrize('isa', packed_ops.ISAS)  # each path the CPU runs
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('K', (1, 63, 65, 389))
def test_pack_signs_with_shift_matches_sign(ext, isa, dtype, K):
    _require_isa(isa)
    g = torch.Generator().manual_seed(K)
    M = 11
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype)
    shift = torch.randn(K, generator=g, dtype=torch.float64).to(dtype)
    x[::2, ::3] = -shift[::3]  # exactly at the threshold: sign 0
    x[1, :] = 0.0
    with packed_ops.use_isa(isa):
        p = packed_ops.pack_signs(x, shift)
        plain = packed_ops.pack_signs(x)
        strided = packed_ops.pack_signs(x.t().contiguous().t(), shift)  # column-major input
    expected = torch.sign(x + shift)
    assert p.has_zeros and (expected == 0).sum() > 0
    assert torch.equal(p.unpack(), expected.float())
    assert torch.equal(strided.unpack(), expected.float())
    assert torch.equal(plain.unpack(), torch.sign(x).float())
    assert torch.equal(p.counts[0, :M], (expected != 0).sum(1).int())


def test_pack_signs_batched_strided_views(ext):
    # (g * n, h * d) token-major -> per (image, head) operands, without a copy in the caller
    g_, n, h, d = 2, 13, 3, 70
    x = torch.randn(g_ * n, h * d)
    heads = x.view(g_, n, h, d).permute(0, 2, 1, 3)
    p = packed_ops.pack_signs(heads)
    assert p.shape == (g_, h, n, d)
    assert torch.equal(p.unpack(), torch.sign(heads))
    t = packed_ops.pack_signs_transposed(heads)
    assert t.shape == (g_, h, d, n)
    assert torch.equal(t.unpack(), torch.sign(heads).transpose(-2, -1))


def _reference_bits(values: torch.Tensor) -> torch.Tensor:
    """The packed file's format, written independently: bit 1 = +1, big bit order, padded rows."""
    rows, cols = values.shape
    out = torch.zeros(rows, (cols + 7) // 8, dtype=torch.uint8)
    for r in range(rows):
        for c in range(cols):
            if values[r, c] > 0:
                out[r, c // 8] |= 1 << (7 - c % 8)
    return out


@pytest.mark.parametrize('K', (1, 9, 64, 71, 130))
def test_from_sign_bits_round_trip(ext, K):
    N = 10
    w = ternary(N, K, False, K)
    w.view(-1)[torch.tensor([0, 5, N * K - 1])] = 0  # exact zeros, listed apart
    zeros = (w.reshape(-1) == 0).nonzero().flatten()
    bits = _reference_bits(w)
    p = packed_ops.from_sign_bits(bits, K, zeros)
    assert p.has_zeros and p.shape == (N, K)
    assert torch.equal(p.unpack(), w.float())
    q = packed_ops.pack_sign_values(w)
    assert torch.equal(p.neg, q.neg) and torch.equal(p.nz, q.nz) and torch.equal(p.counts, q.counts)
    a = ternary(5, K, False, 1)
    assert torch.equal(packed_ops.sign_gemm(packed_ops.pack_signs(a), p).double(), a @ w.t())
    without = packed_ops.from_sign_bits(bits, K)  # the same bits, zeros not listed: they read as -1
    assert not without.has_zeros
    assert torch.equal(without.unpack(), torch.where(w > 0, 1.0, -1.0).float())


def test_from_sign_bits_rejects_bad_input(ext):
    bits = torch.zeros(3, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match='bytes per row'):
        packed_ops.from_sign_bits(bits, 17)
    with pytest.raises(RuntimeError, match='outside'):
        packed_ops.from_sign_bits(bits, 16, torch.tensor([48]))
    with pytest.raises(ValueError, match='uint8'):
        packed_ops.from_sign_bits(bits.int(), 16)


@pytest.mark.parametrize('isa', packed_ops.ISAS)  # each path the CPU runs
def test_sign_bmm_heads(ext, isa):
    _require_isa(isa)
    B, h, N, Nk, d = 2, 3, 17, 9, 65
    q, k = ternary(N, d, True, 1, (B, h)), ternary(Nk, d, False, 2, (B, h))
    with packed_ops.use_isa(isa):
        pq, pk = packed_ops.pack_signs(q), packed_ops.pack_signs(k)
        dots = packed_ops.sign_bmm(pq, pk)
        scaled = packed_ops.sign_bmm(pq, pk, scale=0.125)
        shared = packed_ops.sign_bmm(pq, packed_ops.pack_signs(k[0, 0]))
    ref = q @ k.transpose(-2, -1)
    assert dots.shape == (B, h, N, Nk) and dots.dtype == torch.int32
    assert torch.equal(dots.double(), ref)
    assert torch.equal(scaled.double(), ref * 0.125)
    assert torch.equal(shared.double(), q @ k[0, 0].t())


@pytest.mark.parametrize('isa', packed_ops.ISAS)  # each path the CPU runs
@pytest.mark.parametrize('v_zeros', [False, True])
def test_mask_sign_bmm(ext, isa, v_zeros):
    _require_isa(isa)
    BH, N, Nk, d = 5, 13, 70, 33
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(BH, N, Nk, generator=g), -1)
    threshold = float(probs[0, 0, 0])  # a value exactly at the threshold is not > it
    v = ternary(Nk, d, v_zeros, 5, (BH,)) * torch.rand(BH, Nk, d, generator=g, dtype=torch.float64)
    with packed_ops.use_isa(isa):
        pm = packed_ops.pack_mask(probs, threshold)
        ctx = packed_ops.mask_sign_bmm(pm, packed_ops.pack_signs_transposed(v))
    mask = torch.gt(probs, threshold)
    assert torch.equal(pm.unpack(), mask.float()) and not bool(mask[0, 0, 0])
    assert torch.equal(ctx.double(), mask.double() @ torch.sign(v))
    with pytest.raises(TypeError, match='pack_mask'):
        packed_ops.mask_sign_bmm(packed_ops.pack_signs(probs), packed_ops.pack_signs_transposed(v))


def _attention_reference(q, k, v, scale, threshold):
    # the deployed float path: scores, softmax, mask, context, in float64
    probs = torch.softmax(torch.sign(q) @ torch.sign(k).transpose(-2, -1) * scale, -1)
    return (probs > threshold).double() @ torch.sign(v)


@pytest.mark.parametrize('isa', packed_ops.ISAS)  # each path the CPU runs
@pytest.mark.parametrize('zeros', ['none', 'q', 'k', 'v', 'all'])
def test_binary_attention_equals_the_unfused_products(ext, isa, zeros):
    # odd shapes (one key, one channel, keys and channels not multiples of 8 or 64, several key words)
    # and exact zeros in each operand; thresholds from none to all of a row's keys
    _require_isa(isa)
    for B, N, Nk, d in ((1, 1, 1, 1), (2, 9, 5, 3), (3, 49, 49, 64), (1, 70, 130, 65), (2, 17, 200, 128)):
        q, k, v = (ternary(n, d, name in (zeros, 'all'), n + d + i, (B,)) * (1 + torch.rand(B, n, d, dtype=torch.float64))
                   for i, (name, n) in enumerate((('q', N), ('k', Nk), ('v', Nk))))
        scale = d ** -0.5
        with packed_ops.use_isa(isa):
            pq, pk, pv = packed_ops.pack_signs(q), packed_ops.pack_signs(k), packed_ops.pack_signs_transposed(v)
            for threshold in (-1.0, 0.0, 0.5 / Nk, 0.3, 1.0):
                got = packed_ops.binary_attention(pq, pk, pv, scale, threshold)
                assert got.shape == (B, N, d) and got.dtype == torch.int32
                assert torch.equal(got.double(), _attention_reference(q, k, v, scale, threshold)), (B, N, Nk, d, threshold)
    # a probability exactly at the threshold is not above it: one key of equal scores (p = 1 / Nk)
    q, k, v = torch.ones(1, 2, 8), torch.ones(1, 4, 8), ternary(4, 8, True, 1, (1,))
    with packed_ops.use_isa(isa):
        got = packed_ops.binary_attention(packed_ops.pack_signs(q), packed_ops.pack_signs(k),
                                          packed_ops.pack_signs_transposed(v), 0.125, 0.25)
    assert not bool(got.any()) and torch.equal(got.double(), _attention_reference(q, k, v, 0.125, 0.25))


def test_binary_attention_rejects_bad_operands(ext):
    q, k, v = (packed_ops.pack_signs(torch.randn(2, n, 16)) for n in (5, 7, 7))
    vt = packed_ops.pack_signs_transposed(torch.randn(2, 7, 16))
    with pytest.raises(ValueError, match='transposed'):
        packed_ops.binary_attention(q, k, v, 0.25, 0.1)
    for scale in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match='positive and finite'):
            packed_ops.binary_attention(q, k, vt, scale, 0.1)
    with pytest.raises(ValueError, match='batch'):
        packed_ops.binary_attention(q, packed_ops.pack_signs(torch.randn(7, 16)), vt, 0.25, 0.1)
    with pytest.raises(TypeError, match='signs'):
        packed_ops.binary_attention(q, k, packed_ops.pack_mask(torch.rand(2, 16, 7), 0.5), 0.25, 0.1)


def test_bad_operands_are_named(ext):
    a, b = packed_ops.pack_signs(torch.randn(3, 10)), packed_ops.pack_signs(torch.randn(4, 11))
    with pytest.raises(ValueError, match='columns'):
        packed_ops.sign_gemm(a, b)
    with pytest.raises(ValueError, match='-1, 0 and \\+1'):
        packed_ops.pack_sign_values(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match='shift'):
        packed_ops.pack_signs(torch.randn(3, 10), torch.zeros(9))
    with pytest.raises(ValueError, match='isa must be one of'):
        with packed_ops.use_isa('sse9'):
            pass


def test_register_candidates_is_idempotent_and_runs(ext):
    from timm_binaryvit import kernels
    packed_ops.register_candidates()
    packed_ops.register_candidates()
    for product, shape in (('deploy_linear', (7, 65, 9)), ('deploy_attention', (2, 5, 16, 7))):
        candidate = kernels._registry[product]['packed']
        assert candidate.unavailable(shape, torch.float32, torch.device('cpu')) is None
        assert 'CPU' in candidate.unavailable(shape, torch.float32, torch.device('meta'))
        result = candidate.make(shape, torch.float32, torch.device('cpu'))()
        if product == 'deploy_linear':
            assert result.shape == (7, 9) and result.dtype == torch.float32
        else:
            assert result.shape == (2, 5, 16) and result.dtype == torch.int32


# ---- the fallback, in this process with the module's build state reset (quick), then in fresh processes
# (the module builds at most once per process; each fresh process imports torch, so those are slow)


def _ours(caught):
    return [str(w.message) for w in caught if 'packed 1-bit kernels' in str(w.message)]


def test_fallback_rules_in_process(monkeypatch, tmp_path):
    # _tried/_ext/_reason as before the first use; monkeypatch puts this process's build back afterwards
    for name, value in (('_tried', False), ('_ext', None), ('_reason', None)):
        monkeypatch.setattr(packed_ops, name, value)
    monkeypatch.setenv(packed_ops.ENV_DISABLE, '1')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert not packed_ops.available() and not packed_ops.available()
    assert not _ours(caught) and packed_ops.ENV_DISABLE in packed_ops.unavailable_reason()
    with pytest.raises(RuntimeError, match='packed 1-bit kernels are unavailable'):
        packed_ops.pack_signs(torch.ones(2, 3))

    monkeypatch.setattr(packed_ops, '_tried', False)
    monkeypatch.delenv(packed_ops.ENV_DISABLE)
    monkeypatch.setenv('CXX', str(tmp_path / 'nonexistent-c++'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert not packed_ops.available() and not packed_ops.available()
    ours = _ours(caught)
    assert len(ours) == 1 and 'no C++ compiler found' in ours[0] and 'nonexistent-c++' in ours[0], ours


def _run_python(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, '-W', 'always', '-c', textwrap.dedent(code)], env=full,
                          capture_output=True, text=True, timeout=300)


_PROBE = '''
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        from timm_binaryvit import packed_ops
        ok = packed_ops.available()
        packed_ops.available()
    ours = [str(w.message) for w in caught if 'packed 1-bit kernels' in str(w.message)]
    print('AVAILABLE', ok)
    print('REASON', packed_ops.unavailable_reason())
    print('WARNINGS', len(ours))
    for m in ours:
        print('WARNING', m)
    try:
        packed_ops.pack_signs(__import__('torch').ones(2, 3))
    except RuntimeError as e:
        print('RAISES', e)
'''


@pytest.mark.slow
def test_env_forces_fallback_without_warning():
    r = _run_python(_PROBE + '''
    import torch
    from timm_binaryvit import kernels
    packed_ops.register_candidates()
    kernels.register('deploy_linear', 'float', lambda s, d, dev: (lambda: None))
    with kernels.kernel_mode('packed'):
        print('CHOSEN', kernels.choose('deploy_linear', (8, 64, 8)))
    ''', TIMM_BINARYVIT_NO_EXTENSION='1')
    assert r.returncode == 0, r.stderr
    assert 'AVAILABLE False' in r.stdout and 'WARNINGS 0' in r.stdout
    assert 'TIMM_BINARYVIT_NO_EXTENSION' in r.stdout and 'RAISES packed 1-bit kernels are unavailable' in r.stdout
    assert 'CHOSEN float' in r.stdout


@pytest.mark.slow
def test_no_compiler_warns_once_and_falls_back(tmp_path):
    r = _run_python(_PROBE, CXX=str(tmp_path / 'nonexistent-c++'), TORCH_EXTENSIONS_DIR=str(tmp_path / 'ext'))
    assert r.returncode == 0, r.stderr
    assert 'AVAILABLE False' in r.stdout and 'WARNINGS 1' in r.stdout
    assert 'no C++ compiler found' in r.stdout and 'nonexistent-c++' in r.stdout


@pytest.mark.slow
def test_failed_build_warns_once_with_the_compiler_error(tmp_path):
    fake = tmp_path / 'fake-c++'
    # a real compiler whose compilations fail (as with a broken toolchain or missing headers)
    fake.write_text('#!/bin/sh\ncase "$1" in --version|-v) exec c++ "$@";; esac\n'
                    'exec c++ "$@" -include simulated_missing_header.h\n')
    fake.chmod(0o755)
    r = _run_python(_PROBE, CXX=str(fake), TORCH_EXTENSIONS_DIR=str(tmp_path / 'ext'))
    assert r.returncode == 0, r.stderr
    assert 'AVAILABLE False' in r.stdout and 'WARNINGS 1' in r.stdout, r.stdout + r.stderr
    warning = [ln for ln in r.stdout.splitlines() if ln.startswith('WARNING ')][0]
    assert 'failed' in warning and 'simulated_missing_header.h' in warning, warning
