"""The ``README.md`` model card of a Hub repo folder: Hub metadata, the paper, the architecture, its
configuration and the weights' source.

:func:`timm_binaryvit.hub.save_pretrained` writes it beside ``config.json`` and the weights.
"""
import json
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .hub import _synthetic_pretrained_cfg, architecture_name, constructor_args, model_family

__all__ = ['PAPER_TITLE', 'PAPER_AUTHORS', 'PAPER_VENUE', 'PAPER_ARXIV', 'write_model_card']

PAPER_TITLE = 'BinaryViT: Pushing Binary Vision Transformers Towards Convolutional Models'
PAPER_AUTHORS = 'Phuoc-Hoan Charles Le and Xinlin Li'
PAPER_VENUE = 'CVPR 2023 Workshops'
PAPER_ARXIV = '2306.16678'


def _describe(model: nn.Module) -> str:
    if model_family(model) == 'pyramid':
        transitions = ('full-precision stage transitions (the paper\'s "FP patch embedding" variant)'
                       if model.fp_transitions else 'binary stage transitions')
        return (f'BinaryViT: a {len(model.depths)}-stage pyramid of binary transformer layers on a '
                f'{model.patch_size}x{model.patch_size} full-precision patchify stem, with {transitions}, '
                f'multi-branch pooling, affine transformations before the residual additions and global average '
                f'pooling (supplementary Table 1).')
    rows = {
        (True, False, False): 'Table 3 row 1: the ReActNet recipe applied to DeiT-S, with a class token',
        (False, False, False): 'Table 3 row 2: global average pooling instead of the class token',
        (False, True, False): 'Table 3 row 3: global average pooling and multi-branch pooling',
        (False, True, True): 'Table 3 row 4: global average pooling, multi-branch pooling and affine '
                             'transformations before the main residual additions',
    }
    key = (bool(model.num_prefix_tokens), bool(model.multi_branch_pool), bool(model.affine))
    row = rows.get(key, 'a custom combination of the Table 3 changes')
    return (f'Fully-binary DeiT ({row}): a full-precision {model.patch_size}x{model.patch_size} patch stem, '
            f'binary transformer layers and token BatchNorms in place of LayerNorm.')


def _binary_sentence(model: nn.Module) -> str:
    parts = 'queries, keys, values, the output projection and both FFN layers'
    if model_family(model) == 'pyramid':
        if any(r > 1 for r in model.sr_ratios):
            parts = 'queries, keys, values, the key/value reduction, the output projection and both FFN layers'
        if not model.fp_transitions:
            parts += ', and the stage transitions'
    return (f'Binary: every transformer linear layer ({parts}) and the attention products multiply signs; '
            f'the stem, the classifier, the norms, RPReLUs, shifts, affines, pooling branches and position '
            f'embeddings stay full precision.')


def write_model_card(
        model: nn.Module,
        save_dir: Union[str, Path],
        *,
        source: Optional[str] = None,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
        title: Optional[str] = None,
        description: Optional[str] = None,
) -> Path:
    """Write ``README.md``: Hub metadata, the paper, the architecture, its configuration and the weights' source.

    Args:
        source: where the weights come from (default: says they were saved with timm_binaryvit and
            have no stated provenance).
        repo_id: the Hub repo, for the usage snippet (default: ``ORG/REPO``).
        license: the card's license (default: the architecture's, ``apache-2.0``).
    """
    save_dir = Path(save_dir)
    arch = architecture_name(model)
    args = constructor_args(model)
    cfg = getattr(model, 'pretrained_cfg', None) or _synthetic_pretrained_cfg(model, arch)
    license = license or cfg.get('license') or 'apache-2.0'
    num_params = sum(p.numel() for p in model.parameters())
    height, width = model.img_size
    source = source or ('not stated: saved with timm_binaryvit.hub.save_pretrained. No ImageNet weights have been '
                        'published for these models; say here how they were trained.')
    repo = repo_id or 'ORG/REPO'
    name = title or (repo_id.split('/')[-1] if repo_id else arch)
    config_rows = '\n'.join(f'| `{k}` | `{json.dumps(v)}` |' for k, v in args.items())
    text = f"""---
tags:
- image-classification
- timm
- timm-binaryvit
- binary-neural-network
- vision-transformer
library_name: timm
license: {license}
pipeline_tag: image-classification
---
# {name}

{description or _describe(model)}

From **{PAPER_TITLE}**, {PAPER_AUTHORS}, {PAPER_VENUE}
([arXiv:{PAPER_ARXIV}](https://arxiv.org/abs/{PAPER_ARXIV})). Implementation: the
[timm-binaryvit](https://pypi.org/project/timm-binaryvit/) plugin for
[timm](https://github.com/huggingface/pytorch-image-models).

## Model details

- **Architecture:** `{arch}` (`timm_binaryvit.{type(model).__name__}`)
- **Parameters:** {num_params:,} ({num_params / 1e6:.2f} M)
- **Classes:** {model.num_classes}
- **Input:** {model.in_chans} x {height} x {width} (fixed size)
- **Weights:** {source}

{_binary_sentence(model)}

### Configuration (`model_args` in `config.json`)

| argument | value |
|---|---|
{config_rows}

## Usage

```python
import timm
import timm_binaryvit  # registers the models with timm (pip install timm-binaryvit)

model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()
# or, from a downloaded folder: timm.create_model('local-dir:/path/to/folder', pretrained=True)
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
```

`timm_binaryvit.hub.load_model('hf-hub:{repo}')` does the same and names the file at fault if loading fails.

## Citation

```bibtex
@inproceedings{{le2023binaryvit,
  title={{{PAPER_TITLE}}},
  author={{Le, Phuoc-Hoan Charles and Li, Xinlin}},
  booktitle={{Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR) Workshops}},
  year={{2023}},
  eprint={{{PAPER_ARXIV}}},
  archivePrefix={{arXiv}}
}}
```
"""
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / 'README.md'
    path.write_text(text, encoding='utf-8')
    return path
