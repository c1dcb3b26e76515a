"""The deployed transformer layer: one :class:`~timm_binaryvit.blocks.Block` folded (see :mod:`.folding`)."""
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import Block
from .folding import affine, bn_affine, f64, fold_unit, rprelu
from .runtime import Folded, FoldedPReLU, Workspace, attention_context, binary_ffn

__all__ = ['DeployedBlock']


def _add_branch(x: torch.Tensor, branch: torch.Tensor, scaled: bool, alpha: torch.Tensor,
                bias: torch.Tensor) -> None:
    """``x += alpha * branch + bias`` in place (``alpha`` only where the block has its affine)."""
    if scaled:
        x.addcmul_(branch, alpha)
    else:
        x.add_(branch)
    x.add_(bias)


class DeployedBlock(Folded):
    """One binary transformer layer with every BatchNorm, shift and scale folded.

    ``forward(x, feat_size, ws)`` updates the ``(B, N, C)`` residual stream ``x`` in place.
    Names: ``Y* = P* + c*`` where ``P*`` is a PReLU output and ``c*`` the shift of the sign that
    reads it, so each sign is taken of a tensor as it is.

    Each layer runs in chunks of tokens (:attr:`chunk_elements`), in buffers reused by every layer
    of a stage.
    """

    def __init__(self, block: Block, dtype: torch.dtype, device: torch.device):
        super().__init__()
        attn, mlp = block.attn, block.mlp
        ref = torch.zeros((), dtype=torch.float64, device=device)
        C = attn.dim
        E = mlp.expansion
        self.dim, self.num_heads, self.head_dim, self.sr_ratio = C, attn.num_heads, attn.head_dim, attn.sr_ratio
        self.expansion = E
        zeros = ref.new_zeros(C)

        # norm1 -> u
        s1, t1 = bn_affine(block.norm1, C, ref)
        self._buf('norm1_scale', s1, dtype)
        self._buf('norm1_shift', t1, dtype)

        # queries, keys, values: Y = PReLU(.) + z + (second shift)
        zq, zk, zv = f64(attn.act_q.shift_out), f64(attn.act_k.shift_out), f64(attn.act_v.shift_out)
        cq, ck, cv = zq + f64(attn.sign_q.shift), zk + f64(attn.sign_k.shift), zv + f64(attn.sign_v.shift)
        self.q, self.act_q, _ = fold_unit(attn.q, attn.act_q, zeros, zeros, cq, dtype)
        if attn.kv_reduce is not None:
            self.kv_reduce, self.act_kv_reduce, zr = fold_unit(
                attn.kv_reduce, attn.act_kv_reduce, zeros, zeros, zeros, dtype)
        else:
            self.kv_reduce, self.act_kv_reduce, zr = None, None, zeros
        self.k, self.act_k, _ = fold_unit(attn.k, attn.act_k, zr, zr, ck, dtype)
        self.v, self.act_v, _ = fold_unit(attn.v, attn.act_v, zr, zr, cv, dtype)

        # attention probabilities: s * [p / s > 1/2] for s > 0; identically 0 for s <= 0
        s = float(attn.prob_binarizer.scale.detach().reshape(()))
        self.attn_zero = not s > 0
        self._buf('prob_threshold', ref.new_tensor(s / 2 if s > 0 else 0.), dtype)
        self._buf('attn_scale', ref.new_full((1,), 1.0 / math.sqrt(self.head_dim)), dtype)

        # m = RPReLU_c(BN_c(ctx) + qa + ka + va); the proj sign reads m + b_o = PReLU(.) + z_c + b_o
        sc, tc = bn_affine(attn.norm_ctx, C, ref)
        gc, slope_c, zc = rprelu(attn.act_ctx)
        bo = f64(attn.proj.linear.shift)
        self._buf('ctx_scale', sc * (s if s > 0 else 0.), dtype)
        self._buf('ctx_bias', tc + zq + zk + zv - gc + (zc + bo) - cq - ck - cv, dtype)
        self.act_ctx = FoldedPReLU(slope_c, zc + bo, dtype)
        # output projection: sign input is the carried tensor itself; the shortcut m = it - b_o
        self.proj, self.act_proj, zo = fold_unit(attn.proj, attn.act_proj, zeros, -bo, zeros, dtype, sign_shift=False)
        a1, b1 = affine(block.affine1, C, ref)
        self._buf('affine1_alpha', a1, dtype)
        self._buf('residual1', a1 * zo + b1, dtype)
        self.affine1 = not isinstance(block.affine1, nn.Identity)

        # FFN: w = norm2(x); t = RPReLU_1(U_1(w, [w]*E)); z = RPReLU_2(U_2(t, pool_E(t)))
        s2, t2 = bn_affine(block.norm2, C, ref)
        self._buf('norm2_scale', s2, dtype)
        self._buf('norm2_shift', t2, dtype)
        z1 = f64(mlp.act1.shift_out)
        b2 = f64(mlp.fc2.linear.shift)
        # Y1 = PReLU(.) + z1 + b2 is the fc2 sign input; the fc2 shortcut pool_E(t) = pool_E(Y1) - pool_E(b2)
        self.fc1, self.act1, _ = fold_unit(mlp.fc1, mlp.act1, zeros, zeros.repeat(E), z1 + b2, dtype)
        self.fc2, self.act2, z2 = fold_unit(mlp.fc2, mlp.act2, zeros, -b2.view(C, E).mean(-1), zeros, dtype,
                                            sign_shift=False)
        a2, b2_ = affine(block.affine2, C, ref)
        residual2 = a2 * z2 + b2_

        # multi-branch pooling: one depthwise 5x5 convolution of w plus constant betas
        self.has_pool = block.pool is not None
        if self.has_pool:
            kernel = ref.new_zeros(C, 1, 5, 5)
            pool = block.pool
            kernel[:, 0, 1:4, 2] += f64(pool.h3.alpha)[:, None] / 3
            kernel[:, 0, 2, 1:4] += f64(pool.w3.alpha)[:, None] / 3
            kernel[:, 0, 0:5, 2] += f64(pool.h5.alpha)[:, None] / 5
            kernel[:, 0, 2, 0:5] += f64(pool.w5.alpha)[:, None] / 5
            self._buf('pool_kernel', kernel, dtype)
            residual2 = residual2 + f64(pool.h3.beta) + f64(pool.w3.beta) + f64(pool.h5.beta) + f64(pool.w5.beta)
        self._buf('affine2_alpha', a2, dtype)
        self._buf('residual2', residual2, dtype)
        self.affine2 = not isinstance(block.affine2, nn.Identity)

    #: Token rows per chunk are chosen so that a chunk's FFN hidden activations hold about this many
    #: values. Smaller chunks keep every tensor of a chunk in the L2 cache, but each chunk costs a
    #: kernel call per product, and the packed FFN never writes its hidden activations at all.
    chunk_elements = 2 ** 21

    def _chunks(self, rows: int, unit: int, width: int) -> List[Tuple[int, int]]:
        size = max(unit, (self.chunk_elements // width) // unit * unit)
        return [(r0, min(rows, r0 + size)) for r0 in range(0, rows, size)]

    #: Images per attention batch are chosen so that their attention scores hold about this many values.
    attention_elements = 2 ** 20

    def _qkv(self, x2: torch.Tensor, B: int, feat_size: Tuple[int, int], ws: Workspace):
        """Per chunk of tokens: u = norm1(x); Y = PReLU(unit(u)) + c for q, k, v (k and v from the
        R x R-pooled grid when the layer reduces them). Returns Y_q, Y_k, Y_v and Y_k + Y_v."""
        M, C = x2.shape
        R = self.sr_ratio
        reduce = self.kv_reduce is not None
        H, W = feat_size
        yq = ws('yq', M, C)
        if reduce:
            pooled = ws('pooled', B * (H // R) * (W // R), C)
        else:
            yk, yv = ws('yk', M, C), ws('yv', M, C)
        for r0, r1 in self._chunks(M, R * W if reduce else 1, 2 * C):
            n = r1 - r0
            tmp = ws('tmp', n, C)
            u = torch.addcmul(self.norm1_shift, x2[r0:r1], self.norm1_scale, out=ws('u', n, C))
            self.q.run_act(u, u, yq[r0:r1], ws, self.act_q, tmp)
            if reduce:
                # R x R average pool of these n // W grid rows (channels-last pooling: no transposes)
                grid_rows = F.avg_pool2d(u.view(1, n // W, W, C).permute(0, 3, 1, 2), R)
                pooled[r0 // (R * R):r1 // (R * R)].view(1, n // (W * R), W // R, C).copy_(
                    grid_rows.permute(0, 2, 3, 1))
            else:
                self.k.run_act(u, u, yk[r0:r1], ws, self.act_k, tmp)
                self.v.run_act(u, u, yv[r0:r1], ws, self.act_v, tmp)
        if not reduce:
            return yq, yk, yv, None
        # keys and values from the pooled grid (few tokens: no chunks)
        Mk = pooled.shape[0]
        ktmp = ws('ktmp', Mk, C)
        kv = self.kv_reduce.run_act(pooled, pooled, ws('ykv', Mk, C), ws, self.act_kv_reduce, ktmp)
        yk, yv = ws('yk', Mk, C), ws('yv', Mk, C)
        self.k.run_act(kv, kv, yk, ws, self.act_k, ktmp)
        self.v.run_act(kv, kv, yv, ws, self.act_v, ktmp)
        return yq, yk, yv, torch.add(yk, yv, out=ws('kvsum', Mk, C))  # nearest upsampling commutes with the sum

    def _attention(self, yq, yk, yv, kvsum, B: int, N: int, Nk: int, feat_size: Tuple[int, int],
                   ws: Workspace) -> torch.Tensor:
        """Per group of images: binary attention, and the context-norm input
        acc = BN_c(ctx) + qa + ka + va, through its PReLU, in place in ``yq``."""
        h, d, C, R = self.num_heads, self.head_dim, self.dim, self.sr_ratio
        Hr, Wr = feat_size[0] // R, feat_size[1] // R
        group = max(1, min(B, self.attention_elements // (h * N * Nk)))
        for b0 in range(0, B, group):
            g = min(B, b0 + group) - b0
            rows, krows = slice(b0 * N, (b0 + g) * N), slice(b0 * Nk, (b0 + g) * Nk)
            acc = yq[rows]
            if not self.attn_zero:
                ctx = attention_context(yq[rows].view(g, N, h, d), yk[krows].view(g, Nk, h, d),
                                        yv[krows].view(g, Nk, h, d), self.attn_scale, self.prob_threshold, ws)
                acc.view(g, N, h, d).addcmul_(ctx.transpose(1, 2), self.ctx_scale.view(h, d))
            if kvsum is not None:
                acc.view(g * Hr, R, Wr, R, C).add_(kvsum[krows].view(g * Hr, 1, Wr, 1, C))
            else:
                acc.add_(yk[rows]).add_(yv[rows])
            acc.add_(self.ctx_bias)
            self.act_ctx.apply_(acc, ws('tmp_img', g * N, C))
        return yq

    def _ffn(self, x2: torch.Tensor, acc: torch.Tensor, wfull, ws: Workspace):
        """Per chunk: output projection, residual; w = norm2(x); FFN, residual (in place in ``x2``)."""
        M, C = x2.shape
        E = self.expansion
        for r0, r1 in self._chunks(M, 1, E * C):
            n = r1 - r0
            tmp = ws('tmp', n, C)
            xc = x2[r0:r1]
            yo = self.proj.run_act(acc[r0:r1], acc[r0:r1], ws('yo', n, C), ws, self.act_proj, tmp,
                                   overwrite_input=True)
            _add_branch(xc, yo, self.affine1, self.affine1_alpha, self.residual1)
            w = torch.addcmul(self.norm2_shift, xc, self.norm2_scale,
                              out=wfull[r0:r1] if wfull is not None else ws('u', n, C))
            y2 = binary_ffn(self.fc1, self.act1, self.fc2, self.act2, w, ws('y2', n, C), ws)
            _add_branch(xc, y2, self.affine2, self.affine2_alpha, self.residual2)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int], ws: Workspace) -> torch.Tensor:
        B, N, C = x.shape
        x2 = x.view(B * N, C)
        yq, yk, yv, kvsum = self._qkv(x2, B, feat_size, ws)
        Nk = yk.shape[0] // B
        acc = self._attention(yq, yk, yv, kvsum, B, N, Nk, feat_size, ws)
        wfull = ws('w', B * N, C) if self.has_pool else None
        self._ffn(x2, acc, wfull, ws)
        if self.has_pool:  # pooling branches of the normalised FFN input (a depthwise 5x5 convolution)
            H, W = feat_size
            grid = wfull.view(B, H, W, C).permute(0, 3, 1, 2)
            pooled_branches = F.conv2d(grid, self.pool_kernel, None, 1, 2, 1, C)
            x.view(B, H, W, C).add_(pooled_branches.permute(0, 2, 3, 1))
        return x
