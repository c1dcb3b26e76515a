"""The fused training path (custom autograd functions in layers.py / batchnorm.py / fused.py) computes what the
module-by-module path and the stock-autograd path compute: outputs, every gradient, BatchNorm running
statistics, in float64.

Two references: the module-by-module path, forced with a global forward hook (``fusable`` refuses to
fuse when hooks are registered, so that they fire), which still runs the leaf layers' custom autograd
functions; and ``dispatch.stock_operators()``, where every layer runs the quantizers' straight-through
compositions of stock operators and plain autograd differentiates them, sharing no backward code with
the custom functions. The reference test (test_reference.py) ties the default path to the authors' code.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import timm
from timm_binaryvit import batchnorm, dispatch, fused, kernels
from timm_binaryvit.blocks import BinaryMlp, Block
from timm_binaryvit.batchnorm import TokenBatchNorm
from timm_binaryvit.layers import BinaryLinear

TINY = {
    'binaryvit_small_patch4_224': dict(
        img_size=64, embed_dims=(16, 32, 64, 128), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), num_classes=10),
    'binaryvit_small_fpembed_patch4_224': dict(
        img_size=64, embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=10),
    'binary_deit_small_patch16_224': dict(img_size=64, depth=2, embed_dim=48, num_heads=3, num_classes=10),
    'binary_deit_small_gap_mb_affine_patch16_224': dict(img_size=64, depth=2, embed_dim=48, num_heads=3,
                                                        num_classes=10),
}


@contextlib.contextmanager
def module_path():
    """Force the module-by-module path everywhere (a global forward hook disables fusing)."""
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def setting(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _perturbed(name, seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **dict(TINY[name], **kwargs)).to(dtype)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if pname.endswith('prob_binarizer.scale'):
                p.fill_(0.02)
    return model


def _run(model, x, steps=2, train=True, seed=0):
    """Outputs, gradients (summed over steps) and buffers after ``steps`` forward/backward passes."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    outs = []
    for step in range(steps):
        torch.manual_seed(seed + step)  # drop path draws
        y = model(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(step), dtype=y.dtype)
        (y * g).sum().backward()
        outs.append(y.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return outs, grads, buffers


def _compare(a, b, rtol=1e-10):
    outs_a, grads_a, bufs_a = a
    outs_b, grads_b, bufs_b = b
    for ya, yb in zip(outs_a, outs_b):
        assert (ya - yb).norm() <= rtol * yb.norm()
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        ga, gb = grads_a[name], grads_b[name]
        assert (ga - gb).norm() <= rtol * gb.norm() + 1e-12, name
    for name in bufs_b:
        ba, bb = bufs_a[name], bufs_b[name]
        if ba.is_floating_point():
            assert (ba - bb).norm() <= rtol * bb.norm() + 1e-12, name
        else:
            assert torch.equal(ba, bb), name


def _fused_and_modules(name, train=True, **kwargs):
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fused = _run(_perturbed(name, **kwargs), x, train=train)
    with module_path():
        modules = _run(_perturbed(name, **kwargs), x, train=train)
    return fused, modules


@pytest.mark.parametrize('name', sorted(TINY))
def test_fused_matches_modules(name):
    _compare(*_fused_and_modules(name))


@pytest.mark.slow
@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('name', sorted(TINY))
def test_custom_autograd_matches_stock_autograd(name, train):
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    custom = _run(_perturbed(name), x, train=train)
    with dispatch.stock_operators():
        stock = _run(_perturbed(name), x, train=train)
    _compare(custom, stock)


def test_fused_matches_modules_eval_mode_backward():
    # Running statistics in the BatchNorms (fine-tuning with frozen statistics): other formulas.
    _compare(*_fused_and_modules('binaryvit_small_patch4_224', train=False))


def test_fused_matches_modules_with_drop_path():
    _compare(*_fused_and_modules('binary_deit_small_gap_mb_affine_patch16_224', drop_path_rate=0.3))


@pytest.mark.parametrize('train', [True, False])
def test_chunked_ffn_matches_whole(train):
    # Large problems run the FFN in chunks with BN1 statistics from the Gram matrix of the signs.
    name = 'binaryvit_small_patch4_224'
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    whole = _run(_perturbed(name), x, train=train)
    with setting(BinaryMlp, 'unchunked_elements', 0), setting(BinaryMlp, 'chunk_elements', 1000):
        chunked = _run(_perturbed(name), x, train=train)
    _compare(chunked, whole)


def test_int8_products_match_float_products():
    name = 'binary_deit_small_gap_mb_affine_patch16_224'
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with kernels.kernel_mode('int8'):
        int8 = _run(_perturbed(name), x)
    with kernels.kernel_mode('float'):
        plain = _run(_perturbed(name), x)
    _compare(int8, plain)


def test_float32_fused_close_to_modules():
    name = 'binaryvit_small_patch4_224'
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    fused = _run(_perturbed(name, dtype=torch.float32), x, steps=1)
    with module_path():
        modules = _run(_perturbed(name, dtype=torch.float32), x, steps=1)
    assert (fused[0][0] - modules[0][0]).norm() <= 1e-4 * modules[0][0].norm()


@pytest.mark.slow
def test_grad_checkpointing_matches():
    name = 'binaryvit_small_patch4_224'
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    plain = _run(_perturbed(name), x)
    model = _perturbed(name)
    model.set_grad_checkpointing(True)
    _compare(_run(model, x), plain)  # running statistics updated once per step


def test_fused_path_is_taken_and_hooks_disable_it(monkeypatch):
    calls = []
    forward = fused._BinaryFFN.forward

    def counting(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)

    monkeypatch.setattr(fused._BinaryFFN, 'forward', staticmethod(counting))
    model = _perturbed('binary_deit_small_gap_mb_affine_patch16_224', dtype=torch.float32)
    x = torch.randn(2, 3, 64, 64)
    model(x)
    assert len(calls) == 2
    seen = []
    handle = model.blocks[0].mlp.fc1.linear.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    model(x)
    handle.remove()
    assert len(seen) == 1 and len(calls) == 3  # block 0 ran module by module, block 1 fused


def test_sync_batchnorm_conversion_uses_module_path():
    model = _perturbed('binary_deit_small_gap_mb_affine_patch16_224').eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert isinstance(converted.blocks[0].mlp.fc1.norm.bn, torch.nn.SyncBatchNorm)
        assert not fused.fusable(x, converted.blocks[0])
        torch.testing.assert_close(converted(x), expected, rtol=1e-12, atol=1e-12)


def test_bfloat16_and_meta_and_script():
    model = _perturbed('binaryvit_small_patch4_224', dtype=torch.float32).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), y, rtol=1e-4, atol=1e-4)
        y16 = model.to(torch.bfloat16)(x.bfloat16())
        assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    meta = timm.create_model('binaryvit_small_patch4_224', device='meta', **TINY['binaryvit_small_patch4_224'])
    assert meta(torch.empty(2, 3, 64, 64, device='meta')).shape == (2, 10)


def test_functions_keep_few_tensors():
    # The fused block keeps far less for the backward pass than the module path.
    block = Block(32, 2, mlp_ratio=8, sr_ratio=2, dtype=torch.float64)
    x = torch.randn(2, 64, 32, dtype=torch.float64)

    def saved_bytes():
        seen = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, (8, 8))
        return sum(seen.values())

    fused = saved_bytes()
    with module_path():
        modules = saved_bytes()
    assert fused < 0.4 * modules, (fused, modules)


def test_token_batchnorm_frozen_stats_in_fused_path():
    norm = TokenBatchNorm(8, dtype=torch.float64).train()
    y = torch.randn(10, 8, dtype=torch.float64)
    before = (norm.bn.running_mean.clone(), norm.bn.num_batches_tracked.clone())
    with batchnorm.frozen_batchnorm_stats():
        batchnorm.batchnorm_forward(norm.bn, y, None, None)
    assert torch.equal(norm.bn.running_mean, before[0]) and torch.equal(norm.bn.num_batches_tracked, before[1])
    out, mean, invstd, batch = batchnorm.batchnorm_forward(norm.bn, y, None, None)
    torch.testing.assert_close(out, F.batch_norm(y, None, None, training=True))
    assert batch and int(norm.bn.num_batches_tracked) == 1


@pytest.mark.parametrize('mode', ['int8', 'float'])
def test_binary_linear_matches_stock_autograd(mode):
    lin = BinaryLinear(24, 40, dtype=torch.float32)
    with torch.no_grad():
        lin.shift.normal_(0, 0.3)
        lin.weight.normal_(0, 0.8)  # some centred weights beyond the clipping bounds
    x = torch.randn(5, 7, 24, requires_grad=True)
    g = torch.randn(5, 7, 40)
    with kernels.kernel_mode(mode):
        y = lin(x)
    y.backward(g)
    custom = (y.detach(), x.grad.clone(), lin.shift.grad.clone(), lin.weight.grad.clone())
    x.grad = lin.shift.grad = lin.weight.grad = None
    with dispatch.stock_operators():
        y2 = lin(x)
    y2.backward(g)
    stock = (y2.detach(), x.grad, lin.shift.grad, lin.weight.grad)
    assert lin.weight.grad.abs().sum() > 0 and lin.shift.grad.abs().sum() > 0
    for a, b in zip(custom, stock):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
