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

The model card is written by :mod:`timm_binaryvit.model_card`;
:func:`timm_binaryvit.checkpoints.convert_checkpoint` turns a checkpoint trained with the authors'
code into such a folder.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

import timm
from timm.models import get_pretrained_cfg, is_model, model_entrypoint

__all__ = [
    'AUTHORS_VARIANTS', 'LoadError', 'registered_models', 'resolve_model_name', 'model_family', 'constructor_args',
    'architecture_name', 'save_pretrained', 'push_to_hub', 'load_model',
]

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
        model_card: write ``README.md`` (:func:`timm_binaryvit.model_card.write_model_card`); a dict gives its keyword
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
        from .model_card import write_model_card  # imported here: it builds on this module

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
