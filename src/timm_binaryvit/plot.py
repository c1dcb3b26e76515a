"""Pictures of a profile, drawn with matplotlib (an optional dependency).

``timm-binaryvit profile MODEL --plot FILE.png`` calls :func:`plot_profile`: the operations of
every layer, binary (BOPs / 64, the OPs convention of :mod:`timm_binaryvit.profile`) and
full-precision (FLOPs), in forward order and summed by stage. matplotlib comes with the
``plot`` extra: ``pip install "timm-binaryvit[plot]"``; without it :func:`require_matplotlib`
raises an ``ImportError`` that says so.
"""
from pathlib import Path
from typing import Dict, List, Tuple, Union

from .profile_result import BOPS_PER_OP, ProfileResult

__all__ = ['INSTALL_HINT', 'require_matplotlib', 'stage_of', 'plot_profile']

INSTALL_HINT = 'pip install "timm-binaryvit[plot]"  (or pip install matplotlib)'

_BINARY_COLOUR = '#1f77b4'
_FP_COLOUR = '#d62728'


def require_matplotlib(what: str = 'plotting'):
    """``matplotlib.pyplot`` on the file-only Agg backend, or an ``ImportError`` naming the extra."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f'{what} needs matplotlib, which is not installed: {INSTALL_HINT}') from e
    matplotlib.use('Agg', force=False)  # no display needed; a backend already chosen by the caller stays
    import matplotlib.pyplot as plt

    return plt


def stage_of(name: str) -> str:
    """The stage a profile row belongs to: ``stage i`` (BinaryViT), ``block i`` (DeiT), ``stem`` or ``head``."""
    parts = name.split('.')
    if parts[0] == 'stages' and len(parts) > 1:
        return f'stage {parts[1]}'
    if parts[0] == 'blocks' and len(parts) > 1:
        return f'block {parts[1]}'
    if parts[0] in ('patch_embed', 'pos_embed', 'cls_token', 'stem'):
        return 'stem'
    if parts[0] in ('norm', 'fc_norm', 'head', 'head_drop', 'global_pool'):
        return 'head'
    return parts[0] or '(model)'


def _by_stage(result: ProfileResult) -> Dict[str, Tuple[float, float]]:
    """Stage -> (binary OPs, full-precision OPs), in forward order."""
    stages: Dict[str, List[float]] = {}
    for row in result.layers:
        if row.has_macs:
            totals = stages.setdefault(stage_of(row.name), [0., 0.])
            totals[0] += row.bops / BOPS_PER_OP
            totals[1] += row.flops
    return {k: (v[0], v[1]) for k, v in stages.items()}


def plot_profile(result: ProfileResult, path: Union[str, Path], dpi: int = 120) -> Path:
    """Draw ``result`` (from :func:`timm_binaryvit.profile.profile`) into ``path`` (PNG, SVG, PDF ...).

    Top: every layer with multiply-accumulates in forward order, binary OPs (BOPs / 64) and
    full-precision OPs (FLOPs) on a log scale, stages shaded. Bottom: the same summed by stage,
    stacked, with each stage's share of the model's OPs.
    """
    plt = require_matplotlib('profile --plot')
    rows = [r for r in result.layers if r.has_macs]
    if not rows:
        raise ValueError(f'{result.model_name}: the profile has no layer with multiply-accumulates to draw')
    stages = _by_stage(result)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8), gridspec_kw=dict(height_ratios=(3, 2)))

    x = range(len(rows))
    top.bar(x, [r.bops / BOPS_PER_OP for r in rows], width=0.85, color=_BINARY_COLOUR, label='binary (BOPs / 64)')
    top.bar(x, [r.flops for r in rows], width=0.85, color=_FP_COLOUR, label='full precision (FLOPs)',
            bottom=[r.bops / BOPS_PER_OP for r in rows])
    top.set_yscale('log')
    smallest = min(min(v for v in (r.bops / BOPS_PER_OP, r.flops) if v) for r in rows)
    top.set_ylim(bottom=smallest / 2)  # every layer shows, however small
    top.set_xlim(-0.5, len(rows) - 0.5)
    top.set_ylabel('OPs per image')
    top.set_xlabel('layer, in forward order')
    # Shade alternate stages and name each one above its span.
    start = 0
    names = [stage_of(r.name) for r in rows]
    for i, stage in enumerate(stages):
        end = start
        while end < len(rows) and names[end] == stage:
            end += 1
        if i % 2:
            top.axvspan(start - 0.5, end - 0.5, color='0.92', zorder=0)
        short = stage.split()[-1] if len(stages) > 8 and ' ' in stage else stage  # DeiT: block numbers only
        top.text((start + end - 1) / 2, 1.01, short, transform=top.get_xaxis_transform(), ha='center', va='bottom',
                 fontsize=8)
        start = end
    top.legend(loc='upper right', fontsize=8)
    top.set_title(f'{result.model_name}, input {"x".join(map(str, result.input_size))}: '
                  f'OPs {result.ops / 1e8:.2f}e8 = BOPs {result.bops / 1e9:.2f}e9 / {BOPS_PER_OP} '
                  f'+ FLOPs {result.flops / 1e8:.2f}e8', fontsize=10, pad=16)

    labels = list(stages)
    binary = [stages[s][0] for s in labels]
    fp = [stages[s][1] for s in labels]
    bottom.bar(labels, binary, color=_BINARY_COLOUR, label='binary (BOPs / 64)')
    bottom.bar(labels, fp, bottom=binary, color=_FP_COLOUR, label='full precision (FLOPs)')
    for i, (b, f) in enumerate(zip(binary, fp)):
        bottom.text(i, b + f, f'{100 * (b + f) / result.ops:.0f}%', ha='center', va='bottom', fontsize=8)
    bottom.set_ylabel('OPs per image')
    bottom.set_ylim(0, max(b + f for b, f in zip(binary, fp)) * 1.15)
    bottom.tick_params(axis='x', labelsize=8, rotation=0 if len(labels) <= 8 else 45)
    bottom.legend(loc='upper right', fontsize=8)
    bottom.set_title('by stage (share of the model\'s OPs)', fontsize=10)

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
