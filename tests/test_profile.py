"""Tests of timm_binaryvit.profile: BOPs / FLOPs / OPs, parameters and deployed size.

Counts are checked three ways: against the reference figures of the authors' implementation
(within 2%), against an analytic count written out here from the architecture (exact, for
several configurations and input sizes), and against an independent counter,
``torch.utils.flop_counter.FlopCounterMode`` (exact; it reports 2 FLOPs per multiply-accumulate).
"""
import functools
import re

import pytest
import torch
import timm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import timm_binaryvit  # noqa: F401  registers the models
from timm_binaryvit.layers import BinaryConv2d, BinaryLinear
from timm_binaryvit.profile import (
    BINARY, FULL_PRECISION, ProfileResult, models_markdown_table, profile, profile_summary)

# OPs (= BOPs / 64 + FLOPs) of the authors' implementation, counted the same way.
REFERENCE_OPS = {
    'binaryvit_small_patch4_224': 0.70e8,
    'binaryvit_small_fpembed_patch4_224': 1.46e8,
    'binary_deit_small_patch16_224': 1.29e8,
    'binary_deit_small_gap_patch16_224': 1.29e8,
    'binary_deit_small_gap_mb_patch16_224': 1.29e8,
    'binary_deit_small_gap_mb_affine_patch16_224': 1.29e8,
}

# Parameter counts of the authors' code at 1000 classes (docs/architecture.md).
AUTHORS_PARAMS = {
    'binary_deit_small_patch16_224': 22_294_900,
    'binary_deit_small_gap_patch16_224': 22_294_132,
    'binary_deit_small_gap_mb_patch16_224': 22_330_996,
    'binary_deit_small_gap_mb_affine_patch16_224': 22_349_428,
    'binaryvit_small_patch4_224': 22_491_771,
    'binaryvit_small_fpembed_patch4_224': 22_488_635,
}


@pytest.fixture
def one_thread():
    """Real (non-meta) passes here are tiny; on a busy machine OpenMP threads waiting on each
    other cost far more than the work, so run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _profile_registered(name: str) -> ProfileResult:
    return profile(name)


# ---------------------------------------------------------------------------------------------
# Analytic counts, written from the computation in docs/architecture.md (batch 1): (BOPs, FLOPs)


def binaryvit_macs(img_size=(224, 224), in_chans=3, patch_size=4, embed_dims=(64, 128, 256, 512),
                   depths=(3, 4, 8, 4), num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 1, 1),
                   fp_transitions=False, num_classes=1000):
    bops = 0
    h, w = img_size[0] // patch_size, img_size[1] // patch_size
    flops = h * w * embed_dims[0] * in_chans * patch_size ** 2  # stem
    for i, (c, depth, e, r) in enumerate(zip(embed_dims, depths, mlp_ratios, sr_ratios)):
        if i:
            h, w = h // 2, w // 2
            transition = h * w * c * embed_dims[i - 1] * 4  # 2x2 stride-2 conv
            if fp_transitions:
                flops += transition
            else:
                bops += transition
        n = h * w
        nk = (h // r) * (w // r)
        per_layer = 2 * n * c * c  # q, proj
        per_layer += (3 if r > 1 else 2) * nk * c * c  # (kv_reduce), k, v
        per_layer += 2 * n * c * e * c  # fc1, fc2
        per_layer += 2 * n * nk * c  # sign(Q) sign(K)^T and P_b sign(V), all heads
        bops += depth * per_layer
    flops += embed_dims[-1] * num_classes
    return bops, flops


def binary_deit_macs(img_size=(224, 224), in_chans=3, patch_size=16, embed_dim=384, depth=12, mlp_ratio=4,
                     class_token=True, num_classes=1000):
    grid = (img_size[0] // patch_size) * (img_size[1] // patch_size)
    n = grid + (1 if class_token else 0)
    c = embed_dim
    flops = grid * c * in_chans * patch_size ** 2 + c * num_classes
    bops = depth * (4 * n * c * c + 2 * n * c * mlp_ratio * c + 2 * n * n * c)
    return bops, flops


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Registered models


@pytest.mark.parametrize('name', sorted(REFERENCE_OPS))
def test_reference_figures(name):
    r = _profile_registered(name)
    assert r.ops == pytest.approx(REFERENCE_OPS[name], rel=0.02)
    assert r.ops == r.bops / 64 + r.flops
    assert r.params == AUTHORS_PARAMS[name]
    assert r.size_bits == r.params_binary + 32 * r.params_fp


def test_registered_models_match_the_analytic_count():
    cases = {
        'binaryvit_small_patch4_224': binaryvit_macs(),
        'binaryvit_small_fpembed_patch4_224': binaryvit_macs(fp_transitions=True),
        'binary_deit_small_patch16_224': binary_deit_macs(),
        'binary_deit_small_gap_mb_affine_patch16_224': binary_deit_macs(class_token=False),
    }
    for name, (bops, flops) in cases.items():
        r = _profile_registered(name)
        assert (r.bops, r.flops) == (bops, flops), name


def test_every_registered_model_profiles():
    names = timm.list_models('binary*')
    assert names
    for name in names:
        r = profile(name) if name not in REFERENCE_OPS else _profile_registered(name)
        assert r.bops > 0 and r.flops > 0 and r.params_binary > 0 and r.params_fp > 0
        assert r.input_size == (3, 224, 224)
        assert r.device == 'meta'


def test_rows_add_up_and_every_parameter_is_counted_once():
    model = timm.create_model('binaryvit_small_patch4_224', device='meta')
    r = profile(model)
    assert r.params == _n_params(model)
    assert sum(x.bops for x in r.layers) == r.bops
    assert sum(x.flops for x in r.layers) == r.flops
    names = [x.name for x in r.layers]
    assert len(names) == len(set(names))
    # binary parameters are exactly the weights of the binary layers
    binary_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (BinaryLinear, BinaryConv2d)))
    assert r.params_binary == binary_weights
    assert r.params_fp == _n_params(model) - binary_weights
    # BatchNorm running statistics are buffers: reported, not part of the size
    assert r.buffers == sum(b.numel() for b in model.buffers())
    assert r.size_mb == pytest.approx((r.params_binary + 32 * r.params_fp) / 8e6)


def test_layer_kinds_and_types():
    r = _profile_registered('binaryvit_small_fpembed_patch4_224')
    rows = {x.name: x for x in r.layers}
    stem, head, fp_conv = rows['patch_embed.proj'], rows['head'], rows['stages.1.downsample.conv']
    for row in (stem, head, fp_conv):
        assert row.type == FULL_PRECISION and row.bops == 0 and row.flops > 0 and row.params_binary == 0
    assert stem.output_shape == (1, 64, 56, 56) and stem.flops == 56 * 56 * 64 * 48
    assert head.output_shape == (1, 1000) and head.flops == 512 * 1000
    assert fp_conv.kind == 'Conv2d' and fp_conv.flops == 28 * 28 * 128 * 64 * 4
    q = rows['stages.0.blocks.0.attn.q.linear']
    assert (q.kind, q.type, q.output_shape) == ('BinaryLinear', BINARY, (1, 3136, 64))
    assert (q.bops, q.flops, q.params_binary, q.params_fp) == (3136 * 64 * 64, 0, 64 * 64, 64)
    # attention products of stage 1: 3136 queries, 7x7 = 49 pooled keys, one head of 64 channels
    qk, pv = rows['stages.0.blocks.0.attn.qk'], rows['stages.0.blocks.0.attn.pv']
    assert (qk.kind, qk.type, qk.bops, qk.output_shape) == ('attn QK^T', BINARY, 3136 * 49 * 64, (1, 3136, 49))
    assert (pv.kind, pv.type, pv.bops, pv.output_shape) == ('attn PV', BINARY, 3136 * 49 * 64, (1, 3136, 64))
    # position embeddings have rows of their own; the final norm is one row (TokenBatchNorm)
    assert rows['stages.0.pos_embed'].params_fp == 3136 * 64
    assert rows['norm'].kind == 'TokenBatchNorm' and rows['norm'].params_fp == 2 * 512
    # rows follow the forward pass
    names = [x.name for x in r.layers]
    assert names[0] == 'patch_embed.proj' and names[-1] == 'head'
    assert names.index('stages.0.blocks.0.attn.q.linear') < names.index('stages.0.blocks.0.attn.qk') \
        < names.index('stages.0.blocks.0.attn.pv') < names.index('stages.0.blocks.0.attn.proj.linear')


# ---------------------------------------------------------------------------------------------
# Any configuration and input size


@pytest.mark.parametrize('kwargs', [
    dict(img_size=64, embed_dims=(8, 16, 16, 32), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
         mlp_ratios=(2, 2, 4, 4), sr_ratios=(2, 1, 1, 1), num_classes=10),
    dict(img_size=(64, 96), embed_dims=(8, 16, 32, 32), depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4),
         mlp_ratios=(3, 2, 2, 1), sr_ratios=(2, 2, 1, 1), fp_transitions=True, num_classes=0),
    dict(img_size=256),  # the default BinaryViT at another input size
])
def test_binaryvit_any_configuration(kwargs):
    model = timm.create_model('binaryvit_small_patch4_224', device='meta', **kwargs)
    img = kwargs.get('img_size', 224)
    img = (img, img) if isinstance(img, int) else img
    analytic = dict(kwargs, img_size=img)
    analytic.pop('depths', None)
    expected = binaryvit_macs(depths=kwargs.get('depths', (3, 4, 8, 4)), **{
        k: v for k, v in analytic.items() if k != 'depths'})
    r = profile(model)
    assert r.input_size == (3,) + img
    assert (r.bops, r.flops) == expected
    assert r.params == _n_params(model)


@pytest.mark.parametrize('kwargs', [
    dict(img_size=96, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2, num_classes=7),
    dict(img_size=(64, 80), embed_dim=32, depth=3, num_heads=4, mlp_ratio=4, class_token=False,
         global_pool='avg', multi_branch_pool=True, affine=True, num_classes=5),
])
def test_binary_deit_any_configuration(kwargs):
    model = timm.create_model('binary_deit_small_patch16_224', device='meta', **kwargs)
    img = kwargs['img_size']
    img = (img, img) if isinstance(img, int) else img
    expected = binary_deit_macs(img_size=img, embed_dim=kwargs['embed_dim'], depth=kwargs['depth'],
                                mlp_ratio=kwargs['mlp_ratio'], class_token=kwargs.get('class_token', True),
                                num_classes=kwargs['num_classes'])
    r = profile(model)
    assert (r.bops, r.flops) == expected
    qk = [x for x in r.layers if x.kind == 'attn QK^T']
    n = (img[0] // 16) * (img[1] // 16) + kwargs.get('class_token', True)
    assert len(qk) == kwargs['depth']
    assert all(x.bops == n * n * kwargs['embed_dim'] for x in qk)
    assert r.params == _n_params(model)


# ---------------------------------------------------------------------------------------------
# Hand counts of single binary layers


@pytest.mark.parametrize('device', ['meta', None])
def test_binary_linear_hand_count(device, one_thread):
    tokens, d_in, d_out = 7, 48, 40
    r = profile(BinaryLinear(d_in, d_out), input_size=(tokens, d_in), device=device)
    assert r.bops == tokens * d_in * d_out
    assert r.flops == 0
    assert r.ops == tokens * d_in * d_out / 64
    (row,) = r.layers
    assert (row.kind, row.type, row.output_shape) == ('BinaryLinear', BINARY, (1, tokens, d_out))
    assert (row.params_binary, row.params_fp) == (d_in * d_out, d_in)  # weight 1 bit, shift fp32
    assert r.size_bits == d_in * d_out + 32 * d_in


def test_binary_conv_hand_count():
    r = profile(BinaryConv2d(8, 16, 2, stride=2), input_size=(8, 10, 10))
    assert r.bops == 5 * 5 * 16 * 8 * 2 * 2
    assert r.flops == 0
    assert (r.params_binary, r.params_fp) == (16 * 8 * 2 * 2, 8)


# ---------------------------------------------------------------------------------------------
# Against an independent counter


def _flop_counter_macs(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2, {k: sum(v.values()) // 2 for k, v in counter.get_flop_counts().items()}


def _unfused_attention(model):
    """FlopCounterMode does not know every fused attention kernel: let it see the plain products."""
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model


def test_full_precision_model_against_flop_counter():
    # DeiT-S, about 4.6 G MACs; built on meta (no weights), counted on meta by both counters
    model = timm.create_model('deit_small_patch16_224', device='meta').eval()
    r = profile(model)
    assert r.bops == 0 and r.params_binary == 0
    assert r.params_fp == _n_params(model)
    assert r.flops == pytest.approx(4.6e9, rel=0.02)
    total, per_module = _flop_counter_macs(_unfused_attention(model), torch.empty(1, 3, 224, 224, device='meta'))
    assert r.flops == total
    rows = {row.name: row for row in r.layers}
    for name in ('patch_embed.proj', 'blocks.0.attn.qkv', 'blocks.11.mlp.fc2', 'head'):
        assert rows[name].flops == per_module[f'VisionTransformer.{name}'], name


def test_full_precision_model_on_its_own_device(one_thread):
    # a real pass on the CPU runs the fused attention kernel, which the profile counts too
    torch.manual_seed(0)
    model = timm.create_model('deit_small_patch16_224', img_size=64, depth=2).eval()
    real, meta = profile(model, device=None), profile(model)
    assert real.device == 'cpu'
    assert any(row.kind == 'sdpa' for row in real.layers)
    assert real.flops == meta.flops
    total, _ = _flop_counter_macs(_unfused_attention(model), torch.randn(1, 3, 64, 64))
    per_block = 17 * 384 * 384 * 4 + 17 * 384 * 1536 * 2 + 2 * 17 * 17 * 384  # 16 patches + class token
    assert real.flops == total == 16 * 384 * 768 + 2 * per_block + 384 * 1000


def test_binary_model_against_flop_counter(one_thread):
    torch.manual_seed(0)
    model = timm.create_model(
        'binaryvit_small_fpembed_patch4_224', img_size=64, embed_dims=(8, 16, 16, 32), num_heads=(1, 2, 2, 4),
        sr_ratios=(2, 1, 1, 1), num_classes=10).eval()
    total, per_module = _flop_counter_macs(model, torch.randn(1, 3, 64, 64))
    r = profile(model)
    assert r.bops + r.flops == total
    # the full-precision part: stem, full-precision transitions, classifier
    fp_layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(fp_layers) == 5
    assert r.flops == sum(per_module[f'BinaryViT.{n}'] for n in fp_layers)
    rows = {row.name: row for row in r.layers}
    for n in fp_layers:
        assert rows[n].flops == per_module[f'BinaryViT.{n}']
    # the binary part, stage by stage, attention products included
    for i in range(4):
        stage = sum(row.bops for row in r.layers if row.name.startswith(f'stages.{i}.'))
        assert stage == per_module[f'BinaryViT.stages.{i}'] - (per_module.get(f'BinaryViT.stages.{i}.downsample', 0))


# ---------------------------------------------------------------------------------------------
# Devices, fallbacks, leaving the model as it was


def test_meta_and_real_pass_agree(one_thread):
    model = timm.create_model('binary_deit_small_patch16_224', img_size=64, embed_dim=32, depth=2, num_heads=2,
                              num_classes=3)
    meta, real = profile(model), profile(model, device=None)
    assert (meta.device, real.device) == ('meta', 'cpu')
    key = lambda r: [(x.name, x.kind, x.type, x.output_shape, x.bops, x.flops, x.params_binary, x.params_fp)
                     for x in r.layers]
    assert key(meta) == key(real)


def test_model_is_left_as_it_was(one_thread):
    model = timm.create_model('binaryvit_small_patch4_224', img_size=64, embed_dims=(8, 16, 16, 32),
                              num_heads=(1, 2, 2, 4), sr_ratios=(2, 1, 1, 1), num_classes=10)
    model.train()
    model.head.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile(model)
    profile(model, device=None)
    assert model.training and not model.head.training
    assert all(m.training for n, m in model.named_modules() if not n.startswith('head'))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.device.type == 'cpu' for v in after.values())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _ReadsValues(nn.Module):
    """A forward that reads a tensor value, which the meta device cannot do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x) if x.abs().sum() >= 0 else x


def test_falls_back_to_the_model_device(one_thread):
    r = profile(_ReadsValues(), input_size=(5, 6))
    assert r.device == 'cpu'
    assert r.flops == 5 * 6 * 4 and r.params_fp == 6 * 4 + 4


def test_wrong_input_size_is_reported():
    with pytest.raises(ValueError, match='expects input'):
        profile(timm.create_model('binary_deit_small_patch16_224', device='meta'), input_size=(3, 256, 256))


# ---------------------------------------------------------------------------------------------
# Output


def test_table_and_summary():
    r = _profile_registered('binaryvit_small_patch4_224')
    text = str(r)
    assert text == r.format()
    assert 'binaryvit_small_patch4_224' in text and 'OPs    0.70e8' in text
    assert 'stages.3.blocks.3.attn.pv' in text and 'head' in text
    assert 'stages.0.blocks.0.norm1' not in text  # rows without MACs are summed into one line
    assert 'stages.0.blocks.0.norm1' in r.format(all_layers=True)
    grouped = r.format(depth=2)
    assert 'stages.2 ' in grouped and 'stages.2.blocks' not in grouped
    assert sum(g.bops for g in r.grouped(2)) == r.bops
    assert sum(g.params for g in r.grouped(1)) == r.params
    line = r.summary()
    assert '\n' not in line
    assert re.fullmatch(r'22\.49M params \(\d+\.\d% binary\), OPs 0\.70e8, \d+\.\d\d MB', line), line
    assert profile_summary('binaryvit_small_patch4_224') == line
    d = r.as_dict()
    assert d['ops'] == r.ops and len(d['layers']) == len(r.layers)


def test_markdown_table():
    table = models_markdown_table(['binaryvit_small_patch4_224'])
    lines = table.splitlines()
    assert lines[0].startswith('| model |') and len(lines) == 3
    r = _profile_registered('binaryvit_small_patch4_224')
    assert f'{r.ops / 1e8:.3f}' in lines[2] and f'{r.size_mb:.2f}' in lines[2]
