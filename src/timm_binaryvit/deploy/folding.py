"""Folding: the pieces of a trained model turned into their inference-only equivalents.

All folding arithmetic runs in float64, then is cast to the model's dtype.

* every binary weight is binarised once (its own ``binary_weight()``: ``a * sign(W - mean_in W)``
  or ``a * sign(W)``) and kept as signs (bits) plus one scale per output channel; the token
  BatchNorm after it, a per-channel affine in eval mode, folds into that scale and a bias;
* RPReLU's input shift goes into that bias; its output shift, together with the shift of the
  sign that reads the activation, is carried through the PReLU (``y + c -> PReLU(y) + c``), so
  every sign is taken of a tensor as it is and the shifts cost nothing;
* the BatchNorm in front of a binary stage transition becomes the threshold of its sign
  (``sign(s * x + t + b) = sign(s) * sign(x + (t + b) / s)``, ``sign(s)`` going into the conv
  signs) and the affine of its pooled shortcut; the BatchNorms around a full-precision stage
  transition and after the pyramid stem fold into the convolutions, which run as patch GEMMs
  with the position embedding as their bias;
* the four average-pooling branches and their affines are one depthwise 5x5 convolution;
* the final BatchNorm folds into the linear head;
* the elastic binariser becomes the threshold ``p > s/2`` (``round`` is half-to-even, so
  ``round(p/s) >= 1`` exactly when ``p/s > 1/2``) and its scale ``s`` folds into the context
  BatchNorm.

The binary layers' weights are read only through :func:`binary_signs_scale`, so a model whose
binary weights were never materialised (``load_packed(..., deployed=True)`` builds it on the
``meta`` device and attaches the file's bits) folds the same way.
"""
import copy
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..binaryvit import BinaryDownsample, FullPrecisionDownsample
from .runtime import FoldedBinaryLinear, FoldedPatchConv, FoldedPReLU, Folded, SignBits, Workspace

__all__ = ['binary_signs_scale', 'FoldedDownsample', 'FoldedFPDownsample', 'FoldedHead']


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def bn_affine(norm: nn.Module, dim: int, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a token BatchNorm (or BatchNorm, or Identity) in eval mode, in float64."""
    if isinstance(norm, nn.Identity):
        return ref.new_ones(dim, dtype=torch.float64), ref.new_zeros(dim, dtype=torch.float64)
    bn = getattr(norm, 'bn', norm)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f'cannot fold {type(norm).__name__}: expected a TokenBatchNorm or BatchNorm')
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError('a BatchNorm without running statistics normalises with batch statistics even in eval '
                         'mode and cannot be folded; deploy needs track_running_stats=True')
    scale = torch.rsqrt(f64(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = scale * f64(bn.weight)
    shift = -f64(bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + f64(bn.bias)
    return scale, shift


def rprelu(act: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift_in, slope, shift_out) of an RPReLU, in float64."""
    return f64(act.shift_in), f64(act.slope), f64(act.shift_out)


def affine(mod: nn.Module, dim: int, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(mod, nn.Identity):
        return ref.new_ones(dim, dtype=torch.float64), ref.new_zeros(dim, dtype=torch.float64)
    return f64(mod.alpha), f64(mod.beta)


def threshold(scale: torch.Tensor, offset: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sign(scale * x + offset) == flip * sign(x - theta)`` per channel (float64)."""
    nonzero = scale != 0
    theta = torch.where(nonzero, -offset / torch.where(nonzero, scale, torch.ones_like(scale)),
                        torch.full_like(scale, -math.inf))
    flip = torch.where(nonzero, torch.sign(scale), torch.sign(offset))
    return theta, flip


def binary_signs_scale(layer: nn.Module) -> Tuple[SignBits, torch.Tensor]:
    """Signs (as bits, rows = output channels) and per-output-channel scale (float64) of a binary layer's
    effective weight, ``effective = scale * signs``, from the layer's own ``binary_weight()`` (what its
    forward multiplies by), or from the ``(SignBits, scale)`` that :func:`~.packed.load_packed` attaches
    as ``_packed_effective`` (then the layer's weight is never read)."""
    packed = getattr(layer, '_packed_effective', None)
    if packed is not None:
        return packed
    eff = f64(layer.binary_weight())
    eff = eff.reshape(eff.shape[0], -1)
    return SignBits.from_signs(torch.sign(eff)), eff.abs().amax(dim=1)


def fold_unit(unit: nn.Module, act: nn.Module, in_const: torch.Tensor, shortcut_const: torch.Tensor,
              carry: torch.Tensor, dtype: torch.dtype, sign_shift: bool = True):
    """Fold ``RPReLU(U(x + in_const, x + shortcut_const))``, a binary unit and its activation.

    The deployed unit computes ``y = shortcut + bias + sign(x + in_shift) @ W^T`` and its PReLU
    turns ``y`` into ``PReLU(...) + carry`` in place; the RPReLU's output shift ``z`` is returned
    for the caller to fold onwards. ``sign_shift=False``: the caller passes ``x`` already shifted.
    """
    signs, a = binary_signs_scale(unit.linear)
    scale, shift = bn_affine(unit.norm, signs.rows, a)
    g, slope, z = rprelu(act)
    in_shift = f64(unit.linear.shift) + in_const if sign_shift else None
    folded = FoldedBinaryLinear(signs, a * scale, shift + shortcut_const - g + carry, in_shift, dtype)
    return folded, FoldedPReLU(slope, carry, dtype), z


# ---------------------------------------------------------------------------------------------
# Stage transitions and head


class FoldedDownsample(Folded):
    """Binary stage transition, folded: ``BN_0`` becomes the sign threshold (its sign flip goes into
    the conv weight) and the pooled shortcut's affine; ``BN`` and ``a`` scale the weight; the
    RPReLU is a PReLU; the RPReLU output shift and the next position embedding are one bias."""

    def __init__(self, ds: BinaryDownsample, pos_embed: torch.Tensor):
        super().__init__()
        conv = ds.conv
        ref = pos_embed
        dtype = ref.dtype
        cin, cout = conv.in_channels, conv.out_channels
        self.dim_in, self.repeats = cin, ds.repeats
        s0, t0 = bn_affine(ds.norm_in, cin, ref)
        theta, flip = threshold(s0, t0 + f64(conv.shift).reshape(cin))
        bits, a = binary_signs_scale(conv)
        signs = bits.signs().reshape(conv.weight.shape) * flip[None, :, None, None]  # (out, in, 2, 2)
        s, t = bn_affine(ds.norm, cout, ref)
        g, slope, z = rprelu(ds.act)
        # the 2x2 stride-2 conv as a binary linear layer on (kh, kw, in)-ordered patches
        self.conv = FoldedBinaryLinear(SignBits.from_signs(signs.permute(0, 2, 3, 1).reshape(cout, 4 * cin)), a * s,
                                       t - g + t0.repeat(self.repeats), (-theta).repeat(4), dtype)
        self._buf('short_scale', s0, dtype)
        self.act = FoldedPReLU(slope, torch.zeros_like(slope), dtype)
        self._buf('token_bias', z + f64(pos_embed).reshape(-1, cout), dtype)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int], ws: Workspace) -> torch.Tensor:
        B, _, cin = x.shape
        H2, W2 = feat_size[0] // 2, feat_size[1] // 2
        M2 = B * H2 * W2
        patches = ws('patches', B, H2, W2, 2, 2, cin)
        patches.copy_(x.view(B, H2, 2, W2, 2, cin).permute(0, 1, 3, 2, 4, 5))
        # shortcut: BN_0's scale times the 2x2 average (its shift is in the bias), repeated over the channels
        avg = F.avg_pool2d(x.view(B, 2 * H2, 2 * W2, cin).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        short = torch.mul(avg.reshape(M2, 1, cin), self.short_scale)
        N = self.repeats * cin
        y = x.new_empty(M2, N)
        self.conv.run_act(patches.view(M2, 4 * cin), short, y, ws, self.act, ws('act_tmp', M2, N), overwrite_input=True)
        return y.view(B, H2 * W2, -1).add_(self.token_bias)


class FoldedFPDownsample(Folded):
    """Full-precision stage transition ``BN(conv(BN_0(x)))`` + position embedding as one patch GEMM."""

    def __init__(self, ds: FullPrecisionDownsample, pos_embed: torch.Tensor):
        super().__init__()
        weight = f64(ds.conv.weight)  # (out, in, 2, 2)
        cout, cin = weight.shape[:2]
        s0, t0 = bn_affine(ds.norm_in, cin, weight)
        s, t = bn_affine(ds.norm, cout, weight)
        bias = (weight * t0[None, :, None, None]).sum(dim=(1, 2, 3)) * s + t
        weight = weight * s0[None, :, None, None] * s[:, None, None, None]
        self.conv = FoldedPatchConv(weight.permute(0, 2, 3, 1), bias + f64(pos_embed).reshape(-1, cout), 2,
                                    ds.conv.weight.dtype)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int], ws: Workspace) -> torch.Tensor:
        B, _, cin = x.shape
        H2, W2 = feat_size[0] // 2, feat_size[1] // 2
        patches = x.view(B, H2, 2, W2, 2, cin).permute(0, 1, 3, 2, 4, 5).reshape(B * H2 * W2, 4 * cin)
        return self.conv(patches, B)


class FoldedHead(Folded):
    """The final BatchNorm (kept for ``forward_features``) and its fold into the linear head."""

    def __init__(self, norm: nn.Module, head: nn.Module, dim: int, ref: torch.Tensor):
        super().__init__()
        s, t = bn_affine(norm, dim, ref)
        self._buf('norm_scale', s, ref.dtype)
        self._buf('norm_shift', t, ref.dtype)
        self.head = copy.deepcopy(head).requires_grad_(False)
        self.refold()

    def refold(self):
        head = self.head
        if isinstance(head, nn.Linear):
            w = f64(head.weight)
            s, t = f64(self.norm_scale), f64(self.norm_shift)
            bias = w @ t + (f64(head.bias) if head.bias is not None else 0.)
            self._buf('head_weight', w * s[None, :], head.weight.dtype)
            self._buf('head_bias', bias, head.weight.dtype)
        else:
            self.head_weight = self.head_bias = None

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.norm_shift, x, self.norm_scale)

    def fused(self, pooled_pre_norm: torch.Tensor) -> torch.Tensor:
        return F.linear(pooled_pre_norm, self.head_weight, self.head_bias)
