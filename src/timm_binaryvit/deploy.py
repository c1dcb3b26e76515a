"""Inference-only deployment and the packed 1-bit export of BinaryViT and the fully-binary DeiT-S.

:func:`deploy` turns a trained model into an inference-only twin whose eval logits equal the
training model's (up to floating-point rounding; bit-for-bit agreement of every sign is what
the tests check in float64):

* every binary weight is binarised once (its own ``binary_weight()``: ``a * sign(W - mean_in W)``
  or ``a * sign(W)``) and kept as int8 signs plus one scale per output channel; the token
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
* the final BatchNorm folds into the linear head (:meth:`forward` pools, then applies the folded
  head; :meth:`forward_features` still returns the normalised features);
* the elastic binariser becomes the threshold ``p > s/2`` (``round`` is half-to-even, so
  ``round(p/s) >= 1`` exactly when ``p/s > 1/2``) and its scale ``s`` folds into the context
  BatchNorm;
* on CPU, every binary product is an exact int8 x int8 -> int32 matmul (``torch._int_mm``), and
  the attention products (integers of at most ``max(d, N_k) <= 256``) run exactly in bfloat16;
* each layer runs in chunks of tokens sized so that all of a chunk's tensors (the FFN's
  ``E * C``-wide hidden activations included) stay in the CPU caches, in a few buffers reused by
  every layer of a stage: on CPU, fresh 100 MB tensors and passes over main memory cost more than
  the arithmetic on them;
* no custom autograd function, DropPath, dropout or checkpointing is left.

:func:`export_packed` writes the binary weights as bits (8 per byte) with one scale per output
channel to a safetensors file, everything else in its own dtype; :func:`load_packed` rebuilds
a training model (or, with ``deployed=True``, its deployed twin) with identical eval logits.
The format is described in :data:`PACKED_FORMAT` and ``docs_deploy.md``.
"""
import copy
import json
import math
import os
import statistics
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .binary_deit import BinaryDeiT
from .binaryvit import BinaryDownsample, BinaryViT, FullPrecisionDownsample
from .blocks import Block, check_image_input, tokens_to_grid

__all__ = [
    'deploy', 'DeployedBinaryViT', 'DeployedBinaryDeiT', 'is_deployed',
    'export_packed', 'load_packed', 'read_packed_metadata', 'PackedFormatError', 'PACKED_FORMAT',
    'PACKED_FORMAT_VERSION', 'benchmark_deploy', 'format_size_report',
]


# =============================================================================================
# Folding helpers (all folding arithmetic runs in float64, then is cast to the model's dtype)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _bn_affine(norm: nn.Module, dim: int, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a token BatchNorm (or BatchNorm, or Identity) in eval mode, in float64."""
    if isinstance(norm, nn.Identity):
        return ref.new_ones(dim, dtype=torch.float64), ref.new_zeros(dim, dtype=torch.float64)
    bn = getattr(norm, 'bn', norm)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f'cannot fold {type(norm).__name__}: expected a TokenBatchNorm or BatchNorm')
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError('a BatchNorm without running statistics normalises with batch statistics even in eval '
                         'mode and cannot be folded; deploy needs track_running_stats=True')
    scale = torch.rsqrt(_f64(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = scale * _f64(bn.weight)
    shift = -_f64(bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + _f64(bn.bias)
    return scale, shift


def _rprelu(act: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift_in, slope, shift_out) of an RPReLU, in float64."""
    return _f64(act.shift_in), _f64(act.slope), _f64(act.shift_out)


def _affine(mod: nn.Module, dim: int, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(mod, nn.Identity):
        return ref.new_ones(dim, dtype=torch.float64), ref.new_zeros(dim, dtype=torch.float64)
    return _f64(mod.alpha), _f64(mod.beta)


def _threshold(scale: torch.Tensor, offset: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sign(scale * x + offset) == flip * sign(x - theta)`` per channel (float64)."""
    nonzero = scale != 0
    theta = torch.where(nonzero, -offset / torch.where(nonzero, scale, torch.ones_like(scale)),
                        torch.full_like(scale, -math.inf))
    flip = torch.where(nonzero, torch.sign(scale), torch.sign(offset))
    return theta, flip


class _Workspace:
    """Buffers reused by every layer of a stage: keyed by role, shape and dtype, allocated once per call."""
    __slots__ = ('bufs', 'like')

    def __init__(self, like: torch.Tensor):
        self.bufs: Dict[Tuple, torch.Tensor] = {}
        self.like = like

    def __call__(self, tag: str, *shape: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.like.dtype
        key = (tag, dtype) + shape
        buf = self.bufs.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=self.like.device)
            self.bufs[key] = buf
        return buf


class _Folded(nn.Module):
    """Base for the deployed pieces: registers folded float64 tensors as buffers of the compute dtype."""

    def _buf(self, name: str, value: torch.Tensor, dtype: torch.dtype):
        if hasattr(self, name) and name not in self._buffers:
            delattr(self, name)
        self.register_buffer(name, value.to(dtype).contiguous())


class _PReLU(_Folded):
    """Per-channel PReLU with a constant carried through, in place on ``(M, C)``: ``y + c -> PReLU(y) + c``.

    The caller folds ``c`` (the shift the next sign needs) into the bias of the layer that
    produces ``y``, so the result is directly the input of that sign. With all slopes <= 1 this
    is ``max(y + c, slope * (y + c) + (1 - slope) * c)`` (two passes, no allocation); otherwise it
    falls back to :func:`torch.nn.functional.prelu`.
    """

    def __init__(self, slope: torch.Tensor, carry: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self._buf('slope', slope, dtype)
        self._buf('carry', carry, dtype)
        self._buf('offset', carry * (1 - slope), dtype)
        self.general = bool((slope > 1).any())

    def apply_(self, y: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
        if self.general:
            return y.copy_(F.prelu(y - self.carry, self.slope).add_(self.carry))
        torch.addcmul(self.offset, y, self.slope, out=tmp)
        return torch.maximum(y, tmp, out=y)


# Binary products with at least this fan-in run as int8 x int8 -> int32 matmuls on CPU: exact, and
# 4-5x faster than float32 there even for the 64-wide layers of stage 1 (bfloat16 would not be exact
# beyond a fan-in of 256). Raise it to keep small layers in float.
INT8_MIN_FAN_IN = 1


class _FoldedBinaryLinear(_Folded):
    """``out += sign(x + in_shift) @ (signs * scale)^T``: a binary linear layer whose per-output-channel
    scale ``a`` is multiplied by the folded BatchNorm scale; ``bias`` (BatchNorm shift and the other
    folded constants) is added by the caller together with the shortcut.

    On CPU, layers with a fan-in of at least :data:`INT8_MIN_FAN_IN` (all, by default) multiply int8
    signs by int8 signs into int32 (exact) and scale afterwards; the others (and every layer on other
    devices) multiply float ±1 signs by the scaled float weight.
    """

    def __init__(self, signs: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, in_shift: Optional[torch.Tensor],
                 dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = signs.shape[1], signs.shape[0]
        self.int8 = self.in_features >= INT8_MIN_FAN_IN
        if self.int8:
            self.register_buffer('signs', signs.to(torch.int8).contiguous())
            self._buf('scale', scale, dtype)
        else:
            self._buf('weight', signs * scale[:, None], dtype)
        self._buf('bias', bias, dtype)
        if in_shift is None:
            self.in_shift = None
        else:
            self._buf('in_shift', in_shift, dtype)

    def _signs(self, x: torch.Tensor, ws: _Workspace, overwrite_input: bool) -> torch.Tensor:
        M, K = x.shape
        if self.in_shift is not None:
            return torch.add(x, self.in_shift, out=ws('signs', M, K)).sign_()
        if overwrite_input:
            return x.sign_()
        return torch.sign(x, out=ws('signs', M, K))

    def _int8_product(self, signs: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        M, K = signs.shape
        signs8 = ws('signs8', M, K, dtype=torch.int8).copy_(signs)
        return torch._int_mm(signs8, self.signs.t(), out=ws('acc', M, self.out_features, dtype=torch.int32))

    def _float_weight(self) -> torch.Tensor:
        return self.weight if not self.int8 else self.signs.to(self.scale.dtype) * self.scale[:, None]

    def run(self, x: torch.Tensor, shortcut: torch.Tensor, out: torch.Tensor, ws: _Workspace,
            overwrite_input: bool = False) -> torch.Tensor:
        """``out = shortcut + bias + sign(x + in_shift) @ W^T`` for 2-D ``x`` (``shortcut`` broadcastable
        to ``out``'s view of the same shape); ``overwrite_input`` lets it take the signs in place."""
        if self.int8 and x.device.type == 'cpu':
            # the shortcut is read after the signs are taken: do not overwrite it
            overwrite_input = overwrite_input and x.data_ptr() != shortcut.data_ptr()
            acc = self._int8_product(self._signs(x, ws, overwrite_input), ws)
            accf = ws('accf', acc.shape[0], acc.shape[1]).copy_(acc)
            torch.addcmul(self.bias, accf, self.scale, out=out)
            if shortcut.dim() > 2:
                out.view(shortcut.shape[:-2] + (-1, shortcut.shape[-1])).add_(shortcut)
            else:
                out.add_(shortcut)
            return out
        if shortcut.dim() > 2:
            torch.add(shortcut, self.bias.view(-1, shortcut.shape[-1]),
                      out=out.view(shortcut.shape[0], -1, shortcut.shape[-1]))
        else:
            torch.add(shortcut, self.bias, out=out)
        return out.addmm_(self._signs(x, ws, overwrite_input), self._float_weight().t())


def _binary_signs_scale(layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Signs and per-output-channel scale of a binary layer's effective weight (float64), from the
    layer's own ``binary_weight()`` (what its forward multiplies by): ``effective = scale * signs``.

    :func:`load_packed` attaches the stored signs and scales as ``_packed_effective`` to the
    layers of the model it deploys, so that model multiplies by exactly the stored weights.
    """
    packed = getattr(layer, '_packed_effective', None)
    if packed is not None:
        return packed
    eff = _f64(layer.binary_weight())
    eff = eff.reshape(eff.shape[0], -1)
    return torch.sign(eff), eff.abs().amax(dim=1)


def _fold_unit(unit: nn.Module, act: nn.Module, in_const: torch.Tensor, shortcut_const: torch.Tensor,
               carry: torch.Tensor, dtype: torch.dtype, sign_shift: bool = True):
    """Fold ``RPReLU(U(x + in_const, x + shortcut_const))``, a binary unit and its activation.

    The deployed unit computes ``y = shortcut + bias + sign(x + in_shift) @ W^T`` and its PReLU
    turns ``y`` into ``PReLU(...) + carry`` in place; the RPReLU's output shift ``z`` is returned
    for the caller to fold onwards. ``sign_shift=False``: the caller passes ``x`` already shifted.
    """
    signs, a = _binary_signs_scale(unit.linear)
    scale, shift = _bn_affine(unit.norm, signs.shape[0], signs)
    g, slope, z = _rprelu(act)
    in_shift = _f64(unit.linear.shift) + in_const if sign_shift else None
    folded = _FoldedBinaryLinear(signs, a * scale, shift + shortcut_const - g + carry, in_shift, dtype)
    return folded, _PReLU(slope, carry, dtype), z


# =============================================================================================
# Deployed transformer layer


class DeployedBlock(_Folded):
    """One binary transformer layer with every BatchNorm, shift and scale folded (see the module doc).

    ``forward(x, feat_size, ws)`` updates the ``(B, N, C)`` residual stream ``x`` in place.
    Names: ``Y* = P* + c*`` where ``P*`` is a PReLU output and ``c*`` the shift of the sign that
    reads it, so each sign is taken of a tensor as it is.
    """

    def __init__(self, block: Block):
        super().__init__()
        attn, mlp = block.attn, block.mlp
        ref = attn.q.linear.weight
        dtype = ref.dtype
        C = attn.dim
        E = mlp.expansion
        self.dim, self.num_heads, self.head_dim, self.sr_ratio = C, attn.num_heads, attn.head_dim, attn.sr_ratio
        self.expansion = E
        zeros = ref.new_zeros(C, dtype=torch.float64)

        # norm1 -> u
        s1, t1 = _bn_affine(block.norm1, C, ref)
        self._buf('norm1_scale', s1, dtype)
        self._buf('norm1_shift', t1, dtype)

        # queries, keys, values: Y = PReLU(.) + z + (second shift)
        zq, zk, zv = _f64(attn.act_q.shift_out), _f64(attn.act_k.shift_out), _f64(attn.act_v.shift_out)
        cq, ck, cv = zq + _f64(attn.sign_q.shift), zk + _f64(attn.sign_k.shift), zv + _f64(attn.sign_v.shift)
        self.q, self.act_q, _ = _fold_unit(attn.q, attn.act_q, zeros, zeros, cq, dtype)
        if attn.kv_reduce is not None:
            self.kv_reduce, self.act_kv_reduce, zr = _fold_unit(
                attn.kv_reduce, attn.act_kv_reduce, zeros, zeros, zeros, dtype)
        else:
            self.kv_reduce, self.act_kv_reduce, zr = None, None, zeros
        self.k, self.act_k, _ = _fold_unit(attn.k, attn.act_k, zr, zr, ck, dtype)
        self.v, self.act_v, _ = _fold_unit(attn.v, attn.act_v, zr, zr, cv, dtype)

        # attention probabilities: s * [p / s > 1/2] for s > 0; identically 0 for s <= 0
        s = float(attn.prob_binarizer.scale.detach().reshape(()))
        self.attn_zero = not s > 0
        self._buf('prob_threshold', ref.new_tensor(s / 2 if s > 0 else 0., dtype=torch.float64), dtype)
        # (a 1-element vector, not a scalar, so that bfloat16 dot products get promoted, not the scale rounded)
        self._buf('attn_scale', ref.new_full((1,), 1.0 / math.sqrt(self.head_dim), dtype=torch.float64), dtype)

        # m = RPReLU_c(BN_c(ctx) + qa + ka + va); the proj sign reads m + b_o = PReLU(.) + z_c + b_o
        sc, tc = _bn_affine(attn.norm_ctx, C, ref)
        gc, slope_c, zc = _rprelu(attn.act_ctx)
        bo = _f64(attn.proj.linear.shift)
        self._buf('ctx_scale', sc * (s if s > 0 else 0.), dtype)
        self._buf('ctx_bias', tc + zq + zk + zv - gc + (zc + bo) - cq - ck - cv, dtype)
        self.act_ctx = _PReLU(slope_c, zc + bo, dtype)
        # output projection: sign input is the carried tensor itself; the shortcut m = it - b_o
        self.proj, self.act_proj, zo = _fold_unit(attn.proj, attn.act_proj, zeros, -bo, zeros, dtype, sign_shift=False)
        a1, b1 = _affine(block.affine1, C, ref)
        self._buf('affine1_alpha', a1, dtype)
        self._buf('residual1', a1 * zo + b1, dtype)
        self.affine1 = not isinstance(block.affine1, nn.Identity)

        # FFN: w = norm2(x); t = RPReLU_1(U_1(w, [w]*E)); z = RPReLU_2(U_2(t, pool_E(t)))
        s2, t2 = _bn_affine(block.norm2, C, ref)
        self._buf('norm2_scale', s2, dtype)
        self._buf('norm2_shift', t2, dtype)
        z1 = _f64(mlp.act1.shift_out)
        b2 = _f64(mlp.fc2.linear.shift)
        # Y1 = PReLU(.) + z1 + b2 is the fc2 sign input; the fc2 shortcut pool_E(t) = pool_E(Y1) - pool_E(b2)
        self.fc1, self.act1, _ = _fold_unit(mlp.fc1, mlp.act1, zeros, zeros.repeat(E), z1 + b2, dtype)
        self.fc2, self.act2, z2 = _fold_unit(mlp.fc2, mlp.act2, zeros, -b2.view(C, E).mean(-1), zeros, dtype,
                                             sign_shift=False)
        self._buf('group_mean', ref.new_full((E,), 1.0 / E, dtype=torch.float64), dtype)
        a2, b2_ = _affine(block.affine2, C, ref)
        residual2 = a2 * z2 + b2_

        # multi-branch pooling: one depthwise 5x5 convolution of w plus constant betas
        if block.pool is not None:
            kernel = ref.new_zeros(C, 1, 5, 5, dtype=torch.float64)
            pool = block.pool
            kernel[:, 0, 1:4, 2] += _f64(pool.h3.alpha)[:, None] / 3
            kernel[:, 0, 2, 1:4] += _f64(pool.w3.alpha)[:, None] / 3
            kernel[:, 0, 0:5, 2] += _f64(pool.h5.alpha)[:, None] / 5
            kernel[:, 0, 2, 0:5] += _f64(pool.w5.alpha)[:, None] / 5
            self._buf('pool_kernel', kernel, dtype)
            residual2 = residual2 + _f64(pool.h3.beta) + _f64(pool.w3.beta) + _f64(pool.h5.beta) + _f64(pool.w5.beta)
            self.has_pool = True
        else:
            self.has_pool = False
        self._buf('affine2_alpha', a2, dtype)
        self._buf('residual2', residual2, dtype)
        self.affine2 = not isinstance(block.affine2, nn.Identity)

    #: Token rows per chunk are chosen so that a chunk's FFN hidden activations hold about this many
    #: values: every tensor of a chunk then stays in the CPU caches between the passes over it.
    chunk_elements = 2 ** 19

    def _chunks(self, rows: int, unit: int, width: int) -> List[Tuple[int, int]]:
        size = max(unit, (self.chunk_elements // width) // unit * unit)
        return [(r0, min(rows, r0 + size)) for r0 in range(0, rows, size)]

    #: Images per attention batch are chosen so that their attention scores hold about this many values.
    attention_elements = 2 ** 20

    def _heads(self, signs: torch.Tensor, g: int, n: int, out: torch.Tensor) -> torch.Tensor:
        # (g * n, C) token-major -> (g * h, n, d) head-major (a view for one head, else a copy into out)
        h, d = self.num_heads, self.head_dim
        if h == 1:
            return signs.view(g, n, d)
        out.view(g, h, n, d).copy_(signs.view(g, n, h, d).transpose(1, 2))
        return out

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int], ws: _Workspace) -> torch.Tensor:
        B, N, C = x.shape
        M = B * N
        h, d, E, R = self.num_heads, self.head_dim, self.expansion, self.sr_ratio
        x2 = x.view(M, C)
        reduce = self.kv_reduce is not None
        H, W = feat_size
        Hr, Wr = (H // R, W // R) if reduce else (H, W)
        Nk = Hr * Wr if reduce else N
        Mk = B * Nk
        # The attention products multiply signs by signs (and 0/1 by signs): integers of at most
        # max(d, N_k) in magnitude, exact in bfloat16 up to 256, where bfloat16 matmuls are ~2x faster on CPU.
        low = torch.bfloat16 if x.device.type == 'cpu' and d <= 256 and Nk <= 256 else x.dtype
        sig = dict(dtype=low)

        # ---- 1. per chunk of tokens: u = norm1(x); Y = PReLU(unit(u)) + c for q (k, v); their signs
        yq, qsig = ws('yq', M, C), ws('qsig', M, C, **sig)
        if reduce:
            pooled = ws('pooled', Mk, C)
        else:
            yk, yv, ksig, vsig = ws('yk', M, C), ws('yv', M, C), ws('ksig', M, C, **sig), ws('vsig', M, C, **sig)

        def phase1(r0: int, r1: int, cws: _Workspace):
            n = r1 - r0
            tmp = cws('tmp', n, C)
            u = torch.addcmul(self.norm1_shift, x2[r0:r1], self.norm1_scale, out=cws('u', n, C))
            self.act_q.apply_(self.q.run(u, u, yq[r0:r1], cws), tmp)
            qsig[r0:r1].copy_(torch.sign(yq[r0:r1], out=tmp))
            if reduce:
                # R x R average pool of these n // W grid rows (channels-last pooling: no transposes)
                grid_rows = F.avg_pool2d(u.view(1, n // W, W, C).permute(0, 3, 1, 2), R)
                pooled[r0 // (R * R):r1 // (R * R)].view(1, n // (W * R), Wr, C).copy_(grid_rows.permute(0, 2, 3, 1))
            else:
                self.act_k.apply_(self.k.run(u, u, yk[r0:r1], cws), tmp)
                ksig[r0:r1].copy_(torch.sign(yk[r0:r1], out=tmp))
                self.act_v.apply_(self.v.run(u, u, yv[r0:r1], cws), tmp)
                vsig[r0:r1].copy_(torch.sign(yv[r0:r1], out=tmp))

        for r0, r1 in self._chunks(M, R * W if reduce else 1, 2 * C):
            phase1(r0, r1, ws)
        if reduce:  # keys and values from the R x R-pooled grid (few tokens: no chunks)
            ktmp = ws('ktmp', Mk, C)
            kv = self.kv_reduce.run(pooled, pooled, ws('ykv', Mk, C), ws)
            self.act_kv_reduce.apply_(kv, ktmp)
            yk, yv = ws('yk', Mk, C), ws('yv', Mk, C)
            self.act_k.apply_(self.k.run(kv, kv, yk, ws), ktmp)
            ksig = ws('ksig', Mk, C, **sig).copy_(torch.sign(yk, out=ktmp))
            self.act_v.apply_(self.v.run(kv, kv, yv, ws), ktmp)
            vsig = ws('vsig', Mk, C, **sig).copy_(torch.sign(yv, out=ktmp))
            kvsum = yk.add_(yv)  # nearest upsampling commutes with the sum

        # ---- 2. per group of images: binary attention, and the context-norm input acc = BN_c(ctx) + qa + ka + va
        acc = yq

        def phase2(b0: int, b1: int, cws: _Workspace):
            g = b1 - b0
            rows, krows = slice(b0 * N, b1 * N), slice(b0 * Nk, b1 * Nk)
            acc_g = acc[rows]
            if not self.attn_zero:
                qh = self._heads(qsig[rows], g, N, cws('qh', g * h, N, d, **sig))
                kh = self._heads(ksig[krows], g, Nk, cws('kh', g * h, Nk, d, **sig))
                vh = self._heads(vsig[krows], g, Nk, cws('vh', g * h, Nk, d, **sig))
                dots = torch.bmm(qh, kh.transpose(1, 2), out=cws('dots', g * h, N, Nk, **sig))
                scores = torch.mul(dots, self.attn_scale, out=cws('scores', g * h, N, Nk))
                probs = torch.softmax(scores, -1, out=cws('probs', g * h, N, Nk))
                mask = torch.gt(probs, self.prob_threshold, out=dots)
                ctx = torch.bmm(mask, vh, out=cws('ctx', g * h, N, d, **sig))
                acc_g.view(g, N, h, d).addcmul_(ctx.view(g, h, N, d).transpose(1, 2), self.ctx_scale.view(h, d))
            if reduce:
                acc_g.view(g * Hr, R, Wr, R, C).add_(kvsum[krows].view(g * Hr, 1, Wr, 1, C))
            else:
                acc_g.add_(yk[rows]).add_(yv[rows])
            acc_g.add_(self.ctx_bias)
            self.act_ctx.apply_(acc_g, cws('tmp_img', g * N, C))

        group = max(1, min(B, self.attention_elements // (h * N * Nk)))
        for b0 in range(0, B, group):
            phase2(b0, min(B, b0 + group), ws)

        # ---- 3. per chunk: output projection, residual; w = norm2(x); FFN, residual
        wfull = ws('w', M, C) if self.has_pool else None

        def phase3(r0: int, r1: int, cws: _Workspace):
            n = r1 - r0
            tmp = cws('tmp', n, C)
            xc = x2[r0:r1]
            yo = self.proj.run(acc[r0:r1], acc[r0:r1], cws('yo', n, C), cws, overwrite_input=True)
            self.act_proj.apply_(yo, tmp)
            if self.affine1:
                xc.addcmul_(yo, self.affine1_alpha)
            else:
                xc.add_(yo)
            xc.add_(self.residual1)
            w = torch.addcmul(self.norm2_shift, xc, self.norm2_scale,
                              out=wfull[r0:r1] if wfull is not None else cws('u', n, C))
            hidden = self.fc1.run(w, w.view(n, 1, C), cws('hidden', n, E * C), cws)  # shortcut [w, w, ..., w]
            self.act1.apply_(hidden, cws('htmp', n, E * C))
            # pool_E (the mean of E consecutive channels) as a matrix-vector product: faster than sum(-1)
            pooled = torch.mm(hidden.view(n * C, E), self.group_mean.view(E, 1), out=cws('pool', n * C, 1))
            y2 = self.fc2.run(hidden, pooled.view(n, C), cws('y2', n, C), cws, overwrite_input=True)
            self.act2.apply_(y2, tmp)
            if self.affine2:
                xc.addcmul_(y2, self.affine2_alpha)
            else:
                xc.add_(y2)
            xc.add_(self.residual2)

        for r0, r1 in self._chunks(M, 1, E * C):
            phase3(r0, r1, ws)

        # ---- 4. pooling branches of the normalised FFN input (a depthwise 5x5 convolution)
        if self.has_pool:
            grid = wfull.view(B, H, W, C).permute(0, 3, 1, 2)
            pooled_branches = F.conv2d(grid, self.pool_kernel, None, 1, 2, 1, C)
            x.view(B, H, W, C).add_(pooled_branches.permute(0, 2, 3, 1))
        return x


# =============================================================================================
# Deployed stems, stage transitions, heads


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B * H/p * W/p, C * p * p)`` non-overlapping patches, conv weight order."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B * (H // p) * (W // p), C * p * p)


class _FoldedPatchConv(_Folded):
    """A full-precision ``p x p`` stride-``p`` convolution (BatchNorms folded in) plus a per-token
    bias (position embedding), as one GEMM on patches; output ``(B, N, C)`` tokens."""

    def __init__(self, weight: torch.Tensor, token_bias: torch.Tensor, patch: int, dtype: torch.dtype):
        super().__init__()
        self.patch = patch
        self._buf('weight', weight.reshape(weight.shape[0], -1), dtype)
        self._buf('token_bias', token_bias, dtype)  # (N, C)

    def forward(self, patches: torch.Tensor, B: int) -> torch.Tensor:
        N, C = self.token_bias.shape
        out = self.token_bias.expand(B, N, C).contiguous()
        out.view(B * N, C).addmm_(patches, self.weight.t())
        return out


class _DeployedBinaryDownsample(_Folded):
    """Binary stage transition, folded: ``BN_0`` becomes the sign threshold (its sign flip goes into
    the conv weight) and the pooled shortcut's affine; ``BN`` and ``a`` scale the weight; the
    RPReLU is a PReLU; the RPReLU output shift and the next position embedding are one bias."""

    def __init__(self, ds: BinaryDownsample, pos_embed: torch.Tensor):
        super().__init__()
        conv = ds.conv
        ref = conv.weight
        dtype = ref.dtype
        cin, cout = conv.in_channels, conv.out_channels
        self.dim_in, self.repeats = cin, ds.repeats
        s0, t0 = _bn_affine(ds.norm_in, cin, ref)
        theta, flip = _threshold(s0, t0 + _f64(conv.shift).reshape(cin))
        signs, a = _binary_signs_scale(conv)
        signs = signs.reshape(conv.weight.shape) * flip[None, :, None, None]  # (out, in, 2, 2)
        s, t = _bn_affine(ds.norm, cout, ref)
        g, slope, z = _rprelu(ds.act)
        # the 2x2 stride-2 conv as a binary linear layer on (kh, kw, in)-ordered patches
        self.conv = _FoldedBinaryLinear(signs.permute(0, 2, 3, 1).reshape(cout, 4 * cin), a * s,
                                        t - g + t0.repeat(self.repeats), (-theta).repeat(4), dtype)
        self._buf('short_scale', s0, dtype)
        self.act = _PReLU(slope, torch.zeros_like(slope), dtype)
        self._buf('token_bias', z + _f64(pos_embed).reshape(-1, cout), dtype)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int], ws: _Workspace) -> torch.Tensor:
        B, _, cin = x.shape
        H2, W2 = feat_size[0] // 2, feat_size[1] // 2
        M2 = B * H2 * W2
        patches = ws('patches', B, H2, W2, 2, 2, cin)
        patches.copy_(x.view(B, H2, 2, W2, 2, cin).permute(0, 1, 3, 2, 4, 5))
        # shortcut: BN_0's scale times the 2x2 average (its shift is in the bias), repeated over the channels
        avg = F.avg_pool2d(x.view(B, 2 * H2, 2 * W2, cin).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        short = torch.mul(avg.reshape(M2, 1, cin), self.short_scale)
        y = self.conv.run(patches.view(M2, 4 * cin), short, x.new_empty(M2, self.repeats * cin), ws,
                          overwrite_input=True)
        self.act.apply_(y, torch.empty_like(y))
        return y.view(B, H2 * W2, -1).add_(self.token_bias)


class _DeployedFPDownsample(_Folded):
    """Full-precision stage transition ``BN(conv(BN_0(x)))`` + position embedding as one patch GEMM."""

    def __init__(self, ds: FullPrecisionDownsample, pos_embed: torch.Tensor):
        super().__init__()
        weight = _f64(ds.conv.weight)  # (out, in, 2, 2)
        cout, cin = weight.shape[:2]
        s0, t0 = _bn_affine(ds.norm_in, cin, weight)
        s, t = _bn_affine(ds.norm, cout, weight)
        bias = (weight * t0[None, :, None, None]).sum(dim=(1, 2, 3)) * s + t
        weight = weight * s0[None, :, None, None] * s[:, None, None, None]
        self.conv = _FoldedPatchConv(weight.permute(0, 2, 3, 1), bias + _f64(pos_embed).reshape(-1, cout), 2,
                                     ds.conv.weight.dtype)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int], ws: _Workspace) -> torch.Tensor:
        B, _, cin = x.shape
        H2, W2 = feat_size[0] // 2, feat_size[1] // 2
        patches = x.view(B, H2, 2, W2, 2, cin).permute(0, 1, 3, 2, 4, 5).reshape(B * H2 * W2, 4 * cin)
        return self.conv(patches, B)


class _FoldedHead(_Folded):
    """The final BatchNorm (kept for :meth:`forward_features`) and its fold into the linear head."""

    def __init__(self, norm: nn.Module, head: nn.Module, dim: int, ref: torch.Tensor):
        super().__init__()
        s, t = _bn_affine(norm, dim, ref)
        self._buf('norm_scale', s, ref.dtype)
        self._buf('norm_shift', t, ref.dtype)
        self.head = copy.deepcopy(head).requires_grad_(False)
        self.refold()

    def refold(self):
        head = self.head
        if isinstance(head, nn.Linear):
            w = _f64(head.weight)
            s, t = _f64(self.norm_scale), _f64(self.norm_shift)
            bias = w @ t + (_f64(head.bias) if head.bias is not None else 0.)
            self._buf('head_weight', w * s[None, :], head.weight.dtype)
            self._buf('head_bias', bias, head.weight.dtype)
        else:
            self.head_weight = self.head_bias = None

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.norm_shift, x, self.norm_scale)

    def fused(self, pooled_pre_norm: torch.Tensor) -> torch.Tensor:
        return F.linear(pooled_pre_norm, self.head_weight, self.head_bias)


# =============================================================================================
# Deployed models


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self._tokens(x)
            if self._fused_ok():
                return self._fused_head(tokens)
            return self.forward_head(self._features_from_tokens(tokens))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
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
        ref = model.patch_embed.proj.weight
        dtype = ref.dtype
        stem = model.patch_embed
        w = _f64(stem.proj.weight)
        C = w.shape[0]
        s, t = _bn_affine(stem.norm, C, ref)
        bias = (_f64(stem.proj.bias) if stem.proj.bias is not None else 0.) * s + t
        self.stem = _FoldedPatchConv(w * s[:, None, None, None], bias + _f64(model.stages[0].pos_embed).reshape(-1, C),
                                     stem.patch_size, dtype)
        self.downsamples = nn.ModuleList()
        self.stages = nn.ModuleList()
        for stage in model.stages:
            if isinstance(stage.downsample, BinaryDownsample):
                self.downsamples.append(_DeployedBinaryDownsample(stage.downsample, stage.pos_embed))
            elif isinstance(stage.downsample, FullPrecisionDownsample):
                self.downsamples.append(_DeployedFPDownsample(stage.downsample, stage.pos_embed))
            else:
                self.downsamples.append(nn.Identity())
            self.stages.append(nn.ModuleList([DeployedBlock(b) for b in stage.blocks]))
        self.head_fold = _FoldedHead(model.norm, model.head, self.num_features, ref)
        self.requires_grad_(False)
        self.eval()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.img_size, 'BinaryViT')
        x = self.stem(_patches(x, self.patch_size), x.shape[0])
        feat_size = self._grids[0]
        for i, (ds, blocks) in enumerate(zip(self.downsamples, self.stages)):
            ws = _Workspace(x)
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
        dtype = ref.dtype
        w = _f64(ref)
        C = w.shape[0]
        bias = _f64(model.patch_embed.proj.bias) if model.patch_embed.proj.bias is not None else w.new_zeros(C)
        pos = _f64(model.pos_embed).reshape(-1, C)
        npre = self.num_prefix_tokens
        self.stem = _FoldedPatchConv(w, bias + pos[npre:], model.patch_embed.patch_size, dtype)
        if model.cls_token is not None:
            self.register_buffer('cls_pos', (_f64(model.cls_token).reshape(1, C) + pos[:1]).to(dtype))
        else:
            self.cls_pos = None
        self.blocks = nn.ModuleList([DeployedBlock(b) for b in model.blocks])
        self.head_fold = _FoldedHead(model.norm, model.head, self.embed_dim, ref)
        self.requires_grad_(False)
        self.eval()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, self.img_size, 'BinaryDeiT')
        B = x.shape[0]
        x = self.stem(_patches(x, self.patch_size), B)
        if self.cls_pos is not None:
            x = torch.cat([self.cls_pos.expand(B, 1, -1), x], dim=1)
        ws = _Workspace(x)
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
    its eval logits equal the training model's up to floating-point rounding.
    A deployed model is returned unchanged.
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


# =============================================================================================
# Packed 1-bit export

PACKED_FORMAT = 'timm-binaryvit-packed'
PACKED_FORMAT_VERSION = 1

#: How the packed tensors are encoded; written into every file's metadata as ``encoding``.
PACKED_ENCODING = {
    'layout': 'each binary weight W of shape (out, ...) is stored as three tensors: <name>.bits (uint8, '
              'shape (out, ceil(n / 8)), n = the product of the other dims of W, taken in row-major order), '
              '<name>.scale (one per output channel, in the dtype of W) and <name>.zeros (int64 flat indices)',
    'bit_order': 'big',
    'bit_order_meaning': 'element j of an output channel is bit (7 - j % 8) of byte j // 8 of that channel '
                         '(numpy.packbits(..., axis=-1, bitorder="big")); each channel starts on a new byte and '
                         'the padding bits are 0',
    'bit_1': '+1',
    'bit_0': '-1',
    'zeros': '<name>.zeros lists the flat indices (row-major over the original shape) of the elements whose '
             'sign is 0 (the forward uses sign(0) = 0); they are stored as bit 0 and must be set to 0 after '
             'unpacking; usually empty',
    'effective_weight': 'W_eff[o] = scale[o] * value[o]: exactly the weight the model multiplies by',
    'binarization': {
        'linear': 'value = sign(W - mean over the input dim of W), scale = mean over the input dim of |W|',
        'conv2d': 'value = sign(W), scale = mean over (in, kh, kw) of |W|',
    },
    'other_tensors': 'every other state-dict entry is stored under its own name in its own dtype',
}


class PackedFormatError(ValueError):
    """A file given to :func:`load_packed` is not a valid packed model; the message names the file and the problem."""


def _model_args(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
    """(class name, constructor kwargs) that rebuild ``model``'s architecture."""
    if isinstance(model, BinaryViT):
        return 'BinaryViT', dict(
            img_size=list(model.img_size), in_chans=model.in_chans, num_classes=model.num_classes,
            global_pool=model.global_pool, embed_dims=list(model.embed_dims), depths=list(model.depths),
            num_heads=list(model.num_heads), mlp_ratios=list(model.mlp_ratios), sr_ratios=list(model.sr_ratios),
            patch_size=model.patch_size, fp_transitions=bool(model.fp_transitions))
    if isinstance(model, BinaryDeiT):
        return 'BinaryDeiT', dict(
            img_size=list(model.img_size), patch_size=model.patch_size, in_chans=model.in_chans,
            num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim,
            depth=model.depth, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
            class_token=model.cls_token is not None, multi_branch_pool=bool(model.multi_branch_pool),
            affine=bool(model.affine))
    if is_deployed(model):
        raise TypeError('export_packed() needs the training model, not a deployed one (deploy() folds the '
                        'BatchNorms into the binary weights, which the packed format keeps apart)')
    raise TypeError(f'export_packed() takes a BinaryViT or BinaryDeiT model of timm_binaryvit, '
                    f'got {type(model).__name__}')


def _binary_layers(model: nn.Module) -> Dict[str, Tuple[nn.Module, str]]:
    """State-dict key of every binary weight -> (layer, kind)."""
    from .layers import BinaryConv2d, BinaryLinear
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, BinaryLinear):
            found[f'{name}.weight'] = (module, 'linear')
        elif isinstance(module, BinaryConv2d):
            found[f'{name}.weight'] = (module, 'conv2d')
    return found


def _pack_bits(values: torch.Tensor) -> torch.Tensor:
    """``(out, n)`` values in {-1, 0, +1} -> ``(out, ceil(n / 8))`` uint8, bit 1 for +1, big bit order."""
    out, n = values.shape
    bits = (values > 0).to(torch.uint8)
    pad = (-n) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(out, pad)], dim=1)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits.view(out, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits` without the zeros: ``(out, n)`` float64 ±1."""
    masks = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) & masks) != 0
    bits = bits.reshape(packed.shape[0], -1)[:, :n]
    return torch.where(bits, 1.0, -1.0).to(torch.float64)


def _float32_checkpoint_bytes(model: nn.Module) -> int:
    import safetensors.torch
    state = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}
    return len(safetensors.torch.save(state))


def export_packed(model: nn.Module, path: str) -> Dict[str, Any]:
    """Write ``model`` (a BinaryViT / BinaryDeiT training model) as a packed 1-bit safetensors file.

    Binary weights are stored as their effective signs, 8 per byte, with one scale per output
    channel (and the positions of exact zeros); everything else in its own dtype. The metadata
    holds the format name and version, the encoding (:data:`PACKED_ENCODING`), the architecture
    name, the constructor kwargs and the pretrained config, so :func:`load_packed` can rebuild
    the model without other information.

    Returns a dict: ``path``, ``packed_bytes`` (the file), ``float32_bytes`` (the model's float32
    state dict as a safetensors file), ``ratio`` (float32 / packed), ``binary_tensors``,
    ``binary_weights`` (number of 1-bit values), ``other_values``, ``zeros`` (exact zeros stored).
    """
    import safetensors.torch
    cls_name, args = _model_args(model)
    architecture = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or ''
    _check_rebuild(cls_name, architecture, args, model, str(path))
    binary = _binary_layers(model)
    state = model.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    entries: Dict[str, Any] = {}
    n_binary = n_zeros = n_other = 0
    with torch.no_grad():
        for key, value in state.items():
            if key in binary:
                layer, kind = binary[key]
                eff = layer.binary_weight().detach()
                rows = eff.reshape(eff.shape[0], -1)
                signs = torch.sign(rows)
                scale = rows.abs().amax(dim=1)
                if not torch.equal(scale[:, None] * signs, rows):
                    raise ValueError(f'{key}: the effective binary weight is not one scale per output channel '
                                     f'times a sign; cannot pack it')
                zeros = torch.nonzero(signs.reshape(-1) == 0).reshape(-1).to(torch.int64)
                tensors[f'{key}.bits'] = _pack_bits(signs.cpu())
                tensors[f'{key}.scale'] = scale.cpu().contiguous()
                tensors[f'{key}.zeros'] = zeros.cpu()
                entries[key] = dict(shape=list(value.shape), kind=kind, dtype=str(value.dtype).replace('torch.', ''),
                                    bits=f'{key}.bits', scale=f'{key}.scale', zeros=f'{key}.zeros')
                n_binary += signs.numel()
                n_zeros += zeros.numel()
            else:
                tensors[key] = value.detach().cpu().contiguous()
                n_other += value.numel()
    pretrained_cfg = getattr(model, 'pretrained_cfg', None) or {}
    metadata = {
        'format': PACKED_FORMAT,
        'format_version': str(PACKED_FORMAT_VERSION),
        'architecture': architecture,
        'model_class': cls_name,
        'model_args': json.dumps(args),
        'pretrained_cfg': json.dumps(pretrained_cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)),
        'encoding': json.dumps(PACKED_ENCODING),
        'packed': json.dumps(entries),
    }
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    packed_bytes = os.path.getsize(path)
    fp32 = _float32_checkpoint_bytes(model)
    return dict(path=str(path), packed_bytes=packed_bytes, float32_bytes=fp32, ratio=fp32 / packed_bytes,
                binary_tensors=len(entries), binary_weights=n_binary, other_values=n_other, zeros=n_zeros)


def format_size_report(info: Dict[str, Any]) -> str:
    """Two lines comparing the float32 checkpoint and the packed file, from :func:`export_packed`'s result."""
    return (f'float32 safetensors: {info["float32_bytes"]:,} bytes ({info["float32_bytes"] / 2 ** 20:.2f} MiB)\n'
            f'packed 1-bit file:   {info["packed_bytes"]:,} bytes ({info["packed_bytes"] / 2 ** 20:.2f} MiB), '
            f'{info["ratio"]:.1f}x smaller ({info["binary_weights"]:,} binary weights in {info["binary_tensors"]} '
            f'tensors, {info["other_values"]:,} other values)')


def _build(cls_name: str, architecture: str, args: Dict[str, Any], device=None) -> nn.Module:
    import timm
    if architecture and timm.is_model(architecture):
        try:
            model = timm.create_model(architecture, pretrained=False, device=device, **args)
        except TypeError:  # an entrypoint that fixes one of the arguments itself: build the class directly
            model = None
        if model is not None and type(model).__name__ == cls_name:
            return model
    classes = {'BinaryViT': BinaryViT, 'BinaryDeiT': BinaryDeiT}
    if cls_name not in classes:
        raise KeyError(f'unknown model class {cls_name!r} (expected one of {sorted(classes)})')
    return classes[cls_name](device=device, **args)


def _check_rebuild(cls_name, architecture, args, model, path):
    rebuilt = _build(cls_name, architecture, args, device='meta')
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got.get(k)]
        raise ValueError(f'{path}: cannot export this {cls_name}: rebuilding it from its constructor arguments gives '
                         f'a different state dict (was it pruned or modified after construction?): {diff[:5]}')


# ---------------------------------------------------------------------------------------------
# Loading


def read_packed_metadata(path: str) -> Dict[str, Any]:
    """The decoded metadata of a packed file (format, version, architecture, model_args, packed entries...)."""
    return _read_packed(path)[0]


def _read_packed(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    from safetensors import safe_open
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such packed model file')
    try:
        with safe_open(path, framework='pt') as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for truncated / corrupt files
        raise PackedFormatError(f'{path}: not a readable safetensors file (truncated or corrupt?): {e}') from e
    fmt = raw.get('format')
    if fmt != PACKED_FORMAT:
        raise PackedFormatError(
            f'{path}: not a {PACKED_FORMAT} file (its metadata has format={fmt!r}); packed files are written by '
            f'timm_binaryvit.export_packed, plain checkpoints load with timm.create_model / load_state_dict')
    try:
        version = int(raw.get('format_version', ''))
    except ValueError:
        raise PackedFormatError(f'{path}: bad format_version {raw.get("format_version")!r}') from None
    if version > PACKED_FORMAT_VERSION or version < 1:
        raise PackedFormatError(f'{path}: format version {version} is not supported by this timm_binaryvit '
                                f'(it reads versions 1 to {PACKED_FORMAT_VERSION}); upgrade timm_binaryvit')
    meta: Dict[str, Any] = dict(format=fmt, format_version=version, architecture=raw.get('architecture', ''),
                                model_class=raw.get('model_class', ''))
    for field in ('model_args', 'packed', 'pretrained_cfg', 'encoding'):
        if field not in raw:
            raise PackedFormatError(f'{path}: the metadata lacks {field!r}')
        try:
            meta[field] = json.loads(raw[field])
        except json.JSONDecodeError as e:
            raise PackedFormatError(f'{path}: the metadata field {field!r} is not valid JSON: {e}') from None
    if meta['encoding'].get('bit_order') != 'big':
        raise PackedFormatError(f'{path}: unsupported bit order {meta["encoding"].get("bit_order")!r}')
    return meta, tensors


def _unpack_entry(path: str, key: str, entry: Dict[str, Any], tensors: Dict[str, torch.Tensor]):
    """(signs (out, n) float64 in {-1, 0, 1}, scale (out,), shape, kind) of one packed weight, validated."""
    try:
        shape = [int(d) for d in entry['shape']]
        kind = entry['kind']
        names = entry['bits'], entry['scale'], entry['zeros']
    except (KeyError, TypeError, ValueError) as e:
        raise PackedFormatError(f'{path}: the packed entry {key!r} is malformed ({e!r})') from None
    if kind not in ('linear', 'conv2d') or len(shape) != (2 if kind == 'linear' else 4):
        raise PackedFormatError(f'{path}: the packed entry {key!r} has kind {kind!r} with shape {shape}')
    missing = [n for n in names if n not in tensors]
    if missing:
        raise PackedFormatError(f'{path}: {key!r} is listed as packed but the file lacks {missing}')
    bits, scale, zeros = (tensors[n] for n in names)
    out = shape[0]
    n = math.prod(shape[1:])
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (out, (n + 7) // 8):
        raise PackedFormatError(f'{path}: {names[0]!r} should be uint8 of shape {(out, (n + 7) // 8)} for a weight '
                                f'of shape {shape}, got {bits.dtype} {tuple(bits.shape)}')
    if not scale.is_floating_point() or tuple(scale.shape) != (out,):
        raise PackedFormatError(f'{path}: {names[1]!r} should be one float per output channel ({out}), got '
                                f'{scale.dtype} {tuple(scale.shape)}')
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise PackedFormatError(f'{path}: {names[1]!r} has negative or non-finite scales')
    if zeros.dtype != torch.int64 or zeros.dim() != 1:
        raise PackedFormatError(f'{path}: {names[2]!r} should be a 1-D int64 tensor, got {zeros.dtype} '
                                f'{tuple(zeros.shape)}')
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= out * n):
        raise PackedFormatError(f'{path}: {names[2]!r} has indices outside the weight ({out * n} elements)')
    signs = _unpack_bits(bits, n)
    if zeros.numel():
        signs.view(-1)[zeros] = 0.
    return signs, scale, shape, kind


def _latent_weight(signs: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype):
    """A latent weight ``(out, n)`` of ``dtype`` that the training model binarises back to exactly
    ``scale * signs``, and a bool per row saying whether that is guaranteed.

    Each row is ``v * g`` with integers ``v`` (all partial sums exact) and a power of two ``g``
    chosen so that the row's mean absolute value, as torch computes it (sum, then divide),
    rounds exactly to the stored scale. Linear rows with exact zeros get a zero row sum so that
    the centring leaves those entries exactly 0. Magnitudes stay close to the scale, like the
    ``±a`` a trained latent weight binarises to, so the result also fine-tunes normally.
    """
    out, n = signs.shape
    bits = 1 - int(round(math.log2(torch.finfo(dtype).eps)))
    a = scale.to(dtype)
    a64 = a.to(torch.float64)
    pos = (signs > 0).sum(1)
    neg = (signs < 0).sum(1)
    nz = pos + neg
    has_zero = nz < n
    zero_sum = (kind == 'linear') & has_zero & (pos > 0) & (neg > 0)
    # unit g: a power of two putting the target sum a * n in [2^(bits-1), 2^bits) units
    target = a64 * n
    safe = torch.where(target > 0, target, torch.ones_like(target))
    exp = torch.floor(torch.log2(safe)) - (bits - 1)
    g = torch.pow(2.0, exp)
    base = torch.round(target / g).to(torch.int64)
    offsets = torch.tensor([0, -1, 1, -2, 2, -3, 3, -4, 4], dtype=torch.int64)
    step = torch.where(zero_sum, 2, 1)
    base = torch.where(zero_sum, (base // 2) * 2, base)
    cand = base[:, None] + offsets[None, :] * step[:, None]  # (out, 9)
    means = (cand.to(torch.float64) * g[:, None]).to(dtype) / n
    hit = means == a[:, None]
    first = hit.to(torch.int8).argmax(dim=1)
    ok = hit.any(dim=1)
    S = cand.gather(1, first[:, None]).squeeze(1)
    S = torch.where(ok, S, base)
    # distribute: magnitudes q or q + 1 over the entries that carry them (the first r of them get q + 1)
    def spread(total: torch.Tensor, sel: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        count = count.clamp(min=1)[:, None]
        q, r = total[:, None] // count, total[:, None] % count
        rank = torch.cumsum(sel.to(torch.int64), dim=1) - 1
        return torch.where(sel, q + (rank < r).to(torch.int64), torch.zeros_like(rank))

    is_pos, is_neg = signs > 0, signs < 0
    half = S // 2
    mags_zero_sum = spread(half, is_pos, pos) + spread(half, is_neg, neg)
    mags_plain = spread(S, is_pos | is_neg, nz)
    mags = torch.where(zero_sum[:, None], mags_zero_sum, mags_plain)
    latent = signs * mags.to(torch.float64) * g[:, None]
    latent[(a64 == 0) | (nz == 0)] = 0.
    exact = ok & ((kind != 'linear') | ~has_zero | zero_sum)
    exact = exact | (a64 == 0) | (nz == 0)
    return latent.to(dtype), exact


def load_packed(path: str, deployed: bool = False, dtype: Optional[torch.dtype] = None,
                device: Optional[torch.device] = None) -> nn.Module:
    """Rebuild a model from a file written by :func:`export_packed`.

    By default returns the **training model** (``BinaryViT`` / ``BinaryDeiT``, in eval mode) with
    latent weights chosen so that its binarisation reproduces the stored effective weights
    exactly (see :func:`_latent_weight`): identical eval logits, and it can be fine-tuned.
    ``deployed=True`` returns :func:`deploy` of it, multiplying by exactly the stored weights.
    ``dtype`` defaults to the dtype the weights were stored in.

    Raises :class:`PackedFormatError` naming the file and the problem for a truncated, corrupt or
    foreign file; ``FileNotFoundError`` when there is no file.
    """
    path = str(path)
    meta, tensors = _read_packed(path)
    packed: Dict[str, Any] = meta['packed']
    if not isinstance(packed, dict) or not isinstance(meta['model_args'], dict):
        raise PackedFormatError(f'{path}: the metadata fields packed / model_args must be JSON objects')
    try:
        model = _build(meta['model_class'], meta['architecture'], meta['model_args'])
    except Exception as e:
        raise PackedFormatError(f'{path}: cannot rebuild the model {meta["architecture"] or meta["model_class"]!r} '
                                f'from the stored arguments {meta["model_args"]}: {e}') from e
    if isinstance(meta['pretrained_cfg'], dict) and meta['pretrained_cfg']:
        model.pretrained_cfg = meta['pretrained_cfg']
        model.default_cfg = model.pretrained_cfg
    binary = _binary_layers(model)
    unexpected = sorted(set(packed) - set(binary))
    if unexpected:
        raise PackedFormatError(f'{path}: packed weights {unexpected[:5]} do not belong to a binary layer of '
                                f'{type(model).__name__}')
    if dtype is None:
        dtype = next((tensors[e['scale']].dtype for e in packed.values() if e.get('scale') in tensors), torch.float32)
    state: Dict[str, torch.Tensor] = {}
    used = set()
    effective: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    inexact: List[str] = []
    for key, entry in packed.items():
        signs, scale, shape, kind = _unpack_entry(path, key, entry, tensors)
        if list(binary[key][0].weight.shape) != shape or binary[key][1] != kind:
            raise PackedFormatError(f'{path}: {key!r} is stored as a {kind} weight of shape {shape}, but the model '
                                    f'has a {binary[key][1]} weight of shape {list(binary[key][0].weight.shape)}')
        latent, exact = _latent_weight(signs, scale, kind, dtype)
        if not bool(exact.all()):
            inexact.append(f'{key} ({int((~exact).sum())} of {len(exact)} channels)')
        state[key] = latent.reshape(shape)
        effective[key] = (signs, scale.to(torch.float64))
        used.update((entry['bits'], entry['scale'], entry['zeros']))
    for key, value in tensors.items():
        if key not in used:
            state[key] = value
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f'{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}'
             for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or extra or wrong:
        raise PackedFormatError(f'{path}: the stored tensors do not fit {type(model).__name__} '
                                f'{meta["model_args"]}: missing {missing[:5]}, unexpected {extra[:5]}, '
                                f'wrong shape {wrong[:5]}')
    model = model.to(dtype)
    model.load_state_dict(state, strict=True)
    model.eval()
    # check that the training model binarises back to exactly the stored weights
    with torch.no_grad():
        for key, (signs, scale) in effective.items():
            layer = binary[key][0]
            eff = layer.binary_weight().reshape(signs.shape[0], -1)
            want = (scale.to(dtype)[:, None] * signs.to(dtype))
            if not torch.equal(eff, want) and not any(s.startswith(key + ' ') for s in inexact):
                bad = int((eff != want).any(dim=1).sum())
                inexact.append(f'{key} ({bad} of {signs.shape[0]} channels)')
    if inexact and not deployed:
        warnings.warn(f'{path}: the latent weights of the training model reproduce the stored binary weights only '
                      f'to rounding in {inexact[:5]}; load_packed(..., deployed=True) is exact')
    if device is not None:
        model = model.to(device)
    if not deployed:
        return model
    for key, (signs, scale) in effective.items():
        binary[key][0]._packed_effective = (signs.to(device) if device is not None else signs,
                                            scale.to(device) if device is not None else scale)
    try:
        return deploy(model)
    finally:
        for key in effective:
            del binary[key][0]._packed_effective


# =============================================================================================
# Throughput measurement


def benchmark_deploy(model_name: str = 'binaryvit_small_patch4_224', batch_size: int = 16,
                     img_size: Optional[int] = None, repeats: int = 5, warmup: int = 1,
                     threads: Optional[int] = None, **model_kwargs) -> Dict[str, Any]:
    """Eval throughput of a model before and after :func:`deploy` (float32, CPU, inference mode).

    The two models run alternately (``repeats`` times each, after ``warmup`` runs) so that
    background load affects both alike; returns the median wall and CPU (``time.process_time``,
    all threads) times, the speedups by either (the CPU-time one is the steadier on a shared
    machine), and the largest logit difference between the two.
    """
    import timm
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if img_size is not None:
        model_kwargs['img_size'] = img_size
    model = timm.create_model(model_name, **model_kwargs).eval()
    deployed = deploy(model)
    size = model.img_size
    x = torch.randn(batch_size, model.in_chans, size[0], size[1])
    times: Dict[str, List[float]] = {'eval': [], 'deployed': []}
    cpu: Dict[str, List[float]] = {'eval': [], 'deployed': []}
    with torch.inference_mode():
        ref, out = model(x), deployed(x)
        for _ in range(warmup - 1):
            model(x), deployed(x)
        for _ in range(repeats):
            for key, m in (('eval', model), ('deployed', deployed)):
                t0, c0 = time.perf_counter(), time.process_time()
                m(x)
                times[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return dict(model=model_name, batch_size=batch_size, img_size=list(size), threads=torch.get_num_threads(),
                eval_s=med['eval'], deployed_s=med['deployed'], speedup=med['eval'] / med['deployed'],
                eval_img_per_s=batch_size / med['eval'], deployed_img_per_s=batch_size / med['deployed'],
                eval_cpu_s=med_cpu['eval'], deployed_cpu_s=med_cpu['deployed'],
                cpu_speedup=med_cpu['eval'] / med_cpu['deployed'], times=times, cpu_times=cpu,
                max_abs_logit_diff=float((ref - out).abs().max()), max_abs_logit=float(ref.abs().max()))


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_binaryvit.deploy benchmark [MODEL ...]`` / ``export MODEL --out FILE``."""
    import argparse
    parser = argparse.ArgumentParser(prog='python -m timm_binaryvit.deploy', description=main.__doc__)
    sub = parser.add_subparsers(dest='cmd', required=True)
    b = sub.add_parser('benchmark', help='eval throughput before / after deploy()')
    b.add_argument('models', nargs='*', default=['binaryvit_small_patch4_224',
                                                 'binary_deit_small_gap_mb_affine_patch16_224'])
    b.add_argument('--batch-size', type=int, default=16)
    b.add_argument('--repeats', type=int, default=5)
    b.add_argument('--threads', type=int, default=None)
    e = sub.add_parser('export', help='export a (randomly initialised) registered model, print both sizes')
    e.add_argument('model')
    e.add_argument('--out', required=True)
    args = parser.parse_args(argv)
    if args.cmd == 'benchmark':
        for name in args.models:
            r = benchmark_deploy(name, batch_size=args.batch_size, repeats=args.repeats, threads=args.threads)
            print(f'{name}: batch {r["batch_size"]} at {r["img_size"][0]}, {r["threads"]} threads: eval '
                  f'{r["eval_s"]:.3f} s ({r["eval_img_per_s"]:.1f} img/s), deployed {r["deployed_s"]:.3f} s '
                  f'({r["deployed_img_per_s"]:.1f} img/s), speedup {r["speedup"]:.2f}x (CPU time '
                  f'{r["eval_cpu_s"]:.3f} s -> {r["deployed_cpu_s"]:.3f} s, {r["cpu_speedup"]:.2f}x) '
                  f'(max |logit diff| {r["max_abs_logit_diff"]:.2e} of {r["max_abs_logit"]:.1f})', flush=True)
        return 0
    import timm
    model = timm.create_model(args.model).eval()
    print(format_size_report(export_packed(model, args.out)))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
