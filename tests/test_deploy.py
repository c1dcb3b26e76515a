"""Inference deployment (``deploy``) and the packed 1-bit export (``export_packed`` / ``load_packed``).

* Deployed eval logits equal the training model's eval logits in float64 (1e-6 relative; we see
  ~1e-15) for every registered model, reduced in size, with every parameter and running
  statistic perturbed away from its initial value (so that a wrong fold cannot hide behind
  zero shifts or unit BatchNorms), and with the binarised attention probabilities mixed.
* The same against the authors' reference checkpoints in ``../shared/reference`` (skipped with
  the reason when absent, failing under ``CI=true``).
* Packed files round-trip to bit-identical effective weights and eval logits; exact zeros
  survive; broken files fail with the file name and the problem; the packed BinaryViT is at
  most a tenth of its float32 checkpoint.
* The speed goal (>= 1.5x eval throughput) is measured by the ``slow`` test at the end.
"""
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import timm
from timm_binaryvit import checkpoint_filter_fn
from timm_binaryvit.deploy import (
    PACKED_FORMAT, DeployedBinaryDeiT, DeployedBinaryViT, PackedFormatError, _latent_weight, _pack_bits, _unpack_bits,
    benchmark_deploy, deploy, export_packed, is_deployed, load_packed, read_packed_metadata)
from timm_binaryvit.layers import BinaryConv2d, BinaryLinear, ElasticBinarizer

from conftest import AUTHORS_VARIANTS, REFERENCE_DIR, reference_model_kwargs, require_reference

RTOL = 1e-6

PYRAMID_SMALL = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), img_size=128, num_classes=10)
DEIT_SMALL = dict(depth=1, img_size=128, num_classes=10)


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    # On a loaded 2-core machine every small op with 2 OpenMP threads waits for a scheduler slice.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _is_pyramid(name):
    return name.startswith('binaryvit')


def _small_kwargs(name, **extra):
    return dict(PYRAMID_SMALL if _is_pyramid(name) else DEIT_SMALL, **extra)


def _key_lengths(model):
    """Number of keys each attention layer's binariser sees (to put its threshold mid-distribution)."""
    lengths = {}
    if hasattr(model, 'stages'):
        for stage, grid in zip(model.stages, model._grids):
            for i, blk in enumerate(stage.blocks):
                lengths[blk.attn.prob_binarizer] = grid[0] * grid[1] // blk.attn.sr_ratio ** 2
    else:
        n = model.grid_size[0] * model.grid_size[1] + model.num_prefix_tokens
        for blk in model.blocks:
            lengths[blk.attn.prob_binarizer] = n
    return lengths


def perturb(model, seed=0, slopes='below_one'):
    """Move every parameter and running statistic away from its initial value.

    ``slopes='below_one'``: PReLU slopes in (0.05, 0.95) (the deployed max-form PReLU);
    ``'any'``: in (-0.3, 1.6) (some layers take the general PReLU path).
    The attention binariser scale is set so that roughly half of the probabilities binarise to 1.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = _key_lengths(model)

    def rand(shape, dtype):
        return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ElasticBinarizer):
                module.scale.fill_(float(1.0 + rand((), torch.float64)) / lengths[module])
        for name, p in model.named_parameters():
            if name.endswith('prob_binarizer.scale'):
                continue
            if name.endswith('.slope'):
                lo, hi = (0.05, 0.95) if slopes == 'below_one' else (-0.3, 1.6)
                p.copy_(lo + (hi - lo) * rand(p.shape, p.dtype))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
            elif name.endswith('running_var'):
                b.copy_(0.3 + 2 * rand(b.shape, b.dtype))
    return model


def _make(name, dtype=torch.float64, seed=0, slopes='below_one', **extra):
    model = timm.create_model(name, **_small_kwargs(name, **extra))
    return perturb(model.to(dtype), seed=seed, slopes=slopes).eval()


def _images(model, batch=2, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.in_chans, *model.img_size, generator=g, dtype=torch.float64).to(dtype)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


MODELS = sorted(n for n in timm.list_models('binary*')
                if getattr(timm.models.model_entrypoint(n), '__module__', '').startswith('timm_binaryvit'))


def test_every_family_is_covered():
    assert any(_is_pyramid(n) for n in MODELS) and any(not _is_pyramid(n) for n in MODELS)
    assert len(MODELS) >= 7


# ---------------------------------------------------------------------------------------------
# deploy(): equality


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('slopes', ['below_one', 'any'])
def test_deployed_logits_equal_training_model(name, slopes):
    model = _make(name, slopes=slopes)
    x = _images(model)
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
    assert _rel(logits, ref_logits) < RTOL
    assert features.shape == ref_features.shape
    assert _rel(features, ref_features) < RTOL
    assert _rel(deployed.forward_head(features), ref_logits) < RTOL
    with torch.no_grad():
        ref_pre = model.forward_head(ref_features, pre_logits=True)
    assert _rel(deployed.forward_head(features, pre_logits=True), ref_pre) < RTOL


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
    model = _make(name, **extra)
    x = _images(model)
    with torch.no_grad():
        ref = model(x)
    out = deploy(model)(x)
    assert out.shape == ref.shape
    assert _rel(out, ref) < RTOL


@pytest.mark.parametrize('name', ['binaryvit_small_patch4_224', 'binary_deit_small_gap_mb_affine_patch16_224'])
def test_float_matmul_path(name, monkeypatch):
    # the path other devices take: float +-1 products instead of int8 ones (and float attention)
    deploy_module = importlib.import_module("timm_binaryvit.deploy")
    monkeypatch.setattr(deploy_module, 'INT8_MIN_FAN_IN', 10 ** 9)
    model = _make(name)
    x = _images(model)
    with torch.no_grad():
        ref = model(x)
    deployed = deploy(model)
    assert not any(getattr(m, 'int8', False) for m in deployed.modules())
    assert _rel(deployed(x), ref) < RTOL


def test_attention_over_256_keys_stays_float():
    # more than 256 keys: 0/1 x sign sums may leave bfloat16's exact integers, the float path runs
    model = _make('binary_deit_small_gap_patch16_224', img_size=272)  # 17 x 17 = 289 tokens
    x = _images(model)
    with torch.no_grad():
        ref = model(x)
    assert _rel(deploy(model)(x), ref) < RTOL


def test_deployed_float32_close_and_non_positive_binariser_scale():
    model = _make('binary_deit_small_gap_mb_affine_patch16_224', dtype=torch.float32)
    x = _images(model, dtype=torch.float32)
    with torch.no_grad():
        ref = model(x)
    assert _rel(deploy(model)(x), ref) < 1e-3  # float32: rounding may flip a rare sign
    # s <= 0 binarises every probability to 0
    model = _make('binaryvit_small_patch4_224')
    with torch.no_grad():
        model.stages[0].blocks[0].attn.prob_binarizer.scale.fill_(-0.01)
        model.stages[2].blocks[0].attn.prob_binarizer.scale.fill_(0.)
        x = _images(model)
        ref = model(x)
    assert torch.isfinite(ref).all()
    assert _rel(deploy(model)(x), ref) < RTOL


def test_deploy_leaves_the_training_model_alone_and_is_inference_only():
    model = _make('binaryvit_small_patch4_224')
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
    x = _images(model).requires_grad_(True)
    out = deployed(x)
    assert not out.requires_grad
    with torch.inference_mode():
        deployed(x.detach())
    # no custom autograd function, DropPath or checkpointing is left: only folded modules
    names = {type(m).__name__ for m in deployed.modules()}
    assert not names & {'BinaryLinear', 'BinaryConv2d', 'TokenBatchNorm', 'DropPath', 'RPReLU', 'Block'}
    with pytest.raises(TypeError):
        deploy(torch.nn.Linear(2, 2))


def test_deployed_api_for_timm_tooling():
    model = _make('binary_deit_small_gap_mb_affine_patch16_224', dtype=torch.float32)
    deployed = deploy(model)
    assert isinstance(deployed, DeployedBinaryDeiT)
    for attr in ('num_classes', 'num_features', 'head_hidden_size', 'global_pool', 'img_size', 'in_chans'):
        assert getattr(deployed, attr) == getattr(model, attr), attr
    assert deployed.pretrained_cfg == model.pretrained_cfg
    assert timm.data.resolve_data_config(model=deployed) == timm.data.resolve_data_config(model=model)
    assert deployed.get_classifier().weight.shape == (10, model.num_features)
    deployed.reset_classifier(3)
    assert deployed(_images(model, dtype=torch.float32)).shape == (2, 3)
    deployed.reset_classifier(0)
    assert deployed(_images(model, dtype=torch.float32)).shape == (2, model.num_features)
    with pytest.raises(ValueError, match='expects input of shape'):
        deployed(torch.zeros(1, 3, 32, 32))
    # dtype conversion after deploying keeps working (signs and folded constants are buffers)
    d64 = deploy(model).double()
    with torch.no_grad():
        assert _rel(d64(_images(model)), model.double()(_images(model))) < 1e-5


# ---------------------------------------------------------------------------------------------
# the authors' reference checkpoints

TAGS = sorted(json.loads((REFERENCE_DIR / 'manifest.json').read_text())) \
    if (REFERENCE_DIR / 'manifest.json').is_file() else ['(reference data absent)']


def _reference_model(tag):
    reference = require_reference()
    info = json.loads((reference / 'manifest.json').read_text())[tag]
    model = timm.create_model(AUTHORS_VARIANTS[info['official_variant']], **reference_model_kwargs(info)).double()
    state_dict = load_file(str(reference / f'{tag}.official.safetensors'))
    state_dict = {k: v.double() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    io = load_file(str(reference / f'{tag}.io.safetensors'))
    return model.eval(), io['input'].double(), io['logits'].double()


@pytest.mark.reference
@pytest.mark.parametrize('tag', TAGS)
def test_reference_checkpoints_deploy_and_pack(tag, tmp_path):
    model, x, expected = _reference_model(tag)
    with torch.no_grad():
        ref = model(x)
    assert _rel(ref, expected) < RTOL
    deployed = deploy(model)
    assert _rel(deployed(x), expected) < RTOL
    assert _rel(deployed(x), ref) < RTOL
    # the packed file of the checkpoint reproduces the same logits, as a training and a deployed model
    path = tmp_path / f'{tag}.packed.safetensors'
    export_packed(model, str(path))
    with torch.no_grad():
        assert torch.equal(load_packed(str(path)).eval()(x), ref)
    assert _rel(load_packed(str(path), deployed=True)(x), expected) < RTOL


# ---------------------------------------------------------------------------------------------
# packed export


def _binary_effective(model):
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (BinaryLinear, BinaryConv2d)):
                out[name] = m.binary_weight()
    return out


@pytest.mark.parametrize('name', ['binaryvit_small_patch4_224', 'binaryvit_small_fpembed_patch4_224',
                                  'binary_deit_small_patch16_224', 'binary_deit_small_gap_mb_affine_patch16_224'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_packed_round_trip_is_exact(name, dtype, tmp_path):
    model = _make(name, dtype=dtype, slopes='any')
    path = tmp_path / 'model.packed'
    info = export_packed(model, str(path))
    assert info['packed_bytes'] == path.stat().st_size
    assert info['zeros'] == 0 and info['binary_tensors'] == len(_binary_effective(model))

    loaded = load_packed(str(path))
    assert type(loaded) is type(model) and not loaded.training
    assert next(loaded.parameters()).dtype == dtype
    # the training model binarises back to exactly the stored weights
    want, got = _binary_effective(model), _binary_effective(loaded)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    # and every other tensor is stored as it was
    binary_keys = {f'{k}.weight' for k in want}
    for key, value in model.state_dict().items():
        if key not in binary_keys:
            assert torch.equal(value, loaded.state_dict()[key]), key
    x = _images(model, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg['architecture'] == name
    # deployed straight from the file: identical to deploying the original
    assert torch.equal(load_packed(str(path), deployed=True)(x), deploy(model)(x))


def test_loaded_training_model_fine_tunes(tmp_path):
    model = _make('binaryvit_small_patch4_224', dtype=torch.float32)
    export_packed(model, str(tmp_path / 'm.packed'))
    loaded = load_packed(str(tmp_path / 'm.packed')).train()
    x = _images(model, dtype=torch.float32)
    loss = loaded(x).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in loaded.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # latent weights look like trained ones: close to +-scale around a zero mean
    w = loaded.stages[1].blocks[0].mlp.fc1.linear.weight
    a = w.abs().mean(1, keepdim=True)
    assert torch.allclose(w.abs(), a.expand_as(w), rtol=1e-3)


def test_exact_zeros_round_trip(tmp_path):
    model = _make('binaryvit_small_patch4_224')
    with torch.no_grad():
        lin = model.stages[0].blocks[0].attn.q.linear
        row = torch.tensor([0.03, -0.03, 0.0, 0.0] * (lin.in_features // 4), dtype=torch.float64)
        lin.weight[3] = row  # mean 0: the centred weight has exact zeros
        lin.weight[5] = row * 2 + 0.25  # mean 0.25: zeros again after centring
        conv = model.stages[1].downsample.conv
        conv.weight[0, :3] = 0.  # sign(0) = 0 in a conv weight
    effective = _binary_effective(model)
    assert (effective['stages.0.blocks.0.attn.q.linear'] == 0).sum() == lin.in_features
    path = tmp_path / 'zeros.packed'
    info = export_packed(model, str(path))
    assert info['zeros'] == lin.in_features + 3 * 2 * 2
    stored = load_file(str(path))
    assert stored['stages.0.blocks.0.attn.q.linear.weight.zeros'].numel() == lin.in_features
    loaded = load_packed(str(path))
    for key, value in _binary_effective(loaded).items():
        assert torch.equal(value, effective[key]), key
    x = _images(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(load_packed(str(path), deployed=True)(x), deploy(model)(x))


def test_latent_weight_construction():
    signs = torch.tensor([[1., -1., 1., -1., 1., 1.],     # plain
                          [1., 0., -1., 0., 1., -1.],     # zeros with both signs: zero row sum
                          [1., 0., 1., 1., 1., 1.],       # zeros with one sign: not exactly reproducible
                          [0., 0., 0., 0., 0., 0.]])      # nothing
    scale = torch.tensor([0.0123, 0.456, 0.1, 0.7])
    for dtype in (torch.float32, torch.float64):
        latent, exact = _latent_weight(signs, scale, 'linear', dtype)
        assert exact.tolist() == [True, True, False, True]
        centred = latent - latent.mean(1, keepdim=True)
        assert torch.equal(torch.sign(centred[:2]), signs[:2].to(dtype))
        assert torch.equal(latent[:2].abs().mean(1), scale[:2].to(dtype))
        assert torch.equal(latent[3], torch.zeros(6, dtype=dtype))
        latent, exact = _latent_weight(signs, scale, 'conv2d', dtype)
        assert exact.all()
        assert torch.equal(torch.sign(latent), signs.to(dtype))
        assert torch.equal(latent[:3].abs().mean(1), scale[:3].to(dtype))


def test_bit_layout_matches_numpy_packbits():
    np = pytest.importorskip('numpy')
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 2, (5, 21), generator=g).double() * 2 - 1
    packed = _pack_bits(values)
    assert packed.shape == (5, 3) and packed.dtype == torch.uint8
    expected = np.packbits((values.numpy() > 0).astype(np.uint8), axis=-1, bitorder='big')
    assert (packed.numpy() == expected).all()
    assert torch.equal(_unpack_bits(packed, 21), values)


def test_packed_binaryvit_is_a_tenth_of_float32(tmp_path):
    model = timm.create_model('binaryvit_small_patch4_224').eval()
    fp32 = tmp_path / 'fp32.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fp32))
    info = export_packed(model, str(tmp_path / 'packed.safetensors'))
    assert info['float32_bytes'] == fp32.stat().st_size
    assert info['packed_bytes'] * 10 <= fp32.stat().st_size, info
    assert info['ratio'] >= 10
    meta = read_packed_metadata(str(tmp_path / 'packed.safetensors'))
    assert meta['format'] == PACKED_FORMAT and meta['format_version'] == 1
    assert meta['architecture'] == 'binaryvit_small_patch4_224'
    assert meta['model_args']['embed_dims'] == [64, 128, 256, 512]
    assert meta['model_args']['depths'] == [3, 4, 8, 4]
    entry = meta['packed']['stages.0.blocks.0.attn.q.linear.weight']
    assert entry['shape'] == [64, 64] and entry['kind'] == 'linear'
    assert meta['encoding']['bit_1'] == '+1' and meta['encoding']['bit_0'] == '-1'
    assert 'sign(W - mean' in meta['encoding']['binarization']['linear']


# ---------------------------------------------------------------------------------------------
# packed export: errors


@pytest.fixture(scope='module')
def packed_file(tmp_path_factory):
    with torch.no_grad():
        torch.set_num_threads(1)
        model = _make('binary_deit_small_gap_mb_affine_patch16_224', dtype=torch.float32,
                      embed_dim=64, num_heads=1, img_size=64)
    path = tmp_path_factory.mktemp('packed') / 'good.packed'
    export_packed(model, str(path))
    return path


def test_truncated_and_corrupt_files(packed_file, tmp_path):
    data = packed_file.read_bytes()
    for label, content in (('truncated', data[:len(data) // 2]), ('header cut', data[:20]),
                           ('garbage', b'\x13' * 200), ('empty', b'')):
        bad = tmp_path / f'{label}.packed'
        bad.write_bytes(content)
        with pytest.raises(PackedFormatError) as info:
            load_packed(str(bad))
        assert str(bad) in str(info.value), label
    with pytest.raises(FileNotFoundError, match='nowhere.packed'):
        load_packed(str(tmp_path / 'nowhere.packed'))


def test_foreign_and_tampered_files(packed_file, tmp_path):
    # a plain checkpoint is not a packed file
    plain = tmp_path / 'plain.safetensors'
    save_file({'a': torch.zeros(3)}, str(plain))
    with pytest.raises(PackedFormatError, match=f'{plain}.*not a {PACKED_FORMAT} file'):
        load_packed(str(plain))

    tensors = load_file(str(packed_file))
    from safetensors import safe_open
    with safe_open(str(packed_file), framework='pt') as f:
        metadata = f.metadata()

    def write(name, tensors=tensors, **changes):
        path = tmp_path / name
        save_file(tensors, str(path), metadata=dict(metadata, **changes))
        return str(path)

    with pytest.raises(PackedFormatError, match='format version 99 is not supported'):
        load_packed(write('future.packed', format_version='99'))
    with pytest.raises(PackedFormatError, match="'model_args' is not valid JSON"):
        load_packed(write('json.packed', model_args='{oops'))
    key = 'blocks.0.attn.q.linear.weight'
    wrong = dict(tensors, **{f'{key}.bits': tensors[f'{key}.bits'][:, :-1].contiguous()})
    with pytest.raises(PackedFormatError, match=f'{key}.bits.*should be uint8 of shape'):
        load_packed(write('bits.packed', tensors=wrong))
    missing = {k: v for k, v in tensors.items() if k != f'{key}.scale'}
    with pytest.raises(PackedFormatError, match='lacks'):
        load_packed(write('missing.packed', tensors=missing))
    no_norm = {k: v for k, v in tensors.items() if not k.startswith('norm.')}
    with pytest.raises(PackedFormatError, match='do not fit'):
        load_packed(write('nonorm.packed', tensors=no_norm))
    args = json.loads(metadata['model_args'])
    with pytest.raises(PackedFormatError, match='stored as a linear weight of shape .64, 64., but the model has'):
        load_packed(write('args.packed', model_args=json.dumps(dict(args, embed_dim=32))))


def test_export_refuses_deployed_and_foreign_models(tmp_path):
    model = _make('binaryvit_small_patch4_224', dtype=torch.float32)
    with pytest.raises(TypeError, match='training model'):
        export_packed(deploy(model), str(tmp_path / 'x.packed'))
    with pytest.raises(TypeError):
        export_packed(torch.nn.Linear(2, 2), str(tmp_path / 'x.packed'))
