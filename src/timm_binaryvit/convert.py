"""The authors' checkpoint layout -> ours.

The authors' training code is built on Hugging Face's ViT classes: ``vit.embeddings.*``
is the stem, ``vit.encoder.layer.{i}.*`` the layers numbered across all stages,
``vit.encoder.patch_embed{k}.*`` the stage transitions, ``vit.layernorm`` the final norm,
``classifier`` the head. Their ``move*`` are shifts, ``rprelu*.move1/move2/prelu.weight``
RPReLU, ``layerscale*.alpha/move`` the affines, ``att_prob_clip`` the attention binariser
scale and ``norm*`` token BatchNorms.

This module knows those names so that the model files do not. Which family a model belongs
to is :func:`timm_binaryvit.hub.model_family`'s answer, the same one the Hub export and the CLI use.
"""
import re
from typing import Any, Dict, Mapping, Optional

import torch

__all__ = ['checkpoint_filter_fn', 'convert_authors_state_dict', 'is_authors_layout', 'unwrap_state_dict']

# Parameters of one layer, relative to ``vit.encoder.layer.{i}.``.
_LAYER_PARAMS = {
    'attention.attention.moveq': 'attn.q.linear.shift',
    'attention.attention.movek': 'attn.k.linear.shift',
    'attention.attention.movev': 'attn.v.linear.shift',
    'attention.attention.mover': 'attn.kv_reduce.linear.shift',
    'attention.attention.moveq2': 'attn.sign_q.shift',
    'attention.attention.movek2': 'attn.sign_k.shift',
    'attention.attention.movev2': 'attn.sign_v.shift',
    'attention.attention.att_prob_clip': 'attn.prob_binarizer.scale',
    'attention.attention.query.weight': 'attn.q.linear.weight',
    'attention.attention.key.weight': 'attn.k.linear.weight',
    'attention.attention.value.weight': 'attn.v.linear.weight',
    'attention.attention.reduction.weight': 'attn.kv_reduce.linear.weight',
    'attention.output.move': 'attn.proj.linear.shift',
    'attention.output.dense.weight': 'attn.proj.linear.weight',
    'intermediate.move': 'mlp.fc1.linear.shift',
    'intermediate.dense.weight': 'mlp.fc1.linear.weight',
    'output.move': 'mlp.fc2.linear.shift',
    'output.dense.weight': 'mlp.fc2.linear.weight',
}
_LAYER_NORMS = {
    'layernorm_before': 'norm1',
    'layernorm_after': 'norm2',
    'attention.attention.normq': 'attn.q.norm',
    'attention.attention.normk': 'attn.k.norm',
    'attention.attention.normv': 'attn.v.norm',
    'attention.attention.norm_r': 'attn.kv_reduce.norm',
    'attention.attention.norm_context': 'attn.norm_ctx',
    'attention.output.norm': 'attn.proj.norm',
    'intermediate.norm': 'mlp.fc1.norm',
    'output.norm': 'mlp.fc2.norm',
}
_LAYER_RPRELUS = {
    'attention.attention.rpreluq': 'attn.act_q',
    'attention.attention.rpreluk': 'attn.act_k',
    'attention.attention.rpreluv': 'attn.act_v',
    'attention.attention.rprelur': 'attn.act_kv_reduce',
    'attention.attention.rprelu_context': 'attn.act_ctx',
    'attention.output.rprelu': 'attn.act_proj',
    'intermediate.rprelu': 'mlp.act1',
    'output.rprelu': 'mlp.act2',
}
_LAYER_AFFINES = {
    'attention.output.layerscale': 'affine1',
    'output.layerscale': 'affine2',
    'layerscale_h3': 'pool.h3',
    'layerscale_w3': 'pool.w3',
    'layerscale_h5': 'pool.h5',
    'layerscale_w5': 'pool.w5',
}
# Stage transitions, relative to ``vit.encoder.patch_embed{k}.``.
_TRANSITION_PARAMS = {
    'move': 'downsample.conv.shift',
    'proj.weight': 'downsample.conv.weight',
    'position_embeddings': 'pos_embed',
}
_TRANSITION_NORMS = {'norm0': 'downsample.norm_in', 'norm': 'downsample.norm'}
_TRANSITION_RPRELUS = {'rprelu': 'downsample.act'}

_BN_FIELDS = {f: f for f in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')}
_RPRELU_FIELDS = {'move1': 'shift_in', 'prelu.weight': 'slope', 'move2': 'shift_out'}
_AFFINE_FIELDS = {'alpha': 'alpha', 'move': 'beta'}


def _map_module(name: str, params: Mapping[str, str], norms, rprelus, affines) -> Optional[str]:
    if name in params:
        return params[name]
    for table, fields, inner in ((norms, _BN_FIELDS, '.bn'), (rprelus, _RPRELU_FIELDS, ''),
                                 (affines, _AFFINE_FIELDS, '')):
        for source, target in table.items():
            if name.startswith(source + '.'):
                field = fields.get(name[len(source) + 1:])
                if field is not None:
                    return f'{target}{inner}.{field}'
    return None


def _is_pyramid(model) -> bool:
    from .hub import model_family  # imported here: the model modules import this one

    return model_family(model) == 'pyramid'


def _layer_prefix(index: int, model) -> str:
    if not _is_pyramid(model):
        return f'blocks.{index}.'
    start = 0
    for stage, depth in enumerate(model.depths):
        if index < start + depth:
            return f'stages.{stage}.blocks.{index - start}.'
        start += depth
    raise ValueError(f'the checkpoint has a layer {index}, but the model has only {start} layers '
                     f'(depths={tuple(model.depths)}): it was trained with another configuration')


def _convert_key(key: str, model) -> str:
    pyramid = _is_pyramid(model)
    fixed = {
        'classifier.weight': 'head.weight',
        'classifier.bias': 'head.bias',
        'vit.embeddings.cls_token': 'cls_token',
        'vit.embeddings.position_embeddings': 'stages.0.pos_embed' if pyramid else 'pos_embed',
        'vit.embeddings.patch_embeddings.projection.weight': 'patch_embed.proj.weight',
        'vit.embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
    }
    if key in fixed:
        return fixed[key]
    if key.startswith('vit.layernorm.'):
        return 'norm.bn.' + key[len('vit.layernorm.'):]
    if key.startswith('vit.embeddings.norm.'):
        return 'patch_embed.norm.bn.' + key[len('vit.embeddings.norm.'):]
    match = re.match(r'vit\.encoder\.layer\.(\d+)\.(.+)$', key)
    if match:
        rest = _map_module(match.group(2), _LAYER_PARAMS, _LAYER_NORMS, _LAYER_RPRELUS, _LAYER_AFFINES)
        if rest is not None:
            return _layer_prefix(int(match.group(1)), model) + rest
    match = re.match(r'vit\.encoder\.patch_embed(\d+)\.(.+)$', key)
    if match:
        if not pyramid:
            raise ValueError(f'the checkpoint has the stage transition {key!r}: it is a BinaryViT (pyramid) '
                             f'checkpoint, but the model is {type(model).__name__}')
        rest = _map_module(match.group(2), _TRANSITION_PARAMS, _TRANSITION_NORMS, _TRANSITION_RPRELUS, {})
        if rest is not None:
            return f'stages.{match.group(1)}.{rest}'
    raise ValueError(f'unknown key {key!r} in a checkpoint of the authors\' layout')


def is_authors_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict uses the authors' names (``vit.*`` and ``classifier.*``)."""
    return any(k.startswith('vit.') for k in state_dict)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The state dict inside a training checkpoint (``'model'`` / ``'state_dict'`` / ``'state_dict_ema'``
    wrappers), without a ``module.`` prefix left by DistributedDataParallel."""
    state_dict = checkpoint
    for wrapper in ('model', 'state_dict', 'model_state_dict'):
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
            break
    if not isinstance(state_dict, Mapping):
        raise ValueError(f'expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}')
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def convert_authors_state_dict(state_dict: Mapping[str, Any], model) -> Dict[str, Any]:
    """Rename every entry of a state dict in the authors' layout to this package's names.

    Works for any size configuration: layer numbers are split into stages by ``model.depths``.
    Values are passed through unchanged (shapes already agree). Also usable for any
    mapping keyed like a state dict, such as per-parameter gradients.
    """
    return {_convert_key(k, model): v for k, v in state_dict.items()}


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model) -> Dict[str, Any]:
    """timm's ``pretrained_filter_fn``: accept a checkpoint in the authors' layout or ours.

    The checkpoint may be raw or wrapped as the authors' training script saves it
    (``{'model': state_dict, ...}``). Raises ``ValueError`` naming the offending keys when the
    checkpoint belongs to another model or another configuration.
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_authors_layout(state_dict):
        state_dict = convert_authors_state_dict(state_dict, model)
    _check_matches(state_dict, model)
    return state_dict


def _check_matches(state_dict: Mapping[str, Any], model) -> None:
    expected = model.state_dict()
    # The head and the stem's input channels may legitimately differ: timm re-heads or adapts them later.
    adaptable = ('head.', 'patch_embed.proj.weight')
    missing = [k for k in expected if k not in state_dict and not k.startswith(adaptable)]
    unexpected = [k for k in state_dict if k not in expected and not k.startswith(adaptable)]
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and not k.startswith(adaptable) and isinstance(v, torch.Tensor)
        and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        problems = []
        for label, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', mismatched)):
            if items:
                shown = ', '.join(items[:5]) + (f' (+{len(items) - 5} more)' if len(items) > 5 else '')
                problems.append(f'{len(items)} {label}: {shown}')
        raise ValueError(
            f'the checkpoint does not fit this {type(model).__name__} '
            f'(it belongs to another model or configuration): ' + '; '.join(problems))
