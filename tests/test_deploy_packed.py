"""The packed 1-bit file format (``export_packed`` / ``load_packed``).

Packed files round-trip to bit-identical effective weights and eval logits, as the training model
and as the deployed one (which is built from the file's bits under every kernel mode); exact zeros
survive; broken files fail with the file name and the problem; the packed BinaryViT is at most a
tenth of its float32 checkpoint.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import timm
from timm_binaryvit import kernels
from timm_binaryvit.deploy import (
    PACKED_FORMAT, PackedFormatError, check_rebuilds, deploy, export_packed, format_size_report, load_packed,
    read_packed_metadata)
from timm_binaryvit.deploy.packed import _latent_weight
from timm_binaryvit.deploy.runtime import SignBits, pack_bits, unpack_bits
from timm_binaryvit.folded_eval import unfolded

from deploy_helpers import MODES, binary_effective, images, make, one_thread, rel  # noqa: F401


@pytest.mark.parametrize('name', ['binaryvit_small_patch4_224', 'binaryvit_small_fpembed_patch4_224',
                                  'binary_deit_small_patch16_224', 'binary_deit_small_gap_mb_affine_patch16_224'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_packed_round_trip_is_exact(name, dtype, tmp_path):
    model = make(name, dtype=dtype, slopes='any')
    path = tmp_path / 'model.packed'
    info = export_packed(model, str(path))
    assert info['packed_bytes'] == path.stat().st_size
    assert info['zeros'] == 0 and info['binary_tensors'] == len(binary_effective(model))
    assert 'smaller' in format_size_report(info)

    loaded = load_packed(str(path))
    assert type(loaded) is type(model) and not loaded.training
    assert next(loaded.parameters()).dtype == dtype
    # the training model binarises back to exactly the stored weights
    want, got = binary_effective(model), binary_effective(loaded)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    # and every other tensor is stored as it was
    binary_keys = {f'{k}.weight' for k in want}
    for key, value in model.state_dict().items():
        if key not in binary_keys:
            assert torch.equal(value, loaded.state_dict()[key]), key
    x = images(model, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg['architecture'] == name
    # deployed straight from the file: identical to deploying the original
    assert torch.equal(load_packed(str(path), deployed=True)(x), deploy(model)(x))


@pytest.mark.parametrize('mode', MODES)
def test_deployed_from_file_matches_training_model_in_every_mode(mode, tmp_path):
    model = make('binaryvit_small_patch4_224', slopes='any')
    export_packed(model, str(tmp_path / 'm.packed'))
    x = images(model)
    with torch.no_grad(), unfolded():
        ref = model(x)
    with kernels.kernel_mode(mode):
        assert rel(load_packed(str(tmp_path / 'm.packed'), deployed=True)(x), ref) < 1e-6


def test_loaded_training_model_fine_tunes(tmp_path):
    model = make('binaryvit_small_patch4_224', dtype=torch.float32)
    export_packed(model, str(tmp_path / 'm.packed'))
    loaded = load_packed(str(tmp_path / 'm.packed')).train()
    x = images(model, dtype=torch.float32)
    loss = loaded(x).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in loaded.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # latent weights look like trained ones: close to +-scale around a zero mean
    w = loaded.stages[1].blocks[0].mlp.fc1.linear.weight
    a = w.abs().mean(1, keepdim=True)
    assert torch.allclose(w.abs(), a.expand_as(w), rtol=1e-3)


@pytest.mark.parametrize('mode', ['float', 'int8', 'packed'])
def test_exact_zeros_round_trip(tmp_path, mode):
    model = make('binaryvit_small_patch4_224')
    with torch.no_grad():
        lin = model.stages[0].blocks[0].attn.q.linear
        row = torch.tensor([0.03, -0.03, 0.0, 0.0] * (lin.in_features // 4), dtype=torch.float64)
        lin.weight[3] = row  # mean 0: the centred weight has exact zeros
        lin.weight[5] = row * 2 + 0.25  # mean 0.25: zeros again after centring
        conv = model.stages[1].downsample.conv
        conv.weight[0, :3] = 0.  # sign(0) = 0 in a conv weight
    effective = binary_effective(model)
    assert (effective['stages.0.blocks.0.attn.q.linear'] == 0).sum() == lin.in_features
    path = tmp_path / 'zeros.packed'
    info = export_packed(model, str(path))
    assert info['zeros'] == lin.in_features + 3 * 2 * 2
    stored = load_file(str(path))
    assert stored['stages.0.blocks.0.attn.q.linear.weight.zeros'].numel() == lin.in_features
    loaded = load_packed(str(path))
    for key, value in binary_effective(loaded).items():
        assert torch.equal(value, effective[key]), key
    x = images(model)
    with torch.no_grad(), unfolded():
        ref = model(x)
        assert torch.equal(loaded(x), ref)
    with kernels.kernel_mode(mode):
        from_file = load_packed(str(path), deployed=True)(x)
        assert torch.equal(from_file, deploy(model)(x))
    assert rel(from_file, ref) < 1e-6


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
    packed = pack_bits(values)
    assert packed.shape == (5, 3) and packed.dtype == torch.uint8
    expected = np.packbits((values.numpy() > 0).astype(np.uint8), axis=-1, bitorder='big')
    assert (packed.numpy() == expected).all()
    assert torch.equal(unpack_bits(packed, 21), values)
    values[1, 4] = values[3, 20] = 0
    bits = SignBits.from_signs(values)
    assert bits.zeros.tolist() == [1 * 21 + 4, 3 * 21 + 20]
    assert torch.equal(bits.signs(), values)


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
# errors


@pytest.fixture(scope='module')
def packed_file(tmp_path_factory):
    model = make('binary_deit_small_gap_mb_affine_patch16_224', dtype=torch.float32,
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
        for deployed in (False, True):
            with pytest.raises(PackedFormatError) as info:
                load_packed(str(bad), deployed=deployed)
            assert str(bad) in str(info.value), label
    with pytest.raises(FileNotFoundError, match='nowhere.packed'):
        load_packed(str(tmp_path / 'nowhere.packed'))


@pytest.mark.parametrize('deployed', [False, True])
def test_foreign_and_tampered_files(packed_file, tmp_path, deployed):
    # a plain checkpoint is not a packed file
    plain = tmp_path / 'plain.safetensors'
    save_file({'a': torch.zeros(3)}, str(plain))
    with pytest.raises(PackedFormatError, match=f'{plain}.*not a {PACKED_FORMAT} file'):
        load_packed(str(plain), deployed=deployed)

    tensors = load_file(str(packed_file))
    from safetensors import safe_open
    with safe_open(str(packed_file), framework='pt') as f:
        metadata = f.metadata()

    def load(name, tensors=tensors, **changes):
        path = tmp_path / name
        save_file(tensors, str(path), metadata=dict(metadata, **changes))
        return load_packed(str(path), deployed=deployed)

    with pytest.raises(PackedFormatError, match='format version 99 is not supported'):
        load('future.packed', format_version='99')
    with pytest.raises(PackedFormatError, match="'model_args' is not valid JSON"):
        load('json.packed', model_args='{oops')
    key = 'blocks.0.attn.q.linear.weight'
    wrong = dict(tensors, **{f'{key}.bits': tensors[f'{key}.bits'][:, :-1].contiguous()})
    with pytest.raises(PackedFormatError, match=f'{key}.bits.*should be uint8 of shape'):
        load('bits.packed', tensors=wrong)
    negative = dict(tensors, **{f'{key}.scale': -tensors[f'{key}.scale']})
    with pytest.raises(PackedFormatError, match='negative or non-finite scales'):
        load('scale.packed', tensors=negative)
    outside = dict(tensors, **{f'{key}.zeros': torch.tensor([10 ** 9])})
    with pytest.raises(PackedFormatError, match='indices outside the weight'):
        load('zeros.packed', tensors=outside)
    missing = {k: v for k, v in tensors.items() if k != f'{key}.scale'}
    with pytest.raises(PackedFormatError, match='lacks'):
        load('missing.packed', tensors=missing)
    no_norm = {k: v for k, v in tensors.items() if not k.startswith('norm.')}
    with pytest.raises(PackedFormatError, match='do not fit'):
        load('nonorm.packed', tensors=no_norm)
    args = json.loads(metadata['model_args'])
    with pytest.raises(PackedFormatError, match='stored as a linear weight of shape .64, 64., but the model has'):
        load('args.packed', model_args=json.dumps(dict(args, embed_dim=32)))
    with pytest.raises(PackedFormatError, match='cannot rebuild the model'):
        load('badargs.packed', model_args=json.dumps(dict(args, no_such_argument=1)))


def test_export_refuses_deployed_and_foreign_models(tmp_path):
    model = make('binaryvit_small_patch4_224', dtype=torch.float32)
    with pytest.raises(TypeError, match='training model'):
        export_packed(deploy(model), str(tmp_path / 'x.packed'))
    with pytest.raises(TypeError, match='BinaryViT or BinaryDeiT'):
        export_packed(torch.nn.Linear(2, 2), str(tmp_path / 'x.packed'))


def test_check_rebuilds():
    model = make('binary_deit_small_gap_mb_affine_patch16_224', dtype=torch.float32)
    arch = model.pretrained_cfg['architecture']
    check_rebuilds(model, arch, model.model_args())  # the model's own arguments rebuild it
    check_rebuilds(model, '', model.model_args())  # so does its class, without a registered name
    with pytest.raises(ValueError, match=r'f\.packed: .*does not have the state dict.*entries differ'):
        check_rebuilds(model, arch, dict(model.model_args(), depth=2), 'f.packed')
    with pytest.raises(ValueError, match='do not build'):
        check_rebuilds(model, arch, dict(model.model_args(), embed_dim='wide'))
