"""The deployed (inference-only) models and :func:`deploy`."""
import copy
from typing import Optional

import torch
from torch import nn

from ..binary_deit import BinaryDeiT
from ..binaryvit import BinaryDownsample, BinaryViT, FullPrecisionDownsample
from ..layers import tokens_to_grid
from ..model_api import check_image_input
from .block import DeployedBlock
from .folding import FoldedDownsample, FoldedFPDownsample, FoldedHead, bn_affine, f64
from .runtime import FoldedPatchConv, Workspace, patches

__all__ = ['deploy', 'is_deployed', 'DeployedBinaryViT', 'DeployedBinaryDeiT']


class _DeployedModel(nn.Module):
    """Common API of the deployed models (inference only: ``train(True)`` raises)."""
    is_deployed = True

    def _copy_api(self, model: nn.Module, names):
        for name in names:
            if hasattr(model, name):
                setattr(self, name, copy.deepcopy(getattr(model, name)))
        for name in ('pretrained_cfg', 'default_cfg', 'feature_info'):
            if hasattr(model, name):
                setattr(self, name, copy.deepcopy(getattr(model, name)))
        self.training_class = type(model).__name__

    def _fold_head(self, model: nn.Module, width: int, ref: torch.Tensor) -> None:
        # the final BatchNorm folds into the classifier; the twin is complete and inference-only from here
        self.head_fold = FoldedHead(model.norm, model.head, width, ref)
        self.requires_grad_(False)
        self.eval()

    def _stem_tokens(self, x: torch.Tensor, family: str) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.img_size, family)
        return self.stem(patches(x, self.patch_size), x.shape[0])

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(
                f'{type(self).__name__} is an inference-only deployed model and cannot be trained; fine-tune the '
                f'training model ({self.training_class}) instead (timm_binaryvit.load_packed returns one)')
        return super().train(False)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head_fold.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """Replace the head by a freshly initialised one (as the training model does), refolded."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        ref = self.head_fold.norm_scale
        head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=.02)
            nn.init.zeros_(head.bias)
        self.head_fold.head = head.requires_grad_(False)
        self.head_fold.refold()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def _fused_ok(self) -> bool:
        return self.head_fold.head_weight is not None and self.global_pool in ('avg', 'token')

    def _fused_head(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _refuse_tracing(self) -> None:
        # The runtime writes into reused buffers, which a tracer records as constants: a traced or exported
        # graph would run and give wrong logits. Refuse rather than be silently wrong.
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            raise RuntimeError(
                'a deployed model cannot be traced, exported or compiled (its runtime writes into reused '
                'buffers); export or compile the training model in eval mode instead')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_tracing()
        with torch.no_grad():
            tokens = self._tokens(x)
            if self._fused_ok():
                return self._fused_head(tokens)
            return self.forward_head(self._features_from_tokens(tokens))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_tracing()
        with torch.no_grad():
            return self._features_from_tokens(self._tokens(x))


class DeployedBinaryViT(_DeployedModel):
    """Inference-only :class:`~timm_binaryvit.binaryvit.BinaryViT` built by :func:`deploy`.

    Same ``forward`` / ``forward_features`` (``(B, C_4, H/32, W/32)`` after the final BatchNorm) /
    ``forward_head`` / ``num_classes`` / ``pretrained_cfg`` as the training model.
    """

    def __init__(self, model: BinaryViT):
        super().__init__()
        self._copy_api(model, ('img_size', 'in_chans', 'num_classes', 'global_pool', 'patch_size', 'embed_dims',
                               'depths', 'num_heads', 'mlp_ratios', 'sr_ratios', 'fp_transitions', 'num_features',
                               'head_hidden_size', '_grids'))
        stem = model.patch_embed
        ref = stem.proj.weight
        w = f64(ref)
        C = w.shape[0]
        s, t = bn_affine(stem.norm, C, w)
        bias = (f64(stem.proj.bias) if stem.proj.bias is not None else 0.) * s + t
        self.stem = FoldedPatchConv(w * s[:, None, None, None], bias + f64(model.stages[0].pos_embed).reshape(-1, C),
                                    stem.patch_size, ref.dtype)
        self.downsamples = nn.ModuleList()
        self.stages = nn.ModuleList()
        for stage in model.stages:
            if isinstance(stage.downsample, BinaryDownsample):
                self.downsamples.append(FoldedDownsample(stage.downsample, stage.pos_embed))
            elif isinstance(stage.downsample, FullPrecisionDownsample):
                self.downsamples.append(FoldedFPDownsample(stage.downsample, stage.pos_embed))
            else:
                self.downsamples.append(nn.Identity())
            self.stages.append(nn.ModuleList([DeployedBlock(b, ref.dtype, ref.device) for b in stage.blocks]))
        self._fold_head(model, self.num_features, ref)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_tokens(x, 'BinaryViT')
        feat_size = self._grids[0]
        for i, (ds, blocks) in enumerate(zip(self.downsamples, self.stages)):
            ws = Workspace(x)
            if i > 0:
                x = ds(x, feat_size, ws)
                feat_size = self._grids[i]
            for blk in blocks:
                x = blk(x, feat_size, ws)
        return x

    def _features_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens_to_grid(self.head_fold.norm(tokens), self._grids[len(self.stages) - 1])

    def _fused_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head_fold.fused(tokens.mean(dim=1))

    def _fused_ok(self) -> bool:
        return self.head_fold.head_weight is not None and self.global_pool == 'avg'

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(-2, -1))
        return x if pre_logits else self.head_fold.head(x)


class DeployedBinaryDeiT(_DeployedModel):
    """Inference-only :class:`~timm_binaryvit.binary_deit.BinaryDeiT` built by :func:`deploy`.

    Same ``forward`` / ``forward_features`` (``(B, N (+1), C)`` tokens after the final BatchNorm) /
    ``forward_head`` / ``num_classes`` / ``pretrained_cfg`` as the training model.
    """

    def __init__(self, model: BinaryDeiT):
        super().__init__()
        self._copy_api(model, ('img_size', 'in_chans', 'num_classes', 'global_pool', 'patch_size', 'embed_dim',
                               'depth', 'num_heads', 'mlp_ratio', 'multi_branch_pool', 'affine', 'num_prefix_tokens',
                               'grid_size', 'num_features', 'head_hidden_size'))
        ref = model.patch_embed.proj.weight
        w = f64(ref)
        C = w.shape[0]
        bias = f64(model.patch_embed.proj.bias) if model.patch_embed.proj.bias is not None else w.new_zeros(C)
        pos = f64(model.pos_embed).reshape(-1, C)
        npre = self.num_prefix_tokens
        self.stem = FoldedPatchConv(w, bias + pos[npre:], model.patch_embed.patch_size, ref.dtype)
        if model.cls_token is not None:
            self.register_buffer('cls_pos', (f64(model.cls_token).reshape(1, C) + pos[:1]).to(ref.dtype))
        else:
            self.cls_pos = None
        self.blocks = nn.ModuleList([DeployedBlock(b, ref.dtype, ref.device) for b in model.blocks])
        self._fold_head(model, self.embed_dim, ref)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = self._stem_tokens(x, 'BinaryDeiT')
        if self.cls_pos is not None:
            x = torch.cat([self.cls_pos.expand(B, 1, -1), x], dim=1)
        ws = Workspace(x)
        for blk in self.blocks:
            x = blk(x, self.grid_size, ws)
        return x

    def _features_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head_fold.norm(tokens)

    def _fused_head(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.global_pool == 'token':
            return self.head_fold.fused(tokens[:, 0])
        return self.head_fold.fused(tokens[:, self.num_prefix_tokens:].mean(dim=1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        return x if pre_logits else self.head_fold.head(x)


def is_deployed(model: nn.Module) -> bool:
    """Whether ``model`` is a deployed (inference-only) model made by :func:`deploy`."""
    return isinstance(model, _DeployedModel)


def deploy(model: nn.Module) -> nn.Module:
    """An inference-only twin of a BinaryViT / BinaryDeiT model, in eval mode, without gradients.

    The training model is left untouched. The result has the same device and dtype and the
    same ``forward`` / ``forward_features`` / ``forward_head`` / ``num_classes`` /
    ``pretrained_cfg`` API, so timm's eval tooling (plain ``forward`` on images) works with it;
    its eval logits equal the training model's up to floating-point rounding (see
    :mod:`timm_binaryvit.deploy.folding` for what is folded, :mod:`~timm_binaryvit.deploy.runtime`
    for the kernels). A deployed model is returned unchanged.
    """
    if is_deployed(model):
        return model
    if isinstance(model, BinaryViT):
        cls = DeployedBinaryViT
    elif isinstance(model, BinaryDeiT):
        cls = DeployedBinaryDeiT
    else:
        raise TypeError(f'deploy() takes a BinaryViT or BinaryDeiT model of timm_binaryvit, got {type(model).__name__}')
    with torch.no_grad():
        return cls(model)
