"""Representational capability of binary networks (BinaryViT supplementary, section 3).

The *element-wise representational capability* of a feature is the number of
distinct absolute values one element of it can take (Bi-Real Net; BiMLP).  The
BinaryViT supplementary uses it to compare a fully-binary ResNet-34 with a
fully-binary DeiT-S, with these rules:

* the first layer (8-bit image, weights taken as binary) gives ``P*P*C*255/2``
  (rounded down: the supplementary writes 37,485/2 -> 18,742 for ResNet-34);
* norms (BatchNorm, the affine/LayerScale transforms, RPReLU, shifts, position
  embeddings, up-sampling, channel repetition) do not change it;
* each binary FC / conv adds its fan-in (it reads ``sign(x)``, so its output has
  as many values as its fan-in, and the real-valued shortcut adds them on);
* the binary attention product ``P_b V`` adds the sequence length (the number of
  keys it sums over);
* blocks add up;
* an average pool over ``k`` positions multiplies by ``k`` (2x2: by 4) and global
  average pooling multiplies by the number of positions.

Read together, the rules make two kinds of step, which is how they are applied
to the layers the supplementary does not treat (see docs/profile.md in the source repository):

* a *binary* operation (binary FC / conv reading ``sign(x)``, the binary
  attention product) produces a fresh value with ``fan-in`` (or ``keys``) values,
  whatever its input was; summed onto the real-valued shortcut it *adds* that
  number;
* a *real-valued* combination of ``K`` distinct elements *multiplies* by ``K``:
  a 2x2 average pool (``K = 4``), global average pooling (``K`` = positions),
  the first layer (``K = P*P*C`` pixels of 255/2 values each), a full-precision
  stage transition (``K = 2*2*C``), the key/value ``R x R`` pool of BinaryViT's
  attention (``K = R*R``) and the multi-branch pooling (identity plus 3x1, 1x3,
  5x1, 1x5 windows: ``K = 9`` distinct positions).  Shortcuts that re-read the
  same element (the q/k/v shortcuts at ``R = 1``, norms) add nothing, which is
  why the supplementary's DeiT-S count is purely additive; the FFN is counted
  as the supplementary counts it (``E*C*2``).

Everything is computed with Python integers, so the (very large) BinaryViT value
is exact.  Use :func:`representational_capability`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "CapabilityTerm",
    "CapabilityReport",
    "representational_capability",
    "deit_capability",
    "resnet_capability",
    "binaryvit_capability",
    "PRESETS",
    "POOL_BRANCH_SHAPES",
    "pool_branch_positions",
]

#: windows (kH, kW) of the multi-branch pooling: 3x1, 1x3, 5x1, 1x5 average pools.
POOL_BRANCH_SHAPES: Tuple[Tuple[int, int], ...] = ((3, 1), (1, 3), (5, 1), (1, 5))


def pool_branch_positions(shapes: Sequence[Tuple[int, int]] = POOL_BRANCH_SHAPES) -> int:
    """Distinct grid positions read by the identity plus the pooling branches (9 by default).

    The branches and the identity are summed, so the block output is a real-valued
    combination of the elements in the union of the (centred) windows; like a 2x2
    average pool multiplies by the 4 positions it reads, this multiplies by the
    size of that union (the plus-shaped 5x1 + 1x5 neighbourhood: 9 positions).
    """
    offsets = {(0, 0)}
    for kh, kw in shapes:
        for dy in range(-(kh // 2), kh - kh // 2):
            for dx in range(-(kw // 2), kw - kw // 2):
                offsets.add((dy, dx))
    return len(offsets)


#: values the supplementary prints, used for ``CapabilityReport.paper_printed``.
PAPER_DEIT_S_PRINTED = 153_216
PAPER_RESNET34_PRINTED = 71_193_472

RULES = (
    "element-wise capability = number of distinct absolute values an element can take",
    "first layer: P*P*C*255/2, rounded down (8-bit image patch, weights taken as binary)",
    "norms, affines, RPReLU, shifts, position embeddings, up-sampling: no change",
    "binary FC / conv: adds its fan-in; binary attention product: adds the number of keys",
    "blocks add up (a binary branch summed onto the real-valued shortcut adds its count)",
    "average pool over k positions: multiplies by k; global average pool: by the number of positions",
    "so: a real-valued combination of K distinct elements (average pools, pooling branches,"
    " full-precision layer with weights taken as binary) multiplies by K",
)


@dataclass(frozen=True)
class CapabilityTerm:
    """One step of the calculation: ``total = factor * previous_total + addend``.

    ``value`` is what the step adds to the running total (``total - previous``),
    so the ``value`` of all terms of a report sum to its ``total``.
    """

    name: str
    formula: str
    value: int
    total: int
    factor: int = 1
    addend: int = 0
    description: str = ""


@dataclass
class CapabilityReport:
    """Result of :func:`representational_capability`.

    Attributes:
        model: what was evaluated, in words.
        total: the representational capability (exact integer).
        terms: the step-by-step terms (:class:`CapabilityTerm`), in order.
        note: remarks on conventions / discrepancies with the paper, or ``None``.
        paper_printed: the figure the supplementary prints for this very
            configuration (DeiT-S baseline: 153,216, ResNet-34: 71,193,472), or
            ``None`` when the paper prints none.
        config: the configuration that was evaluated.
    """

    model: str
    total: int
    terms: Tuple[CapabilityTerm, ...]
    note: Optional[str] = None
    paper_printed: Optional[int] = None
    config: Dict[str, Any] = field(default_factory=dict)

    def __int__(self) -> int:
        return self.total

    @property
    def log10(self) -> float:
        """``log10(total)``: handy for the very large pyramid values."""
        return math.log10(self.total) if self.total > 0 else float("-inf")

    def after(self, name: str) -> int:
        """Running total right after the term called ``name``."""
        for t in self.terms:
            if t.name == name:
                return t.total
        raise KeyError(f"no term named {name!r}")

    def format(self, rules: bool = True) -> str:
        """The calculation term by term, as printed by ``timm-binaryvit capability``."""
        lines = [f"Representational capability: {self.model}"]
        if rules:
            lines.append("Rules (BinaryViT supplementary, section 3):")
            lines.extend(f"  - {r}" for r in RULES)
        rows = [("step", "formula", "adds", "running total", "what")]
        for t in self.terms:
            rows.append((t.name, t.formula, f"{t.value:,}", f"{t.total:,}", t.description))
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            lines.append(f"  {r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}  {r[4]}".rstrip())
        total = f"Total: {self.total:,}"
        if self.total >= 10**9:
            total += f" (~{self.total:.3e}, log10 = {self.log10:.2f})"
        lines.append(total)
        if self.paper_printed is not None:
            lines.append(f"Supplementary prints: {self.paper_printed:,}")
        if self.note:
            lines.append(f"Note: {self.note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


class _Acc:
    """Running total with the list of terms that produced it."""

    def __init__(self) -> None:
        self.total = 0
        self.terms: List[CapabilityTerm] = []

    def step(self, name: str, formula: str, factor: int = 1, addend: int = 0, description: str = "") -> None:
        new = factor * self.total + addend
        self.terms.append(CapabilityTerm(
            name=name, formula=formula, value=new - self.total, total=new,
            factor=factor, addend=addend, description=description))
        self.total = new


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _first_layer(acc: _Acc, name: str, kh: int, kw: int, in_chans: int, what: str) -> None:
    num = kh * kw * in_chans * 255
    formula = f"{kh}*{kw}*{in_chans}*255/2 = {num:,}/2"
    if num % 2:
        formula += " (rounded down)"
    acc.step(name, formula, factor=0, addend=num // 2, description=what)


def _pool_mode(global_pool: Optional[str]) -> str:
    gp = (global_pool or "").lower()
    if gp in ("avg", "mean", "avgpool"):
        return "avg"
    if gp in ("token", "", "none", "max", "cls"):
        return "select"
    raise ValueError(f"unsupported global_pool {global_pool!r} (expected 'avg' or 'token')")


def _global_pool(acc: _Acc, global_pool: Optional[str], positions: int, grid: str) -> None:
    if _pool_mode(global_pool) == "avg":
        acc.step("head.global_pool", f"*{positions}", factor=positions,
                 description=f"global average pool over {grid} = {positions} positions")
    else:
        acc.step("head.pool", "*1", factor=1,
                 description=f"global_pool={global_pool!r} selects a token/value: no change")


def _pool_branches(acc: _Acc, name: str) -> None:
    factor = pool_branch_positions()
    acc.step(name, f"*{factor}", factor=factor,
             description=f"identity + 3x1, 1x3, 5x1, 1x5 average-pool branches read {factor} distinct positions")


def _hidden(dim: int, ratio: float) -> int:
    return int(dim * ratio)


# --------------------------------------------------------------------------- DeiT
def deit_capability(
        embed_dim: int = 384,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: Union[int, Sequence[int]] = 16,
        img_size: Union[int, Sequence[int]] = 224,
        in_chans: int = 3,
        num_patches: Optional[int] = None,
        global_pool: Optional[str] = "token",
        multi_branch_pool: bool = False,
        include_attention: bool = True,
        name: Optional[str] = None,
) -> CapabilityReport:
    """Capability of a fully-binary DeiT-style (isotropic) ViT.

    Per block, as the supplementary counts DeiT-S: ``C*4`` (binary q, k, v and
    output FCs) ``+ N`` (attention product over ``N`` patch tokens) ``+ E*C*2``
    (FFN).  ``num_patches`` overrides ``(img_size / patch_size)**2``.  With
    ``global_pool='avg'`` the head multiplies by ``N``; a class token
    (``'token'``) does not.  ``multi_branch_pool`` multiplies each block by 9
    before its FFN is added (see :func:`pool_branch_positions`).
    ``include_attention=False`` drops the attention-product terms (the variant
    the supplementary prints, 153,216, for DeiT-S).
    """
    ph, pw = _pair(patch_size)
    ih, iw = _pair(img_size)
    gh, gw = ih // ph, iw // pw
    n = int(num_patches) if num_patches is not None else gh * gw
    c = int(embed_dim)
    hidden = _hidden(c, mlp_ratio)
    e_txt = f"{mlp_ratio:g}" if hidden == c * mlp_ratio else f"({hidden}/{c})"

    acc = _Acc()
    _first_layer(acc, "stem.conv", ph, pw, in_chans, f"full-precision {ph}x{pw} patch embedding on 8-bit pixels")
    for i in range(int(depth)):
        p = f"blocks.{i}"
        acc.step(f"{p}.attn.fc", f"{c}*4", addend=4 * c, description="fan-ins of the binary q, k, v and output FCs")
        if include_attention:
            acc.step(f"{p}.attn.product", f"{n}", addend=n, description=f"binary attention product over {n} tokens")
        if multi_branch_pool:
            _pool_branches(acc, f"{p}.pool_branches")
        acc.step(f"{p}.ffn", f"{e_txt}*{c}*2", addend=2 * hidden,
                 description="two binary FFN layers, counted as E*C each")
    _global_pool(acc, global_pool, n, f"{n} patch tokens")

    config = dict(family="deit", embed_dim=c, depth=int(depth), mlp_ratio=mlp_ratio, patch_size=(ph, pw),
                  img_size=(ih, iw), in_chans=in_chans, num_patches=n, global_pool=global_pool,
                  multi_branch_pool=bool(multi_branch_pool), include_attention=bool(include_attention))

    notes = ["The sequence length counts patch tokens only (the supplementary uses 196 for DeiT-S, "
             "whose class token makes 197)."]
    baseline = (c == 384 and int(depth) == 12 and n == 196 and hidden == 1536 and (ph, pw) == (16, 16)
                and in_chans == 3 and _pool_mode(global_pool) == "select" and not multi_branch_pool)
    paper = None
    if baseline:
        paper = PAPER_DEIT_S_PRINTED
        if include_attention:
            notes.insert(0, "The supplementary writes (384*4 + 196 + 4*384*2) * 12 + 97,920, which is 155,568 "
                            "(reported here), but prints 153,216 = 4,608 * 12 + 97,920, the same sum without the "
                            "attention term; the printed figure is an arithmetic slip. "
                            "include_attention=False gives the printed value.")
        else:
            notes.insert(0, "Attention term omitted: this is the 153,216 the supplementary prints; the rules, "
                            "with the attention term, give 155,568.")
    elif not include_attention:
        notes.insert(0, "Attention-product terms omitted (include_attention=False).")
    label = name or (f"fully-binary DeiT (C={c}, depth={depth}, N={n}, E={mlp_ratio:g}, "
                     f"global_pool={global_pool!r}, multi_branch_pool={bool(multi_branch_pool)})")
    return CapabilityReport(model=label, total=acc.total, terms=tuple(acc.terms), note=" ".join(notes),
                            paper_printed=paper, config=config)


# --------------------------------------------------------------------------- ResNet
def resnet_capability(
        layers: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        in_chans: int = 3,
        stem_kernel: int = 7,
        img_size: int = 224,
        name: Optional[str] = None,
) -> CapabilityReport:
    """Capability of a fully-binary ResNet (basic blocks), as the supplementary counts it.

    Stem: ``7*7*3*255/2`` (rounded down); the 3x3 max pool selects one value (no
    change).  Each stage adds ``blocks * 3*3*C`` (one 3x3 binary conv of fan-in
    ``9*C`` per block, as the supplementary counts 3, 4, 6, 3 for ResNet-34);
    each down-sampling multiplies by 4 (2x2 average-pool shortcut); the global
    average pool multiplies by the number of final positions (7*7 at 224).
    """
    layers = tuple(int(v) for v in layers)
    widths = tuple(int(v) for v in widths)
    if len(layers) != len(widths):
        raise ValueError("layers and widths must have the same length")
    acc = _Acc()
    _first_layer(acc, "stem.conv", stem_kernel, stem_kernel, in_chans,
                 f"full-precision {stem_kernel}x{stem_kernel} conv on 8-bit pixels")
    acc.step("stem.maxpool", "*1", factor=1, description="3x3 max pool selects one value: no change")
    for s, (n, w) in enumerate(zip(layers, widths)):
        acc.step(f"stage{s + 1}.blocks", f"{n}*3*3*{w}", addend=n * 9 * w,
                 description=f"{n} blocks, each a binary 3x3 conv of fan-in {9 * w:,}")
        if s + 1 < len(layers):
            acc.step(f"stage{s + 1}.downsample", "*4", factor=4,
                     description="2x2 average-pool shortcut of the next down-sampling")
    final = int(img_size) // (2 ** (len(layers) + 1))
    acc.step("head.global_pool", f"*{final}*{final}", factor=final * final,
             description=f"global average pool over {final}x{final} positions")
    label = name or f"fully-binary ResNet (blocks {layers}, widths {widths})"
    config = dict(family="resnet", layers=layers, widths=widths, in_chans=in_chans, stem_kernel=stem_kernel,
                  img_size=int(img_size))
    paper = PAPER_RESNET34_PRINTED if (layers, widths, in_chans, stem_kernel, int(img_size)) == (
        (3, 4, 6, 3), (64, 128, 256, 512), 3, 7, 224) else None
    note = ("As in the supplementary, one 3x3 binary conv is counted per basic block (3, 4, 6, 3 for ResNet-34, "
            "not its 6, 8, 12, 6 convolutions), at the stage width, and 7*7*3*255/2 = 37,485/2 is rounded "
            "down to 18,742.")
    return CapabilityReport(model=label, total=acc.total, terms=tuple(acc.terms), note=note,
                            paper_printed=paper, config=config)


# --------------------------------------------------------------------------- BinaryViT
def binaryvit_capability(
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (3, 4, 8, 4),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 1, 1),
        patch_size: Union[int, Sequence[int]] = 4,
        img_size: Union[int, Sequence[int]] = 224,
        in_chans: int = 3,
        fp_transitions: bool = False,
        multi_branch_pool: bool = True,
        global_pool: Optional[str] = "avg",
        include_attention: bool = True,
        name: Optional[str] = None,
) -> CapabilityReport:
    """Capability of the pyramid BinaryViT.

    * stem: ``4*4*3*255/2`` (full-precision 4x4 patch embedding);
    * per block: ``*R*R`` (key/value ``R x R`` average pool, when ``R > 1``: it
      reaches the residual stream through the real-valued k/v shortcuts), then
      ``+ C*4`` (binary q, k, v, output FCs) ``+ C`` (binary key/value
      reduction FC, only when ``R > 1``) ``+ N_kv`` (attention product over the
      ``(H/R)*(W/R)`` key/value tokens); then ``*9`` (identity + the 3x1, 1x3,
      5x1, 1x5 average-pool branches read 9 distinct positions) and ``+ E*C*2`` (FFN, counted like DeiT-S);
    * binary stage transition ``C_i -> C_i+1``: ``*4 + 2*2*C_i`` (2x2 average-pool
      shortcut plus the binary 2x2 conv's fan-in); full-precision transition:
      ``*(2*2*C_i)`` (a full-precision layer multiplies by its fan-in);
    * head: global average pooling multiplies by the final ``H*W``.
    """
    dims = tuple(int(v) for v in embed_dims)
    nstage = len(dims)
    depths = tuple(int(v) for v in depths)
    mlp_ratios = tuple(mlp_ratios)
    sr_ratios = tuple(int(v) for v in sr_ratios)
    if not (len(depths) == len(mlp_ratios) == len(sr_ratios) == nstage):
        raise ValueError("embed_dims, depths, mlp_ratios and sr_ratios must have the same length")
    ph, pw = _pair(patch_size)
    ih, iw = _pair(img_size)
    h, w = ih // ph, iw // pw

    acc = _Acc()
    _first_layer(acc, "stem.conv", ph, pw, in_chans, f"full-precision {ph}x{pw} patch embedding on 8-bit pixels")
    for s in range(nstage):
        c = dims[s]
        if s > 0:
            cp = dims[s - 1]
            h, w = h // 2, w // 2
            if fp_transitions:
                acc.step(f"stages.{s}.downsample", f"*(2*2*{cp})", factor=4 * cp,
                         description=f"full-precision 2x2 conv, fan-in {4 * cp:,}")
            else:
                acc.step(f"stages.{s}.downsample", f"*4 + 2*2*{cp}", factor=4, addend=4 * cp,
                         description="2x2 average-pool shortcut + binary 2x2 conv fan-in")
        r = sr_ratios[s]
        hidden = _hidden(c, mlp_ratios[s])
        e = mlp_ratios[s]
        e_txt = f"{e:g}" if hidden == c * e else f"({hidden}/{c})"
        n_kv = (h // r) * (w // r)
        for b in range(depths[s]):
            p = f"stages.{s}.blocks.{b}"
            if r > 1:
                acc.step(f"{p}.attn.kv_pool", f"*{r}*{r}", factor=r * r,
                         description=f"{r}x{r} key/value average pool, added back through the k/v shortcuts")
                acc.step(f"{p}.attn.fc", f"{c}*4 + {c}", addend=5 * c,
                         description="binary q, k, v, output FCs + key/value reduction FC")
            else:
                acc.step(f"{p}.attn.fc", f"{c}*4", addend=4 * c, description="binary q, k, v, output FCs")
            if include_attention:
                if r > 1:
                    acc.step(f"{p}.attn.product", f"({h}/{r})*({w}/{r})", addend=n_kv,
                             description=f"attention over {n_kv} key/value tokens ({r}x{r} average-pooled)")
                else:
                    acc.step(f"{p}.attn.product", f"{h}*{w}", addend=n_kv,
                             description=f"attention over {n_kv} tokens")
            if multi_branch_pool:
                _pool_branches(acc, f"{p}.pool_branches")
            acc.step(f"{p}.ffn", f"{e_txt}*{c}*2", addend=2 * hidden, description="two binary FFN layers")
    _global_pool(acc, global_pool, h * w, f"{h}x{w}")

    config = dict(family="binaryvit", embed_dims=dims, depths=depths, mlp_ratios=mlp_ratios, sr_ratios=sr_ratios,
                  patch_size=(ph, pw), img_size=(ih, iw), in_chans=in_chans, fp_transitions=bool(fp_transitions),
                  multi_branch_pool=bool(multi_branch_pool), global_pool=global_pool,
                  include_attention=bool(include_attention))
    note = ("The supplementary prints no BinaryViT figure; its rules are applied term by term. Spatial "
            "averages that reach the residual stream multiply by the number of positions they read: the RxR "
            "key/value pool (R*R, through the real-valued k/v shortcuts of the attention), the pooling "
            "branches (9 distinct positions) and the 2x2 pool shortcut of a binary stage transition (4); "
            "binary layers and the attention product add their fan-in / number of keys.")
    if not include_attention:
        note += " Attention-product terms omitted (include_attention=False)."
    label = name or (f"BinaryViT (dims {dims}, depths {depths}, E {tuple(mlp_ratios)}, R {sr_ratios}, "
                     f"{'full-precision' if fp_transitions else 'binary'} transitions)")
    return CapabilityReport(model=label, total=acc.total, terms=tuple(acc.terms), note=note,
                            paper_printed=None, config=config)


# --------------------------------------------------------------------------- dispatch
PRESETS: Dict[str, Tuple[Any, Dict[str, Any]]] = {
    "deit_small": (deit_capability, dict(name="fully-binary DeiT-S (class token, supplementary section 3)")),
    "resnet34": (resnet_capability, dict(layers=(3, 4, 6, 3), name="fully-binary ResNet-34")),
    "resnet18": (resnet_capability, dict(layers=(2, 2, 2, 2), name="fully-binary ResNet-18")),
    "binaryvit": (binaryvit_capability, dict(name="BinaryViT (supplementary Table 1)")),
}


def _from_model(model: Any, include_attention: bool, **overrides: Any) -> CapabilityReport:
    label = type(model).__name__
    if hasattr(model, "embed_dims") and hasattr(model, "depths"):
        kw = dict(
            embed_dims=model.embed_dims, depths=model.depths, mlp_ratios=model.mlp_ratios,
            sr_ratios=model.sr_ratios, patch_size=getattr(model, "patch_size", 4),
            img_size=getattr(model, "img_size", 224), in_chans=getattr(model, "in_chans", 3),
            fp_transitions=bool(getattr(model, "fp_transitions", False)),
            multi_branch_pool=bool(getattr(model, "multi_branch_pool", True)),
            global_pool=getattr(model, "global_pool", "avg"), name=label)
        kw.update(overrides)
        return binaryvit_capability(include_attention=include_attention, **kw)
    if hasattr(model, "embed_dim") and hasattr(model, "depth"):
        kw = dict(
            embed_dim=model.embed_dim, depth=model.depth, mlp_ratio=getattr(model, "mlp_ratio", 4.0),
            patch_size=getattr(model, "patch_size", 16), img_size=getattr(model, "img_size", 224),
            in_chans=getattr(model, "in_chans", 3), global_pool=getattr(model, "global_pool", "token"),
            multi_branch_pool=bool(getattr(model, "multi_branch_pool", False)), name=label)
        kw.update(overrides)
        return deit_capability(include_attention=include_attention, **kw)
    raise TypeError(f"cannot compute the representational capability of {type(model).__name__}: expected "
                    f"one of {sorted(PRESETS)}, a timm model name of this package, or a BinaryViT / "
                    f"BinaryDeiT model")


def representational_capability(x: Any, include_attention: bool = True, **overrides: Any) -> CapabilityReport:
    """Element-wise representational capability, by the BinaryViT supplementary's rules.

    Args:
        x: ``'deit_small'``, ``'resnet34'``, ``'resnet18'``, ``'binaryvit'``, a
            timm model name registered by this package, or a model instance of
            this package (pyramid ``BinaryViT`` or ``BinaryDeiT``; read by its
            attributes).
        include_attention: count the attention-product term (the rules say so;
            ``False`` gives the variant the supplementary prints for DeiT-S).
        **overrides: configuration overrides passed to :func:`deit_capability`,
            :func:`resnet_capability` or :func:`binaryvit_capability`
            (e.g. ``num_patches=256``, ``global_pool='avg'``).

    Returns:
        a :class:`CapabilityReport` (``.total``, ``.terms``, ``.note``,
        ``.paper_printed``; ``print()`` it for the calculation).
    """
    if isinstance(x, str):
        key = x.strip().lower().replace("-", "_")
        if key in PRESETS:
            fn, kw = PRESETS[key]
            kw = {**kw, **overrides}
            if fn is not resnet_capability:
                kw["include_attention"] = include_attention
            return fn(**kw)
        import timm  # local: keeps this module free of import cycles
        from timm.models import model_entrypoint

        import timm_binaryvit  # noqa: F401  (importing the package registers its models)
        if timm.is_model(x) and model_entrypoint(x).__module__.startswith("timm_binaryvit"):
            model = timm.create_model(x, pretrained=False)
            return _from_model(model, include_attention, **overrides)
        raise ValueError(f"unknown model {x!r}: expected one of {sorted(PRESETS)} or a model name registered "
                         f"by timm_binaryvit")
    return _from_model(x, include_attention, **overrides)
