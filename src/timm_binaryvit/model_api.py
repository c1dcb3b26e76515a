"""The timm model API that BinaryViT and the fully-binary DeiT-S share, written once.

:class:`TimmModelApi` is the base class of :class:`~timm_binaryvit.binaryvit.BinaryViT` and
:class:`~timm_binaryvit.binary_deit.BinaryDeiT`: the classifier head (``get_classifier``,
``reset_classifier``, ``forward_head``, ``forward``), the input check, ``model_args``,
``forward_intermediates`` and ``prune_intermediate_layers``. A model brings its architecture: its stem,
its feature units (the layers of DeiT-S, the stages of the pyramid), how a unit runs, how its tokens
are pooled for the head. :func:`build_model` and :func:`default_cfg` are what their registered model
functions share: the one ``build_model_with_cfg`` call and the pretrained configuration.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices

from .batchnorm import TokenBatchNorm
from .convert import checkpoint_filter_fn

__all__ = ['TimmModelApi', 'build_model', 'default_cfg', 'check_image_input', 'with_input_size_cfg']


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int], model_name: str) -> None:
    """Raise a ValueError naming the expected and received shape when ``x`` does not fit the model."""
    expected = (in_chans, img_size[0], img_size[1])
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        hint = ''
        if x.ndim == 4 and x.shape[1] != in_chans:
            hint = f' The model was built with in_chans={in_chans}.'
        elif x.ndim == 4:
            hint = (f' The model was built with img_size=({img_size[0]}, {img_size[1]}) and its position embeddings'
                    f' are fixed to it: resize the input to {img_size[0]}x{img_size[1]} (timm scripts:'
                    f' --input-size {in_chans} {img_size[0]} {img_size[1]}), or build the model with'
                    f' img_size=({x.shape[2]}, {x.shape[3]}) for this input.')
        raise ValueError(
            f'{model_name} expects input of shape (B, {expected[0]}, {expected[1]}, {expected[2]}),'
            f' got {tuple(x.shape)}.{hint}')


def with_input_size_cfg(kwargs: dict) -> dict:
    """``kwargs`` for timm's ``build_model_with_cfg`` with ``pretrained_cfg['input_size']`` following the
    ``img_size`` and ``in_chans`` the model is built with, so that timm's ``resolve_data_config`` (and so
    ``train.py``, ``validate.py``, ``inference.py``) feeds it images of that size by itself."""
    if kwargs.get('img_size') is None and kwargs.get('in_chans') is None:
        return kwargs
    img_size = kwargs.get('img_size') or 224
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    overlay.setdefault('input_size', (int(kwargs.get('in_chans') or 3), int(height), int(width)))
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def build_model(cls, variant: str, pretrained: bool, default_out_indices, **kwargs) -> nn.Module:
    """``cls`` built by timm's ``build_model_with_cfg`` for the registered ``variant``: the authors'
    checkpoints converted on load, features by ``forward_intermediates`` (``out_indices`` from ``kwargs``,
    else ``default_out_indices``), the input size following ``img_size`` (:func:`with_input_size_cfg`)."""
    out_indices = kwargs.pop('out_indices', default_out_indices)
    return build_model_with_cfg(
        cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        **with_input_size_cfg(kwargs),
    )


def default_cfg(**kwargs) -> Dict[str, Any]:
    """The pretrained configuration of a registered model (an entry of timm's ``default_cfgs``);
    ``kwargs`` add to it or override it."""
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2306.16678',
        'paper_name': 'BinaryViT: Pushing Binary Vision Transformers Towards Convolutional Models',
        **kwargs,
    }


class TimmModelApi(nn.Module):
    """timm's model API over a patch stem, feature units, a final token BatchNorm ``norm`` and a
    full-precision linear head ``head`` behind ``head_drop``.

    A subclass sets ``img_size``, ``in_chans``, ``num_classes``, ``global_pool`` and ``patch_size``, builds
    its stem and feature units and then the rest with :meth:`_build_head`, and implements
    ``forward_features`` and the hooks below (``forward`` reaches ``_stem`` and ``_pool``, so TorchScript
    compiles those two). The class attributes say where the two families' APIs differ.
    """
    #: the values ``global_pool`` may take
    global_pools: Tuple[str, ...] = ('avg', '')
    #: the ``output_fmt`` values ``forward_intermediates`` accepts
    intermediate_fmts: Tuple[str, ...] = ('NCHW',)
    #: whether ``prune_intermediate_layers(prune_norm=True)`` drops the head as well
    prune_norm_drops_head: bool = False

    # -- hooks: the architecture

    def _stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Images (checked with :meth:`_check_input`) -> tokens entering the first unit, and their grid."""
        raise NotImplementedError

    def _feature_units(self) -> nn.ModuleList:
        """The units ``forward_intermediates`` taps (layers or stages), in order."""
        raise NotImplementedError

    def _run_unit(self, unit: nn.Module, x: torch.Tensor, feat_size: Tuple[int, int]):
        """One unit on tokens ``x`` of grid ``feat_size``: ``(tokens, grid)`` after it."""
        raise NotImplementedError

    def _tap(self, x: torch.Tensor, feat_size: Tuple[int, int], index: int, norm: bool, output_fmt: str):
        """The intermediate ``forward_intermediates`` returns for unit ``index`` with output tokens ``x``."""
        raise NotImplementedError

    def _final_features(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        """Normalised output tokens in the form ``forward_features`` returns them."""
        raise NotImplementedError

    def _truncate_units(self, count: int) -> bool:
        """Keep the first ``count`` feature units; True when that changes the feature width (then the
        norm and the head no longer fit and are dropped)."""
        raise NotImplementedError

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features``' output pooled by ``global_pool`` for the head."""
        raise NotImplementedError

    def _architecture_args(self) -> Dict[str, Any]:
        """The constructor arguments of :meth:`model_args` that this architecture adds."""
        raise NotImplementedError

    # -- the API

    def _check_global_pool(self, global_pool: str) -> None:
        if global_pool not in self.global_pools:
            *others, last = self.global_pools
            raise ValueError(f"global_pool must be {', '.join(map(repr, others))} or {last!r}, got {global_pool!r}")

    def _check_input(self, x: torch.Tensor):
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.img_size, type(self).__name__)

    def _build_head(self, num_features: int, drop_rate: float, device=None, dtype=None):
        """The final token BatchNorm ``norm`` over ``num_features`` channels, dropout ``head_drop`` and the
        linear classifier ``head`` (``nn.Identity`` for ``num_classes == 0``)."""
        self.num_features = self.head_hidden_size = num_features
        self.norm = TokenBatchNorm(num_features, device=device, dtype=dtype)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, self.num_classes, device=device, dtype=dtype) \
            if self.num_classes > 0 else nn.Identity()

    def _init_head(self):
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self._check_global_pool(global_pool)
            self.global_pool = global_pool
        weight = self.head.weight if isinstance(self.head, nn.Linear) else next(self.parameters())
        self.head = nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype) \
            if num_classes > 0 else nn.Identity()
        if not weight.is_meta:
            self._init_head()
        self.head.train(self.training)

    @torch.jit.ignore
    def model_args(self) -> Dict[str, Any]:
        """The JSON-serialisable constructor arguments that rebuild this architecture (drop rates aside:
        they do not change it). Read from the model, so they follow ``reset_classifier``."""
        return dict(
            img_size=[int(v) for v in self.img_size], in_chans=int(self.in_chans),
            num_classes=int(self.num_classes), global_pool=str(self.global_pool), patch_size=int(self.patch_size),
            **self._architecture_args(),
        )

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the requested feature units (the last ``n`` if ``indices`` is an int, the listed ones
        if a sequence, all if None), and unless ``intermediates_only`` also ``forward_features``' output
        (up to the last unit run when ``stop_early``).

        Args:
            x: input images.
            indices: which units.
            norm: apply the final token BatchNorm to the intermediates (see the model's ``_tap``).
            stop_early: stop after the last requested unit.
            output_fmt: ``'NCHW'`` maps, or where the model offers it ``'NLC'`` tokens.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in self.intermediate_fmts:
            raise ValueError(f'{type(self).__name__} returns intermediates as '
                             f"{' or '.join(map(repr, self.intermediate_fmts))}, got output_fmt={output_fmt!r}")
        units = self._feature_units()
        take_indices, max_index = feature_take_indices(len(units), indices)
        intermediates = []
        x, feat_size = self._stem(x)
        for i, unit in enumerate(units):
            if stop_early and i > max_index:
                break
            x, feat_size = self._run_unit(unit, x, feat_size)
            if i in take_indices:
                intermediates.append(self._tap(x, feat_size, i, norm, output_fmt))
        if intermediates_only:
            return intermediates
        return self._final_features(self.norm(x), feat_size), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the feature units (and, as asked, the final norm and head) that the requested intermediates
        do not need. Cutting units that change the feature width drops the norm and the head too."""
        take_indices, max_index = feature_take_indices(len(self._feature_units()), indices)
        if self._truncate_units(max_index + 1):
            prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head or (prune_norm and self.prune_norm_drops_head):
            self.reset_classifier(0, '')
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self._pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
