"""Representational capability (BinaryViT supplementary, section 3)."""
import functools
from types import SimpleNamespace

import pytest

from timm_binaryvit.capability import (
    CapabilityReport,
    binaryvit_capability,
    deit_capability,
    pool_branch_positions,
    representational_capability,
    resnet_capability,
)

TABLE1 = dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 8, 4), num_heads=(1, 2, 4, 8),
              mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 1, 1))


def _terms_consistent(report):
    running = 0
    for t in report.terms:
        assert t.total == t.factor * running + t.addend
        assert t.value == t.total - running
        running = t.total
    assert running == report.total
    assert sum(t.value for t in report.terms) == report.total


# ----------------------------------------------------------------------------- ResNet
def test_resnet34_matches_supplementary():
    r = representational_capability("resnet34")
    assert r.total == 71_193_472
    assert r.after("stem.conv") == 18_742  # 37,485 / 2 rounded down
    assert r.after("stage1.downsample") == 81_880
    assert r.after("stage2.downsample") == 345_952
    assert r.after("stage3.downsample") == 1_439_104
    assert r.paper_printed == 71_193_472
    _terms_consistent(r)


def test_resnet18_same_rules():
    # independent hand computation with the supplementary's rules, blocks (2, 2, 2, 2)
    v = 7 * 7 * 3 * 255 // 2          # 18,742
    v = (v + 2 * 3 * 3 * 64) * 4      # 79,576
    v = (v + 2 * 3 * 3 * 128) * 4     # 327,520
    v = (v + 2 * 3 * 3 * 256) * 4     # 1,328,512
    v = (v + 2 * 3 * 3 * 512) * 7 * 7
    assert v == 65_548_672
    r = representational_capability("resnet18")
    assert r.total == v
    assert r.after("stage1.downsample") == 79_576
    assert r.paper_printed is None
    _terms_consistent(r)
    assert resnet_capability(layers=(2, 2, 2, 2)).total == v


# ----------------------------------------------------------------------------- DeiT
def test_deit_small_follows_rules_and_reports_paper_slip():
    r = representational_capability("deit_small")
    assert r.total == (384 * 4 + 196 + 4 * 384 * 2) * 12 + 97_920 == 155_568
    assert r.after("stem.conv") == 97_920
    assert r.paper_printed == 153_216
    assert "153,216" in r.note and "155,568" in r.note
    text = str(r)
    assert text == r.format()
    assert "155,568" in text and "153,216" in text
    for t in r.terms:
        assert t.name in text
    _terms_consistent(r)


def test_deit_small_paper_printed_variant():
    r = representational_capability("deit_small", include_attention=False)
    assert r.total == 4_608 * 12 + 97_920 == 153_216
    assert not any(t.name.endswith("attn.product") for t in r.terms)
    assert "153,216" in r.note


@pytest.mark.parametrize("kwargs, n", [(dict(num_patches=256), 256), (dict(img_size=256), 256),
                                       (dict(img_size=(224, 320)), 14 * 20), (dict(num_patches=49), 49)])
def test_deit_sequence_length_changes_by_depth_times_delta(kwargs, n):
    base = representational_capability("deit_small").total
    other = representational_capability("deit_small", **kwargs)
    assert other.total - base == 12 * (n - 196)
    assert other.paper_printed is None
    depth8 = deit_capability(depth=8, **kwargs).total - deit_capability(depth=8).total
    assert depth8 == 8 * (n - 196)


def test_deit_pooling_variants():
    # global average pooling multiplies by the number of positions; a class token does not
    assert representational_capability("deit_small", global_pool="avg").total == 155_568 * 196
    # multi-branch pooling: each block's value is multiplied by 9 before the FFN terms
    v = 97_920
    for _ in range(12):
        v = (v + 384 * 4 + 196) * 9 + 4 * 384 * 2
    r = representational_capability("deit_small", global_pool="avg", multi_branch_pool=True)
    assert r.total == v * 196
    _terms_consistent(r)


def test_pool_branch_positions():
    assert pool_branch_positions() == 9          # plus-shaped 5x1 + 1x5 neighbourhood
    assert pool_branch_positions(((3, 3),)) == 9
    assert pool_branch_positions(((2, 2),)) == 4


# ----------------------------------------------------------------------------- BinaryViT
def _binaryvit_by_hand(fp_transitions=False):
    dims, depths, ratios, srs = TABLE1["embed_dims"], TABLE1["depths"], TABLE1["mlp_ratios"], TABLE1["sr_ratios"]
    v = 4 * 4 * 3 * 255 // 2  # 6,120
    side = 56
    for s, c in enumerate(dims):
        if s:
            side //= 2
            v = v * 4 * dims[s - 1] if fp_transitions else v * 4 + 4 * dims[s - 1]
        r = srs[s]
        for _ in range(depths[s]):
            if r > 1:
                v = v * r * r + 5 * c + (side // r) ** 2
            else:
                v = v + 4 * c + side * side
            v = v * 9 + 2 * ratios[s] * c
    return v * side * side


def test_binaryvit_total():
    r = representational_capability("binaryvit")
    assert isinstance(r, CapabilityReport)
    assert r.total > 0
    assert r.total == _binaryvit_by_hand()
    assert r.after("stem.conv") == 6_120
    assert r.paper_printed is None and r.note
    _terms_consistent(r)
    # BinaryViT's additions each raise it over the plain binary DeiT-S
    assert r.total > representational_capability("deit_small", global_pool="avg", multi_branch_pool=True).total
    assert binaryvit_capability(multi_branch_pool=False).total < r.total
    fp = binaryvit_capability(fp_transitions=True)
    assert fp.total == _binaryvit_by_hand(fp_transitions=True) > r.total
    _terms_consistent(fp)
    text = r.format()
    assert "stages.1.downsample" in text and "attn.kv_pool" in text


def test_binaryvit_without_attention_terms():
    r = binaryvit_capability(include_attention=False)
    assert not any(t.name.endswith("attn.product") for t in r.terms)
    assert 0 < r.total < binaryvit_capability().total
    _terms_consistent(r)


# ----------------------------------------------------------------------------- model instances
def test_pyramid_instance_by_attributes():
    model = SimpleNamespace(**TABLE1, patch_size=4, img_size=(224, 224), in_chans=3, fp_transitions=False,
                            global_pool="avg")
    r = representational_capability(model)
    assert r.total == representational_capability("binaryvit").total
    model.fp_transitions = True
    assert representational_capability(model).total == _binaryvit_by_hand(fp_transitions=True)
    model.global_pool = ""  # classifier reset without pooling: no multiplication
    assert representational_capability(model).total * 49 == _binaryvit_by_hand(fp_transitions=True)


def test_deit_instance_by_attributes():
    model = SimpleNamespace(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=16, img_size=224,
                            in_chans=3, num_prefix_tokens=1, global_pool="token", multi_branch_pool=False,
                            affine=False)
    r = representational_capability(model)
    assert r.total == 155_568 and r.paper_printed == 153_216
    assert representational_capability(model, include_attention=False).total == 153_216
    model.global_pool, model.num_prefix_tokens, model.affine = "avg", 0, True
    assert representational_capability(model).total == 155_568 * 196  # the affine changes nothing
    model.img_size = (256, 256)
    assert representational_capability(model).total == (155_568 + 12 * 60) * 256


def test_bad_inputs():
    with pytest.raises(ValueError):
        representational_capability("no_such_model")
    with pytest.raises(TypeError):
        representational_capability(object())
    with pytest.raises(ValueError):
        representational_capability("deit_small", global_pool="weird")


# ----------------------------------------------------------------------------- real models (when registered)
def _require_model(name):
    timm = pytest.importorskip("timm")
    import timm_binaryvit  # noqa: F401  (registers the models once they exist)
    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered by timm_binaryvit yet")
    return _create(name)


@functools.lru_cache(maxsize=None)
def _create(name):
    import timm
    return timm.create_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name, fp", [("binaryvit_small_patch4_224", False),
                                      ("binaryvit_small_fpembed_patch4_224", True)])
def test_real_binaryvit_model(name, fp):
    model = _require_model(name)
    r = representational_capability(model)
    assert r.total > 0
    _terms_consistent(r)
    assert bool(model.fp_transitions) is fp
    assert r.total == _binaryvit_by_hand(fp_transitions=fp)


# Table 3 rows of the paper: baseline, + average pooling, + multi-branch pooling, + affine
DEIT_ROWS = [
    ("binary_deit_small_patch16_224", 155_568),
    ("binary_deit_small_gap_patch16_224", 155_568 * 196),
    ("binary_deit_small_gap_mb_patch16_224", 5_549_596_352_787_587_520),
    ("binary_deit_small_gap_mb_affine_patch16_224", 5_549_596_352_787_587_520),  # the affine changes nothing
]


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", DEIT_ROWS)
def test_real_binary_deit_model(name, expected):
    model = _require_model(name)
    r = representational_capability(model)
    _terms_consistent(r)
    assert r.total == expected
    assert r.total == representational_capability("deit_small", global_pool=model.global_pool,
                                                  multi_branch_pool=bool(model.multi_branch_pool)).total
    if name == "binary_deit_small_patch16_224":
        assert r.paper_printed == 153_216
        assert representational_capability(model, include_attention=False).total == 153_216


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [("binaryvit_small_patch4_224", None),
                                            ("binary_deit_small_patch16_224", 155_568)])
def test_timm_model_name(name, expected):
    _require_model(name)  # skips while the model is not registered
    r = representational_capability(name)  # builds the model from its timm name
    assert r.total == (expected if expected is not None else _binaryvit_by_hand())
