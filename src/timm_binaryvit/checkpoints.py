"""Checkpoint files, and turning a checkpoint trained with the authors' code into a Hub repo folder.

:func:`load_checkpoint_file` reads the state dict of a ``.safetensors`` or ``torch.save`` file
(wrapped or not, as the authors' training script saves it); :func:`convert_checkpoint` maps it to
our layout (:mod:`timm_binaryvit.convert`), writes the folder with
:func:`timm_binaryvit.hub.save_pretrained` and checks that the folder reloads to the same logits.
"""
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

import timm

from .convert import checkpoint_filter_fn, unwrap_state_dict
from .hub import LoadError, load_model, resolve_model_name, save_pretrained

__all__ = ['load_checkpoint_file', 'convert_checkpoint']


def load_checkpoint_file(path: Union[str, Path], trust_pickle: bool = False) -> Dict[str, Any]:
    """The state dict in a checkpoint file: ``.safetensors``, or a ``torch.save`` file (``.pth``,
    ``.pt``, ``.bin``, ``.pth.tar``) holding a state dict, possibly wrapped (``{'model': state_dict, ...}``,
    as the authors' training script saves it, with a ``module.`` prefix from DistributedDataParallel).

    ``torch.save`` files are read with ``weights_only=True``; the ``argparse.Namespace`` the authors'
    script stores beside the weights is allowed. ``trust_pickle=True`` reads arbitrary pickles
    (only for files you trust).
    """
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
