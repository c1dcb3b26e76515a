"""Shared pieces of the deploy tests (test_deploy*.py): small perturbed models, images, comparisons.

Models are reduced in size, with every parameter and running statistic perturbed away from its
initial value (so that a wrong fold cannot hide behind zero shifts or unit BatchNorms), and with
the binarised attention probabilities mixed.
"""
import json

import pytest
import torch

import timm
from timm_binaryvit import checkpoint_filter_fn
from timm_binaryvit.layers import BinaryConv2d, BinaryLinear, ElasticBinarizer
from safetensors.torch import load_file

from conftest import AUTHORS_VARIANTS, REFERENCE_DIR, reference_model_kwargs, require_reference

#: float64 logits of the deployed and the training model agree to this (relative to the largest)
RTOL = 1e-6
#: the kernel modes every exactness test runs under (each kind forced, and the measured choice)
MODES = ['auto', 'float', 'int8', 'bf16', 'packed']

PYRAMID_SMALL = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), img_size=128, num_classes=10)
DEIT_SMALL = dict(depth=1, img_size=128, num_classes=10)

MODELS = sorted(n for n in timm.list_models('binary*')
                if getattr(timm.models.model_entrypoint(n), '__module__', '').startswith('timm_binaryvit'))


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One thread for the module (on a loaded 2-core machine every small op with 2 OpenMP threads waits
    for a scheduler slice), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def is_pyramid(name):
    return name.startswith('binaryvit')


def small_kwargs(name, **extra):
    return dict(PYRAMID_SMALL if is_pyramid(name) else DEIT_SMALL, **extra)


def _key_lengths(model):
    """Number of keys each attention layer's binariser sees (to put its threshold mid-distribution)."""
    lengths = {}
    if hasattr(model, 'stages'):
        for stage, grid in zip(model.stages, model._grids):
            for blk in stage.blocks:
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


def make(name, dtype=torch.float64, seed=0, slopes='below_one', **extra):
    model = timm.create_model(name, **small_kwargs(name, **extra))
    return perturb(model.to(dtype), seed=seed, slopes=slopes).eval()


def images(model, batch=2, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.in_chans, *model.img_size, generator=g, dtype=torch.float64).to(dtype)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def binary_effective(model):
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (BinaryLinear, BinaryConv2d)):
                out[name] = m.binary_weight()
    return out


TAGS = sorted(json.loads((REFERENCE_DIR / 'manifest.json').read_text())) \
    if (REFERENCE_DIR / 'manifest.json').is_file() else ['(reference data absent)']


def reference_model(tag):
    """(float64 training model in eval mode, input, the authors' logits) of a reference checkpoint."""
    reference = require_reference()
    info = json.loads((reference / 'manifest.json').read_text())[tag]
    model = timm.create_model(AUTHORS_VARIANTS[info['official_variant']], **reference_model_kwargs(info)).double()
    state_dict = load_file(str(reference / f'{tag}.official.safetensors'))
    state_dict = {k: v.double() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    io = load_file(str(reference / f'{tag}.io.safetensors'))
    return model.eval(), io['input'].double(), io['logits'].double()
