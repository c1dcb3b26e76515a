"""Hugging Face Hub repositories (and local folders laid out the same way) for this package's models.

A repo folder holds what timm's ``save_for_hf`` writes: ``config.json`` (``architecture``,
``num_classes``, ``model_args``, ``pretrained_cfg``) and ``model.safetensors``; we add a
``README.md`` model card. It loads back with::

    timm.create_model('hf-hub:ORG/REPO', pretrained=True)      # from the Hub (or its cache)
    timm.create_model('local-dir:/path/to/folder', pretrained=True)

Models made with ``timm.create_model`` record the arguments they were created with, so plain
``timm.models.save_for_hf`` / ``push_to_hf_hub`` already round-trip them. :func:`save_pretrained`
records the *complete* constructor arguments read from the model itself, which also works for
models built directly from the classes (``BinaryViT(...)``), and checks that the recorded
configuration rebuilds exactly the saved state dict.

:func:`load_model` loads like ``timm.create_model`` but reports failures as :class:`LoadError`,
whose message names the source, the file and what is wrong with it (not cached while offline,
an unknown architecture in ``config.json``, a truncated ``model.safetensors``, weights of another
model ...).

:func:`convert_checkpoint` turns a checkpoint trained with the authors' code into such a folder.
"""
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

import timm
from timm.models import get_pretrained_cfg, is_model, model_entrypoint

__all__ = [
    'AUTHORS_VARIANTS', 'PAPER_TITLE', 'PAPER_AUTHORS', 'PAPER_VENUE', 'PAPER_ARXIV', 'LoadError',
    'registered_models', 'resolve_model_name', 'model_family', 'constructor_args', 'architecture_name',
    'save_pretrained', 'push_to_hub', 'write_model_card', 'load_model', 'load_checkpoint_file', 'convert_checkpoint',
]

PAPER_TITLE = 'BinaryViT: Pushing Binary Vision Transformers Towards Convolutional Models'
PAPER_AUTHORS = 'Phuoc-Hoan Charles Le and Xinlin Li'
PAPER_VENUE = 'CVPR 2023 Workshops'
PAPER_ARXIV = '2306.16678'

#: The authors' model variants (names in their code and in the reference manifest) -> ours.
AUTHORS_VARIANTS = {
    'reactdeit': 'binary_deit_small_patch16_224',
    'reactdeit_avgpool': 'binary_deit_small_gap_patch16_224',
    'reactdeit_avgpool_mb': 'binary_deit_small_gap_mb_patch16_224',
    'reactdeit_avgpool_mb_ls': 'binary_deit_small_gap_mb_affine_patch16_224',
    'binaryvit': 'binaryvit_small_patch4_224',
    'binaryvit_somefp': 'binaryvit_small_fpembed_patch4_224',
}

# Weight files, in the order timm looks for them (timm.models._hub: _PREFERRED_FILES / _EXT_PRIORITY).
_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
_WEIGHT_EXTS = ('.safetensors', '.pth', '.pth.tar', '.bin')
_HUB_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
# create_model options that do not describe the architecture (left out of the configuration check)
_FACTORY_ONLY = ('device', 'dtype', 'checkpoint_path', 'pretrained_cfg_overlay', 'scriptable', 'exportable', 'no_jit',
                 'features_only', 'out_indices', 'feature_cls', 'output_stride')


class LoadError(RuntimeError):
    """A model repo (Hub, Hub cache or local folder) or a checkpoint could not be loaded.

    Attributes:
        source: what was asked for (``'hf-hub:ORG/REPO'``, ``'local-dir:PATH'``, a checkpoint path).
        file: the file at fault (``'config.json'``, ``'model.safetensors'``, a path), or ``None``.
        problem: what is wrong with it.

    The original exception is chained as ``__cause__``.
    """

    def __init__(self, source: str, file: Optional[str], problem: str):
        self.source = source
        self.file = file
        self.problem = problem
        where = f'{source}: {file}' if file else source
        super().__init__(f'{where}: {problem}')


# ---------------------------------------------------------------------------------------------
# Names


def registered_models() -> List[str]:
    """Every model name this package registers with timm."""
    return sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith('timm_binaryvit'))


def resolve_model_name(name: str) -> str:
    """A registered model name, accepting the authors' variant names (``reactdeit_avgpool_mb_ls`` ...).

    Raises ``ValueError`` listing the available names for anything else.
    """
    if is_model(name):
        return name
    if name in AUTHORS_VARIANTS:
        return AUTHORS_VARIANTS[name]
    raise ValueError(
        f'unknown model {name!r}. Models registered by timm_binaryvit: {", ".join(registered_models())}; '
        f"the authors' variant names are accepted too: {', '.join(sorted(AUTHORS_VARIANTS))}")


# ---------------------------------------------------------------------------------------------
# Recording a model's configuration


def model_family(model: Union[nn.Module, str]) -> str:
    """``'pyramid'`` for a BinaryViT, ``'deit'`` for a fully-binary DeiT: a model, or a registered name
    (or the authors' variant name), which is looked up without building anything.

    Raises ``TypeError`` for any other module (a ``features_only`` wrapper included) and
    ``ValueError`` for an unknown name.
    """
    from .binary_deit import BinaryDeiT
    from .binaryvit import BinaryViT

    if isinstance(model, str):
        module = model_entrypoint(resolve_model_name(model)).__module__
        families = {BinaryViT.__module__: 'pyramid', BinaryDeiT.__module__: 'deit'}
        if module not in families:
            raise ValueError(f'{model!r} is a timm model, not one of timm_binaryvit ({", ".join(registered_models())})')
        return families[module]
    if isinstance(model, BinaryViT):
        return 'pyramid'
    if isinstance(model, BinaryDeiT):
        return 'deit'
    raise TypeError(
        f'{type(model).__name__} is not a BinaryViT or BinaryDeiT model of timm_binaryvit '
        f'(a features_only wrapper cannot be saved for re-creation either; save the model it wraps)')


def constructor_args(model: nn.Module) -> Dict[str, Any]:
    """The complete, JSON-serialisable constructor arguments that rebuild ``model``'s architecture:
    its ``model_args()``, the one place each model class says how it is rebuilt.

    Read from the model's attributes (so they reflect ``reset_classifier`` and the like), drop rates
    excluded: they do not change the architecture. Pass them as ``model_args=`` to timm's
    ``save_for_hf`` / ``push_to_hf_hub``, or use :func:`save_pretrained`.
    """
    model_family(model)  # a clear TypeError for anything else
    return model.model_args()


def architecture_name(model: nn.Module) -> str:
    """The registered name to record as ``architecture``: the model's own if it came from the factory,
    otherwise the registered variant its configuration corresponds to."""
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    if arch and is_model(arch):
        return arch
    if model_family(model) == 'pyramid':
        return 'binaryvit_small_fpembed_patch4_224' if model.fp_transitions else 'binaryvit_small_patch4_224'
    if model.num_prefix_tokens:
        return 'binary_deit_small_patch16_224'
    if model.multi_branch_pool:
        return 'binary_deit_small_gap_mb_affine_patch16_224' if model.affine else 'binary_deit_small_gap_mb_patch16_224'
    return 'binary_deit_small_gap_patch16_224'


def _synthetic_pretrained_cfg(model: nn.Module, arch: str) -> Dict[str, Any]:
    cfg = get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    height, width = model.img_size
    cfg.update(
        architecture=arch,
        input_size=(model.in_chans, height, width),
        num_classes=model.num_classes,
        fixed_input_size=True,
        pool_size=(height // 32, width // 32) if model_family(model) == 'pyramid' else None,
    )
    return cfg


def save_pretrained(
        model: nn.Module,
        save_dir: Union[str, Path],
        *,
        model_args: Optional[Dict[str, Any]] = None,
        model_config: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        model_card: Union[bool, Dict[str, Any]] = True,
        safe_serialization: Union[bool, str] = True,
        check: bool = True,
) -> Path:
    """Write a Hub repo folder for ``model``: ``config.json``, ``model.safetensors`` and ``README.md``.

    Calls ``timm.models.save_for_hf`` with the complete :func:`constructor_args` (updated by
    ``model_args``), so the folder rebuilds the same architecture with
    ``timm.create_model('local-dir:<save_dir>', pretrained=True)`` or, once uploaded,
    ``'hf-hub:ORG/REPO'``. Works for factory-made models and for models built from the classes
    directly (those get the registered variant's ``pretrained_cfg``).

    Args:
        model: a ``BinaryViT`` or ``BinaryDeiT``.
        save_dir: the folder (created if needed).
        model_args: extra or replacement constructor arguments to record.
        model_config: passed to ``save_for_hf`` (``label_names`` and other top-level config fields).
        data_config: passed to ``save_for_hf`` (preprocessing of the exported checkpoint).
        model_card: write ``README.md`` (:func:`write_model_card`); a dict gives its keyword
            arguments (``source``, ``repo_id``, ``license``, ``title``, ``description``).
        safe_serialization: ``True`` (``model.safetensors``), ``False`` (``pytorch_model.bin``) or ``'both'``.
        check: verify that the recorded configuration rebuilds the same state dict (raises ``ValueError``).

    Returns:
        the folder.
    """
    from timm.models import save_for_hf

    arch = architecture_name(model)
    args = constructor_args(model)
    args.update(model_args or {})
    if check:
        from .deploy import check_rebuilds  # the one rebuild check, shared with the packed export

        check_rebuilds(model, arch, args)

    added = []
    if not getattr(model, 'pretrained_cfg', None):
        model.pretrained_cfg = _synthetic_pretrained_cfg(model, arch)
        added.append('pretrained_cfg')
    if not hasattr(model, '_traits'):
        model._traits = dict(img_size=tuple(model.img_size), fixed_input_size=True, first_conv='patch_embed.proj')
        added.append('_traits')
    try:
        save_dir = Path(save_dir)
        save_for_hf(model, save_dir, model_config=model_config, model_args=args, data_config=data_config,
                    safe_serialization=safe_serialization)
    finally:
        for name in added:
            delattr(model, name)
    if model_card is not False:
        write_model_card(model, save_dir, **(model_card if isinstance(model_card, dict) else {}))
    return save_dir


def push_to_hub(model: nn.Module, repo_id: str, *, commit_message: str = 'Add model', token: Optional[str] = None,
                revision: Optional[str] = None, private: bool = False, create_pr: bool = False,
                model_card: Union[bool, Dict[str, Any]] = True, **save_kwargs):
    """Create (if needed) the Hub repo ``repo_id`` and upload :func:`save_pretrained`'s folder to it.

    Equivalent to ``timm.models.push_to_hf_hub(model, repo_id, model_args=constructor_args(model))``
    with our model card. Returns huggingface_hub's commit info.
    """
    from tempfile import TemporaryDirectory

    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if model_card is not False:
        model_card = dict(model_card) if isinstance(model_card, dict) else {}
        model_card.setdefault('repo_id', repo_id)
    with TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, model_card=model_card, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message)


# ---------------------------------------------------------------------------------------------
# Model card


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


# ---------------------------------------------------------------------------------------------
# Loading with clear errors


def _split_source(name: str) -> Tuple[Optional[str], str]:
    from timm.models import parse_model_name

    if ':' not in name and os.path.isdir(name):
        return 'local-dir', name
    return parse_model_name(name)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_download(source: str, repo_id: str, revision: Optional[str], filename: str,
                  cache_dir: Optional[Union[str, Path]], what: str) -> str:
    """``hf_hub_download`` with errors that say which repo and file and why."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
    except LocalEntryNotFoundError as e:
        cache = str(cache_dir) if cache_dir else _hub_cache()
        if _hub_offline():
            problem = (f'{what} is not in the local Hugging Face cache ({cache}) and offline mode is on '
                       f'(HF_HUB_OFFLINE=1): download the repo first or unset HF_HUB_OFFLINE')
        else:
            problem = f'{what} could not be fetched from the Hub and is not in the local cache ({cache}): {e}'
        raise LoadError(source, filename, problem) from e
    except RepositoryNotFoundError as e:
        raise LoadError(source, filename, f'the repository {repo_id!r} does not exist on the Hub or is not '
                                          f'accessible with your credentials') from e
    except RevisionNotFoundError as e:
        raise LoadError(source, filename, f'the repository {repo_id!r} has no revision {revision!r}') from e
    except EntryNotFoundError as e:
        raise LoadError(source, filename, f'the repository {repo_id!r} has no {filename}: {what} is missing') from e
    except (HfHubHTTPError, OSError) as e:
        raise LoadError(source, filename, f'could not fetch {what}: {type(e).__name__}: {e}') from e


def _read_config(source: str, kind: str, ident: str, cache_dir) -> Tuple[Dict[str, Any], str]:
    if kind == 'hf-hub':
        from timm.models._hub import hf_split

        repo_id, revision = hf_split(ident)
        path = _hub_download(source, repo_id, revision, 'config.json', cache_dir, 'the model configuration')
        shown = 'config.json'
    else:
        folder = Path(ident)
        if not folder.is_dir():
            raise LoadError(source, None, f'the folder {str(folder)!r} does not exist')
        path = folder / 'config.json'
        shown = 'config.json'
        if not path.is_file():
            raise LoadError(source, shown, 'missing: the folder is not a timm model repo (config.json + weights)')
    try:
        cfg = json.loads(Path(path).read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(source, shown, f'is not valid JSON: {e}') from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get('architecture'), str):
        raise LoadError(source, shown, "has no 'architecture' entry: it is not a timm model configuration")
    return cfg, shown


def _weights_file(kind: str, ident: str, cache_dir) -> Tuple[Optional[str], Optional[str]]:
    """(name shown, local path) of the weights timm loads, or (None, None) when there are none at hand."""
    if kind == 'hf-hub':
        from huggingface_hub import try_to_load_from_cache
        from timm.models._hub import hf_split

        repo_id, revision = hf_split(ident)
        for name in _HUB_WEIGHT_FILES:
            path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
            if isinstance(path, str):
                return name, path
        return None, None
    folder = Path(ident)
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return name, str(folder / name)
    for ext in _WEIGHT_EXTS:
        files = sorted(folder.glob(f'*{ext}'))
        if files:
            return files[0].name, str(files[0])
    return None, None


def _is_corrupt_file_error(e: BaseException) -> bool:
    text = f'{type(e).__module__}.{type(e).__name__}: {e}'
    return ('SafetensorError' in text or 'deserializing header' in text or 'PytorchStreamReader' in text
            or 'UnpicklingError' in text or isinstance(e, EOFError))


def _corruption(path: str) -> Optional[str]:
    """What is wrong with a weights file, or None if it reads."""
    try:
        if path.endswith('.safetensors'):
            from safetensors import safe_open

            with safe_open(path, framework='pt') as f:
                for key in f.keys():
                    f.get_slice(key)
        else:
            torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  (any failure to read is the answer)
        size = os.path.getsize(path)
        return f'is truncated or corrupt ({size:,} bytes; {type(e).__name__}: {e})'
    return None


def load_model(name: str, pretrained: bool = True, cache_dir: Optional[Union[str, Path]] = None,
               **kwargs) -> nn.Module:
    """``timm.create_model`` for Hub repos and repo folders, with errors that name the file at fault.

    Args:
        name: ``'hf-hub:ORG/REPO[@REVISION]'``, ``'local-dir:PATH'``, a folder path, or a model name
            registered with timm.
        pretrained: load the weights of the repo (``False``: only its architecture).
        cache_dir: Hugging Face cache folder (default: huggingface_hub's, ``HF_HUB_CACHE``).
        **kwargs: passed to ``timm.create_model`` (e.g. ``num_classes`` to re-head).

    Raises:
        LoadError: with ``source``, ``file`` and ``problem``; the underlying exception is its ``__cause__``.
        ValueError: for a name that is neither a repo nor a registered model.
    """
    kind, ident = _split_source(name)
    if kind is None:
        if not is_model(ident):
            raise ValueError(f'unknown model {name!r}: expected hf-hub:ORG/REPO, local-dir:PATH, a repo folder or '
                             f'a registered model ({", ".join(registered_models())})')
        return timm.create_model(ident, pretrained=pretrained, cache_dir=cache_dir, **kwargs)

    source = f'{kind}:{ident}'
    cfg, config_file = _read_config(source, kind, ident, cache_dir)
    arch = cfg['architecture']
    if not is_model(arch):
        ours = ', '.join(registered_models())
        raise LoadError(source, config_file,
                        f'names the architecture {arch!r}, which no installed package registers with timm '
                        f'(timm_binaryvit registers: {ours})')
    model_args = cfg.get('model_args') or {}
    if not isinstance(model_args, dict):
        raise LoadError(source, config_file, "'model_args' is not a mapping of argument names to values")
    probe = {k: v for k, v in {**model_args, **kwargs}.items() if k not in _FACTORY_ONLY}
    try:
        timm.create_model(arch, device='meta', **probe)
    except Exception as e:  # noqa: BLE001
        raise LoadError(source, config_file, f'its model_args {model_args} do not build {arch}: '
                                             f'{type(e).__name__}: {e}') from e

    prefixed = f'{kind}:{ident}'
    if not pretrained:
        return timm.create_model(prefixed, pretrained=False, cache_dir=cache_dir, **kwargs)
    try:
        return timm.create_model(prefixed, pretrained=True, cache_dir=cache_dir, **kwargs)
    except Exception as e:  # noqa: BLE001  (re-raised below with the file named)
        shown, path = _weights_file(kind, ident, cache_dir)
        if path is None:
            wanted = ' or '.join(_HUB_WEIGHT_FILES)
            if kind == 'hf-hub' and _hub_offline():
                problem = (f'not in the local Hugging Face cache ({cache_dir or _hub_cache()}) and offline mode is '
                           f'on (HF_HUB_OFFLINE=1)')
            elif kind == 'hf-hub':
                problem = f'the repository has no weights file ({type(e).__name__}: {e})'
            else:
                problem = f'the folder has no weights file ({", ".join(_WEIGHT_FILES)})'
            raise LoadError(source, wanted, problem) from e
        corrupt = _corruption(path) if _is_corrupt_file_error(e) else None
        if corrupt:
            raise LoadError(source, shown, corrupt) from e
        if isinstance(e, (ValueError, RuntimeError, KeyError)) and not isinstance(e, LoadError):
            raise LoadError(source, shown, f'does not hold weights for the {arch} described by {config_file}: '
                                           f'{e}') from e
        raise LoadError(source, shown, f'could not be loaded: {type(e).__name__}: {e}') from e


# ---------------------------------------------------------------------------------------------
# Checkpoints of the authors' training code


def load_checkpoint_file(path: Union[str, Path], trust_pickle: bool = False) -> Dict[str, Any]:
    """The state dict in a checkpoint file: ``.safetensors``, or a ``torch.save`` file (``.pth``,
    ``.pt``, ``.bin``, ``.pth.tar``) holding a state dict, possibly wrapped (``{'model': state_dict, ...}``,
    as the authors' training script saves it, with a ``module.`` prefix from DistributedDataParallel).

    ``torch.save`` files are read with ``weights_only=True``; the ``argparse.Namespace`` the authors'
    script stores beside the weights is allowed. ``trust_pickle=True`` reads arbitrary pickles
    (only for files you trust).
    """
    from .convert import unwrap_state_dict

    path = Path(path)
    if not path.is_file():
        raise LoadError(str(path), None, 'no such file')
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file

            checkpoint = load_file(str(path))
        elif trust_pickle:
            checkpoint = torch.load(str(path), map_location='cpu', weights_only=False)
        else:
            import argparse
            import pathlib

            with torch.serialization.safe_globals([argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath]):
                checkpoint = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001
        hint = ''
        if 'weights_only' in str(e) or 'Unsupported global' in str(e):
            hint = (' (it pickles objects besides tensors; if you trust the file, '
                    'use trust_pickle=True / --trust-pickle)')
        raise LoadError(str(path), None, f'cannot be read as a checkpoint: {type(e).__name__}: {e}{hint}') from e
    try:
        state_dict = unwrap_state_dict(checkpoint)
    except ValueError as e:
        raise LoadError(str(path), None, str(e)) from e
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def _infer_num_classes(state_dict: Mapping[str, Any]) -> Optional[int]:
    for key in ('classifier.weight', 'head.weight'):
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.ndim == 2:
            return int(value.shape[0])
    if not any(k.startswith(('classifier.', 'head.')) for k in state_dict):
        return 0
    return None


def convert_checkpoint(
        checkpoint: Union[str, Path],
        model_name: str,
        out_dir: Union[str, Path],
        *,
        num_classes: Optional[int] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        source: Optional[str] = None,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
        trust_pickle: bool = False,
        verify: bool = True,
) -> nn.Module:
    """Turn a checkpoint trained with the authors' code (or saved from ours) into a Hub repo folder.

    Args:
        checkpoint: ``.pth`` / ``.safetensors`` file (see :func:`load_checkpoint_file`).
        model_name: a registered name or the authors' variant name (``reactdeit_avgpool_mb_ls``, ``binaryvit`` ...).
        out_dir: the repo folder to write (``config.json``, ``model.safetensors``, ``README.md``).
        num_classes: classes of the head (default: read from the checkpoint's classifier).
        model_kwargs: the configuration the checkpoint was trained with, if not the registered
            one (``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``, ``sr_ratios``, ``img_size``,
            ``depth`` ...).
        source: the weights' provenance for the model card (default: the checkpoint file name).
        repo_id, license: for the model card.
        trust_pickle: read a ``torch.save`` file with arbitrary pickles.
        verify: reload the folder and check it gives the converted model's logits.

    Returns:
        the converted model (eval mode).
    """
    from .convert import checkpoint_filter_fn

    name = resolve_model_name(model_name)
    checkpoint = Path(checkpoint)
    state_dict = load_checkpoint_file(checkpoint, trust_pickle=trust_pickle)
    if num_classes is None:
        num_classes = _infer_num_classes(state_dict)
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f'cannot build {name} with {kwargs}: {type(e).__name__}: {e}') from e
    try:
        converted = checkpoint_filter_fn(state_dict, model)
        model.load_state_dict(converted, strict=True)
    except (ValueError, RuntimeError) as e:
        raise LoadError(str(checkpoint), None, f'does not fit {name} with {kwargs or "its default configuration"}: '
                                               f'{e}. Give the configuration it was trained with '
                                               f'(model kwargs such as embed_dims / depths / depth).') from e
    model.eval()
    if source is None:
        source = (f'converted with `timm-binaryvit convert` from `{checkpoint.name}`, a checkpoint in the layout of '
                  f"the authors' BinaryViT training code" if any(k.startswith('vit.') for k in state_dict)
                  else f'converted with `timm-binaryvit convert` from `{checkpoint.name}`')
    card = dict(source=source, repo_id=repo_id, license=license)
    save_pretrained(model, out_dir, model_card=card)
    if verify:
        _verify_folder(model, out_dir)
    return model


def _verify_folder(model: nn.Module, folder: Union[str, Path]) -> None:
    loaded = load_model(f'local-dir:{folder}', pretrained=True).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, model.in_chans, *model.img_size, generator=generator)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    if not torch.equal(expected, got):
        err = (got - expected).abs().max().item()
        raise RuntimeError(f'{folder} does not reload to the converted model (max logit difference {err:g})')
    if not math.isfinite(expected.abs().sum().item()):
        raise RuntimeError('the converted model gives non-finite logits; the checkpoint may be damaged')
