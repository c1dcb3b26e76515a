"""The result of :func:`timm_binaryvit.profile.profile`: per-layer rows and their totals, and the
tables printed from them.

:class:`LayerProfile` is one row (a module, or one product computed in a module's own forward);
:class:`ProfileResult` holds the rows of one model with the totals, :meth:`ProfileResult.format`
gives the table of ``timm-binaryvit profile`` and :meth:`ProfileResult.summary` the line of
``timm-binaryvit list``. The counting conventions are explained in :mod:`timm_binaryvit.profile`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = ['ProfileResult', 'LayerProfile', 'BINARY', 'FULL_PRECISION', 'BOPS_PER_OP']

BINARY = 'binary'
FULL_PRECISION = 'full-precision'

#: one OP = 64 binary MACs (ReActNet / Bi-Real Net convention).
BOPS_PER_OP = 64


class _Counts:
    """OPs, parameters and deployed size, derived from ``bops``, ``flops``, ``params_binary`` and
    ``params_fp``: the same for one row and for a whole model."""

    @property
    def ops(self) -> float:
        return self.bops / BOPS_PER_OP + self.flops

    @property
    def params(self) -> int:
        return self.params_binary + self.params_fp

    @property
    def size_bits(self) -> int:
        return self.params_binary + 32 * self.params_fp


def _sum_of_rows(count: str) -> property:
    """A total of :class:`ProfileResult`: ``count`` summed over its rows."""
    return property(lambda self: sum(getattr(r, count) for r in self.layers))


@dataclass
class LayerProfile(_Counts):
    """One row of a profile: a module (or one product computed in a module's own forward).

    ``bops`` / ``flops`` are binary / full-precision multiply-accumulates per image;
    ``output_shape`` is the shape the layer produced in the batch-1 pass (for a product, the
    shape of the product as computed, e.g. ``(batch * heads, N, N_kv)``).
    """
    name: str
    kind: str
    type: str = FULL_PRECISION
    output_shape: Optional[Tuple[int, ...]] = None
    bops: int = 0
    flops: int = 0
    params_binary: int = 0
    params_fp: int = 0
    calls: int = 0

    @property
    def has_macs(self) -> bool:
        return bool(self.bops or self.flops)


@dataclass
class ProfileResult(_Counts):
    """Per-layer and total operation counts and sizes of one model (per image).

    Totals: ``bops``, ``flops``, ``ops`` (= bops / 64 + flops), ``params_binary``, ``params_fp``,
    ``params``, ``binary_share``, ``size_bits`` (= params_binary + 32 * params_fp), ``size_bytes``,
    ``size_mb`` (10^6 bytes). ``buffers`` is the number of buffer elements (BatchNorm running
    statistics), which are not part of the size. ``layers`` lists every module with parameters
    or multiply-accumulates in the order the forward pass reached them; the totals are their sums.
    """
    model_name: str
    input_size: Tuple[int, ...]
    layers: List[LayerProfile] = field(default_factory=list)
    buffers: int = 0
    device: str = 'meta'

    bops = _sum_of_rows('bops')
    flops = _sum_of_rows('flops')
    params_binary = _sum_of_rows('params_binary')
    params_fp = _sum_of_rows('params_fp')

    @property
    def binary_share(self) -> float:
        """Fraction of the parameters that are binary."""
        return self.params_binary / self.params if self.params else 0.

    @property
    def size_bytes(self) -> float:
        return self.size_bits / 8

    @property
    def size_mb(self) -> float:
        return self.size_bits / 8e6

    def as_dict(self) -> Dict[str, Any]:
        """Totals and rows as plain Python values (for JSON)."""
        return dict(
            model=self.model_name, input_size=list(self.input_size), device=self.device,
            bops=self.bops, flops=self.flops, ops=self.ops, params=self.params,
            params_binary=self.params_binary, params_fp=self.params_fp, binary_share=self.binary_share,
            size_bits=self.size_bits, size_mb=self.size_mb, buffers=self.buffers,
            layers=[dict(name=r.name, kind=r.kind, type=r.type,
                         output_shape=list(r.output_shape) if r.output_shape is not None else None,
                         bops=r.bops, flops=r.flops, ops=r.ops, params_binary=r.params_binary,
                         params_fp=r.params_fp, calls=r.calls) for r in self.layers],
        )

    def summary(self) -> str:
        """One line: parameters, binary share, OPs, deployed size (for ``timm-binaryvit list``)."""
        return (f'{_human(self.params)} params ({100 * self.binary_share:.1f}% binary), '
                f'OPs {_sci(self.ops, 8)}, {self.size_mb:.2f} MB')

    def grouped(self, depth: int) -> List[LayerProfile]:
        """Rows summed over the first ``depth`` components of their names (``stages.0.blocks.1``
        at depth 4), in order of first appearance. ``type`` is ``'mixed'`` where a group has both."""
        groups: Dict[str, LayerProfile] = {}
        for r in self.layers:
            key = '.'.join(r.name.split('.')[:depth]) if depth > 0 else '(model)'
            g = groups.get(key)
            if g is None:
                g = groups[key] = LayerProfile(key, r.kind if key == r.name else '', r.type, r.output_shape)
            elif g.type != r.type:
                g.type = 'mixed'
            if key != r.name:
                g.kind = g.kind if g.kind and g.kind == r.kind else ''
            g.output_shape = r.output_shape if r.output_shape is not None else g.output_shape
            g.bops += r.bops
            g.flops += r.flops
            g.params_binary += r.params_binary
            g.params_fp += r.params_fp
            g.calls = max(g.calls, r.calls)
        return list(groups.values())

    def format(self, depth: Optional[int] = None, all_layers: bool = False) -> str:
        """A readable table (the ``timm-binaryvit profile`` output) with the totals under it.

        Args:
            depth: sum the rows over the first ``depth`` name components (e.g. 2 for stages,
                4 for single BinaryViT layers); ``None`` lists every layer.
            all_layers: also list the rows without multiply-accumulates (norms, RPReLU, shifts,
                affines, position embeddings); by default they are summed into one line.
        """
        rows = self.layers if depth is None else self.grouped(depth)
        shown = [r for r in rows if all_layers or r.has_macs]
        hidden = [r for r in rows if not (all_layers or r.has_macs)]
        header = ('layer', 'kind', 'type', 'output shape', 'BOPs', 'FLOPs', 'params 1-bit', 'params fp32')
        table = [header]
        for r in shown:
            shape = 'x'.join(str(s) for s in r.output_shape) if r.output_shape is not None else ''
            table.append((r.name or '(model)', r.kind, r.type, shape, _human(r.bops), _human(r.flops),
                          _human(r.params_binary), _human(r.params_fp)))
        if hidden:
            table.append((f'({len(hidden)} more rows without MACs)',
                          '', FULL_PRECISION if not any(r.params_binary for r in hidden) else 'mixed', '',
                          '-', '-', _human(sum(r.params_binary for r in hidden)),
                          _human(sum(r.params_fp for r in hidden))))
        table.append(('total', '', '', '', _human(self.bops), _human(self.flops),
                      _human(self.params_binary), _human(self.params_fp)))
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        right = {4, 5, 6, 7}

        def line(row):
            cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            return '  '.join(cells).rstrip()

        rule = '-' * len(line(header))
        out = [f'{self.model_name}: input {"x".join(str(s) for s in self.input_size)}, per image '
               f'(counted on {self.device})', rule, line(header), rule]
        out += [line(row) for row in table[1:-1]]
        out += [rule, line(table[-1]), '']
        out += [
            f'BOPs   {_sci(self.bops, 9)} ({self.bops:,}) binary multiply-accumulates: binary linear / conv, '
            f'sign(Q) sign(K)^T, P_b sign(V)',
            f'FLOPs  {_sci(self.flops, 8)} ({self.flops:,}) full-precision multiply-accumulates',
            f'OPs    {_sci(self.ops, 8)} = BOPs / {BOPS_PER_OP} + FLOPs',
            f'params {_human(self.params)}: {_human(self.params_binary)} binary ({100 * self.binary_share:.1f}%), '
            f'{_human(self.params_fp)} full-precision',
            f'size   {self.size_mb:.2f} MB deployed: 1 bit per binary weight, 32 bits per other parameter '
            f'({self.size_bits:,} bits); {_human(self.buffers)} buffer values (BatchNorm running '
            f'statistics) not counted',
            'not counted: element-wise work (norms, RPReLU, shifts, signs, scales, softmax, pooling, '
            'additions)',
        ]
        return '\n'.join(out)

    def __str__(self) -> str:
        return self.format()


def _human(n: Union[int, float]) -> str:
    if not n:
        return '-'
    for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= scale:
            return f'{n / scale:.2f}{unit}'
    return f'{n:.0f}' if isinstance(n, float) else str(n)


def _sci(x: float, exponent: int) -> str:
    """``x`` with a fixed power of ten, as the papers print OPs (``0.70e8``); values too small
    for two decimals at that power get their own exponent (``4.20e6``)."""
    if not x:
        return '0'
    if abs(x) >= 10 ** (exponent - 1):
        return f'{x / 10 ** exponent:.2f}e{exponent}'
    own = math.floor(math.log10(abs(x)))
    return f'{x / 10 ** own:.2f}e{own}'
