"""The tools a timm user reaches for, on every registered model (tiny configurations): TorchScript training
with the eager pseudo-gradients, torch.compile with no graph break, and the input size carried in ``pretrained_cfg``. The stock scripts themselves
(``train.py --amp / --torchcompile / --torchscript``, ONNX) are in test_stock_scripts.py; mixed precision in
test_autocast.py."""
import pytest
import torch

import timm
from timm.data import resolve_data_config

MODELS = timm.list_models(['binaryvit*', 'binary_deit*'])
# `binaryvit` is `binaryvit_small_patch4_224` under its short name (test_short_name_is_the_small_model):
# compiling it a second time would prove nothing and costs minutes on a 2-core CPU.
DISTINCT_MODELS = [name for name in MODELS if name != 'binaryvit']
PYRAMID = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), img_size=32)
DEIT = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


def tiny(name, **kwargs):
    config = PYRAMID if name.startswith('binaryvit') else DEIT
    return timm.create_model(name, num_classes=5, **dict(config, **kwargs))


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
            if name.endswith('prob_binarizer.scale'):
                p.fill_(0.02)
    return model


def _grads(model, x, target_seed=1, forward=None):
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = (forward or model)(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(target_seed), dtype=torch.float32)
    (out.float() * g).sum().backward()
    model.load_state_dict(state)  # one step must not move the BatchNorm statistics for the next run
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative(a, b):
    scale = max(v.abs().max().item() for v in b.values())
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b) / scale


@pytest.mark.slow
@pytest.mark.parametrize('name', MODELS)
def test_scripted_model_trains_with_eager_pseudo_gradients(name):
    model = _perturb(tiny(name).double())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    eager_out, eager = _grads(model, x)
    scripted_out, scripted = _grads(torch.jit.script(model), x)
    torch.testing.assert_close(scripted_out, eager_out, rtol=1e-10, atol=1e-12)
    assert scripted.keys() == eager.keys()
    assert _relative(scripted, eager) < 1e-9
    # the shifts train in the scripted model as in eager (they used to get exactly zero gradient there)
    shifts = [n for n in scripted if n.endswith('.shift')]
    zero_scripted = {n for n in shifts if not scripted[n].any()}
    assert zero_scripted == {n for n in shifts if not eager[n].any()}
    assert len(zero_scripted) < len(shifts) / 4


@pytest.mark.slow
@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('name', MODELS)
def test_compile_has_no_graph_break(name, train):
    model = tiny(name).train(train)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    reasons = [b.reason for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_cfg_follows_img_size(name):
    model = tiny(name, device='meta')
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)
    assert resolve_data_config(model=model)['input_size'] == (3, 32, 32)
    gray = tiny(name, in_chans=1, device='meta')
    assert resolve_data_config(model=gray)['input_size'] == (1, 32, 32)


def test_input_size_error_says_what_to_change():
    model = tiny('binaryvit').eval()
    with pytest.raises(ValueError) as info:
        model(torch.randn(1, 3, 64, 64))
    message = str(info.value)
    assert '--input-size 3 32 32' in message and 'img_size=(64, 64)' in message
    with pytest.raises(ValueError, match='in_chans=3'):
        model(torch.randn(1, 1, 32, 32))


def test_short_name_is_the_small_model():
    short, small = tiny('binaryvit'), tiny('binaryvit_small_patch4_224')
    assert type(short) is type(small) and repr(short) == repr(small)
    assert {k: v.shape for k, v in short.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    full_short, full_small = timm.create_model('binaryvit'), timm.create_model('binaryvit_small_patch4_224')
    assert repr(full_short) == repr(full_small)
    assert full_short.pretrained_cfg['input_size'] == full_small.pretrained_cfg['input_size']


@pytest.mark.slow
def test_compiled_model_keeps_the_chosen_sign_kernel(monkeypatch):
    # Under torch.compile the binary linear layers' products of signs go through the custom operator
    # timm_binaryvit::sign_linear, which runs the kernel timm_binaryvit.kernels picks (int8 here, forced)
    # instead of the compiler's float32; values and gradients stay those of eager mode.
    from timm_binaryvit import dispatch, kernels
    seen = []
    original = dispatch._sign_mm
    monkeypatch.setattr(dispatch, '_sign_mm', lambda *args, **kw: (seen.append(args[3]), original(*args, **kw))[1])
    model = _perturb(tiny('binary_deit_small_gap_mb_affine_patch16_224')).train()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    eager_out, eager = _grads(model, x)
    seen.clear()
    torch._dynamo.reset()
    with kernels.kernel_mode('int8'):
        out, got = _grads(torch.compile(model, backend='aot_eager'), x)
    assert seen and set(seen) == {'int8'}, seen
    got = {n.removeprefix('_orig_mod.'): g for n, g in got.items()}
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    assert got.keys() == eager.keys() and _relative(got, eager) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('dynamic', [False, True])
@pytest.mark.parametrize('name', DISTINCT_MODELS)
def test_compiled_model_trains_and_evaluates_like_eager(name, dynamic):
    # aot_eager captures the graph and its backward through AOTAutograd (the same operators, so the same
    # numbers); a second batch size exercises the dynamic shapes.
    model = _perturb(tiny(name))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='aot_eager', dynamic=dynamic)
    for train, batch in ((True, 3), (False, 2), (True, 4)):
        model.train(train)
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        eager_out, eager = _grads(model, x)
        out, got = _grads(compiled, x)
        got = {n.removeprefix('_orig_mod.'): g for n, g in got.items()}
        torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
        assert got.keys() == eager.keys() and _relative(got, eager) < 1e-4



@pytest.mark.slow
@pytest.mark.parametrize('name, chunked, dynamic', [
    ('binaryvit_small_patch4_224', True, True), ('binary_deit_small_gap_mb_affine_patch16_224', False, False)])
def test_compiled_training_runs_the_fused_ffn_operator(name, chunked, dynamic, monkeypatch):
    # Under torch.compile each training FFN is the custom operator timm_binaryvit::binary_ffn: the compiled
    # step runs the eager fused forward and backward passes (chunked, hidden activations never kept) and
    # updates the BatchNorm running statistics exactly as eager training does.
    import copy
    from timm_binaryvit import fused
    from timm_binaryvit.blocks import BinaryMlp
    calls = []
    for fn in ('_ffn_forward', '_ffn_backward'):
        original = getattr(fused, fn)
        monkeypatch.setattr(fused, fn, lambda *a, _f=original, _n=fn: (calls.append(_n), _f(*a))[1])
    model = _perturb(tiny(name)).train()
    mlps = [m for m in model.modules() if isinstance(m, BinaryMlp)]
    if chunked:  # a few rows per chunk, so that the chunk loop and the Gram-matrix statistics run
        for mlp in mlps:
            mlp.unchunked_elements, mlp.chunk_elements = 0, 16 * 4 * mlp.dim
    twin = copy.deepcopy(model)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(6))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='aot_eager', dynamic=dynamic)
    out = compiled(x)
    (out * g).sum().backward()
    assert calls == ['_ffn_forward'] * len(mlps) + ['_ffn_backward'] * len(mlps)
    eager_out = twin(x)
    (eager_out * g).sum().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    eager = {n: p.grad for n, p in twin.named_parameters()}
    assert _relative(grads, eager) < 1e-4
    state, eager_state = model.state_dict(), twin.state_dict()
    stats = [k for k in state if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert any('.mlp.' in k for k in stats)
    for k in stats:
        torch.testing.assert_close(state[k], eager_state[k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(state[k].item() == 1 for k in stats if k.endswith('num_batches_tracked') and '.mlp.' in k)
