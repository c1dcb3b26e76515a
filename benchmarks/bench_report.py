"""The bookkeeping side of ``bench.py``: rows, ratios, goals and the printed table.

Pure functions of the measured numbers (no torch, no processes), so the tests check them on synthetic
figures.
"""
import statistics
from typing import NamedTuple, Optional

DEIT = 'deit_small_patch16_224'
PVT = 'pvt_v2_b2'
BINARYVIT = 'binaryvit_small_patch4_224'
BINARY_DEIT = 'binary_deit_small_gap_mb_affine_patch16_224'
BASELINES = (DEIT, PVT)
BINARY_MODELS = (BINARYVIT, BINARY_DEIT)

#: Every mode, and the DeiT-S mode its rows are timed against in lockstep.
REFERENCE_MODE = {
    'train': 'train',            # one AdamW step, float32
    'train_gc': 'train',         # the same with set_grad_checkpointing(True)
    'train_compiled': 'train',   # the same through torch.compile(model)
    'eval': 'eval',              # model.eval() forward under inference_mode
    'eval_dep': 'eval',          # the same after timm_binaryvit.deploy(model)
    'eval_b1': 'eval_b1',        # eval forward at batch 1 (the baselines' latency)
    'eval_dep_b1': 'eval_b1',    # deployed eval forward at batch 1
    'packed_b1': 'eval_b1',      # load_packed(path, deployed=True), forward at batch 1
}
MODES = tuple(REFERENCE_MODE)
REFERENCE_MODES = ('train', 'eval', 'eval_b1')
#: Modes measured at batch 1 whatever ``--batch`` says.
BATCH1_MODES = ('eval_b1', 'eval_dep_b1', 'packed_b1')
#: Modes compared with another mode of the same model (ratios of their lockstep ratios to DeiT-S).
OWN_REFERENCE = {'train_gc': 'train', 'train_compiled': 'train', 'eval_dep': 'eval', 'packed_b1': 'eval_dep_b1'}
#: Modes that only apply to this project's models; the baselines run the plain ones.
BINARY_ONLY_MODES = ('train_gc', 'train_compiled', 'eval_dep', 'eval_dep_b1', 'packed_b1')


class Goal(NamedTuple):
    """``quantity`` ('time' or 'mem') of row (model, mode) is at most ``limit`` times DeiT-S's in the row's
    reference mode, or, with ``versus``, times the same model's ``versus`` row."""
    model: str
    mode: str
    quantity: str
    limit: float
    versus: Optional[str] = None
    source: str = ''

    @property
    def label(self) -> str:
        against = f'its {self.versus}' if self.versus else f'DeiT-S {REFERENCE_MODE[self.mode]}'
        return f'{self.model} {self.mode} {self.quantity} / {against}'


def _both(mode: str, quantity: str, limits, versus: Optional[str] = None, source: str = ''):
    """One goal for each binary model: ``limits`` is (BinaryViT's, binary DeiT's)."""
    return tuple(Goal(model, mode, quantity, limit, versus, source) for model, limit in zip(BINARY_MODELS, limits))


GOALS = (
    Goal(BINARYVIT, 'train', 'time', 1.5, source='issue 9'),
    Goal(BINARYVIT, 'train', 'mem', 1.5, source='issue 9'),
    Goal(BINARY_DEIT, 'train', 'time', 1.3, source='issue 9'),
    Goal(BINARY_DEIT, 'train', 'mem', 1.4, source='issue 9'),
    *_both('eval', 'time', (1.5, 1.5), source='issue 9'),
    *_both('eval_dep', 'time', (1.0, 1.0), versus='eval', source='issue 9'),
    *_both('eval_dep', 'time', (0.30, 0.25), source='issue 12'),
    *_both('eval_dep_b1', 'time', (0.5, 0.5), source='issue 12'),
    *_both('train_compiled', 'time', (1.0, 1.0), versus='train', source='issue 10'),
)


def reference_mode(mode: str) -> str:
    return REFERENCE_MODE[mode]


def ok(row) -> bool:
    return row is not None and row.get('status') == 'ok'


def median(values):
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float('nan')


def plan(models, modes):
    """The (model, mode) rows to measure: binary-only modes for this project's models only, the reference
    rows of every baseline in ``models`` (PVT-v2-b2 only for the batch-16 ones), and DeiT-S's always (every
    ratio needs them)."""
    jobs = []
    for model in models:
        for mode in modes:
            if model in BASELINES and mode in BINARY_ONLY_MODES:
                continue
            if mode == 'eval_b1' and model != DEIT:
                continue  # DeiT-S's latency is the reference; the binary models' is their deployed one
            jobs.append((model, mode))
    needed = {reference_mode(m) for _, m in jobs}
    bases = [b for b in reversed(BASELINES) if b in models] + ([] if DEIT in models else [DEIT])
    for base in bases:
        for mode in reversed(REFERENCE_MODES):
            if mode in needed and (base, mode) not in jobs and (base == DEIT or mode != 'eval_b1'):
                jobs.insert(0, (base, mode))
    return jobs


def _own_pair(ratios, model, mode):
    """This round's (time, memory) ratio of (model, mode) to the same model's OWN_REFERENCE row."""
    own = OWN_REFERENCE.get(mode)
    mine, theirs = ratios.get((model, mode)), ratios.get((model, own))
    if own is None or mine is None or theirs is None:
        return None
    return mine[0] / theirs[0], mine[1] / theirs[1]


def summarise(rounds, jobs):
    """One row per job from ``rounds`` (a list of ``(results, ratios)``, ``ratios[(model, mode)]`` being
    that round's (time, memory) ratio to DeiT-S in the row's reference mode).

    Per row: medians over rounds of time, CPU time and peak memory; ``ratios[DEIT]`` the medians over
    rounds of the lockstep ratios; ``ratios[PVT]`` the medians of each round's ratio to DeiT-S divided by
    PVT-v2-b2's in that round; ``own`` the same for the same model's OWN_REFERENCE row."""
    rows = []
    for model, mode in jobs:
        runs = [results.get((model, mode)) for results, _ in rounds]
        good = [r for r in runs if ok(r)]
        if not good:
            rows.append(next((r for r in runs if r is not None), dict(model=model, mode=mode, status='not run')))
            continue
        row = dict(good[0])
        for key in ('time', 'cpu', 'mem'):
            row[key] = median([r[key] for r in good])
        row['per_round'] = [(r['time'], r['mem']) if ok(r) else None for r in runs]
        to_deit = [ratios.get((model, mode)) for _, ratios in rounds]
        pvt_key = (PVT, reference_mode(mode))
        to_pvt = [(r[0] / p[0], r[1] / p[1]) for r, p in zip(to_deit, (ratios.get(pvt_key) for _, ratios in rounds))
                  if r is not None and p is not None]
        row['ratios'] = {}
        for base, values in ((DEIT, [r for r in to_deit if r is not None]), (PVT, to_pvt)):
            if values:
                row['ratios'][base] = (median([t for t, _ in values]), median([m for _, m in values]))
        own = [p for p in (_own_pair(ratios, model, mode) for _, ratios in rounds) if p is not None]
        if own:
            row['own'] = (OWN_REFERENCE[mode], median([t for t, _ in own]), median([m for _, m in own]))
        row['per_round_ratio'] = [r[0] if r is not None else None for r in to_deit]
        row['kernels_per_round'] = [r.get('kernels') if ok(r) else None for r in runs]
        rows.append(row)
    return rows


def fmt(value, spec='.2f', suffix=''):
    if value is None or value != value:
        return 'n/a'
    return f'{value:{spec}}{suffix}'


def kernel_summary(kernels: Optional[dict]) -> str:
    """One line: the mode and, per product, how many shape classes went to each kind."""
    if not kernels:
        return 'no kernel report'
    counts = {}
    for c in kernels.get('choices', []):
        per = counts.setdefault(c['product'], {})
        per[c['kind']] = per.get(c['kind'], 0) + 1
    if not counts:
        return f"mode {kernels.get('mode', '?')}; no product chose a kernel in this process"
    products = '; '.join(f'{p}: ' + ', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))
                         for p, kinds in counts.items())
    return f"mode {kernels.get('mode', '?')}; {products} (shape classes)"


HEADER = (f"{'model':44s} {'mode':14s} {'batch':>5s} {'s/step':>8s} {'cpu s':>8s} {'img/s':>8s} {'peak MiB':>9s}"
          f" {'t/deit':>7s} {'m/deit':>7s} {'t/pvt':>7s} {'m/pvt':>7s} {'t/own':>7s} {'m/own':>7s}  own")


def table_lines(rows, machine: str):
    """The table, the machine named above it, and under each row of this project's models the kernels its
    process chose (one line; the full reports follow the table)."""
    lines = [f'Machine: {machine}', HEADER, '-' * len(HEADER)]
    for row in rows:
        if not ok(row):
            lines.append(f"{row['model']:44s} {row['mode']:14s} {row.get('status')}")
            continue
        line = (f"{row['model']:44s} {row['mode']:14s} {row['batch']:5d} {fmt(row['time'], '.4f'):>8s} "
                f"{fmt(row['cpu'], '.4f'):>8s} {fmt(row['batch'] / row['time'], '.1f'):>8s} {fmt(row['mem'], '.0f'):>9s}")
        for base in BASELINES:
            t, m = row['ratios'].get(base, (None, None))
            line += f" {fmt(t, '.2f', 'x'):>7s} {fmt(m, '.2f', 'x'):>7s}"
        own, t, m = row.get('own', (None, None, None))
        line += f" {fmt(t, '.2f', 'x'):>7s} {fmt(m, '.2f', 'x'):>7s}  {own or ''}"
        lines.append(line.rstrip())
        reports = [k for k in row.get('kernels_per_round', []) if k is not None]
        if reports:
            summaries = list(dict.fromkeys(kernel_summary(k) for k in reports))
            lines.append(f"    kernels: {summaries[0]}" + (' (other rounds: ' + ' | '.join(summaries[1:]) + ')'
                                                           if len(summaries) > 1 else ''))
    return lines


def kernel_report_lines(rows):
    """The full :func:`timm_binaryvit.kernels.report` of each row's process (first round; later rounds
    only where they chose differently)."""
    lines = []
    for row in rows:
        reports = [k for k in row.get('kernels_per_round', []) if k is not None] if ok(row) else []
        if not reports:
            continue
        lines.append(f"{row['model']} {row['mode']}:")
        seen = []
        for i, k in enumerate(row['kernels_per_round']):
            if k is None or k['report'] in seen:
                continue
            seen.append(k['report'])
            if i:
                lines.append(f'  (round {i + 1} chose differently:)')
            lines.extend('  ' + ln for ln in k['report'].splitlines() if not ln.startswith('CPU: '))
    return lines


def goal_ratio(goal: Goal, by_key):
    """(measured ratio, why not measured) of ``goal`` from the summarised rows."""
    row = by_key.get((goal.model, goal.mode))
    if row is None:
        return None, 'row not run'
    if not ok(row):
        return None, str(row.get('status'))
    index = 0 if goal.quantity == 'time' else 1
    if goal.versus:
        own = row.get('own')
        if own is None or own[0] != goal.versus:
            other = by_key.get((goal.model, goal.versus))
            return None, f'{goal.versus} row ' + ('not run' if other is None else str(other.get('status')))
        value = own[1 + index]
    else:
        value = row['ratios'].get(DEIT, (None, None))[index]
    if value is None or value != value:
        return None, 'no lockstep ratio'
    return value, None


def goal_lines(rows, caveat: Optional[str] = None):
    """Every goal with its measured ratio and PASS / FAIL (a goal that could not be measured fails), then
    the figures that have no goal; returns ``(lines, all_passed)``."""
    by_key = {(r['model'], r['mode']): r for r in rows}
    lines = ['Goals (ratios, medians over rounds; ' + (caveat or 'the goals\' configuration') + '):']
    all_passed = True
    for goal in GOALS:
        if (goal.model, goal.mode) not in by_key:
            continue
        value, why = goal_ratio(goal, by_key)
        passed = value is not None and value <= goal.limit
        all_passed &= passed
        measured = f'{value:.2f}x' if value is not None else 'n/a'
        lines.append(f"  {goal.label:80s} {measured:>7s}  goal <= {goal.limit:.2f}x  {'PASS' if passed else 'FAIL'}"
                     + (f'  (not measured: {why})' if why else '') + f'  [{goal.source}]')
    for model in BINARY_MODELS:
        row = by_key.get((model, 'train_gc'))
        if ok(row) and DEIT in row['ratios']:
            t, m = row['ratios'][DEIT]
            lines.append(f"  {model} train_gc (no goal): time {t:.2f}x, memory {m:.2f}x DeiT-S train")
    deit_b1 = by_key.get((DEIT, 'eval_b1'))
    for model in BINARY_MODELS:
        row = by_key.get((model, 'packed_b1'))
        if row is None:
            continue
        if ok(row) and ok(deit_b1):
            m = row['ratios'].get(DEIT, (None, None))[1]
            lines.append(f"  {model} load_packed(deployed=True) peak memory at batch 1 (no goal): "
                         f"{row['mem']:.0f} MiB beside DeiT-S's {deit_b1['mem']:.0f} MiB ({fmt(m, '.2f', 'x')})")
        else:
            lines.append(f"  {model} load_packed(deployed=True) at batch 1: {row.get('status')}")
    lines.append(f"All goals passed: {'yes' if all_passed else 'no'}")
    return lines, all_passed


def per_round_lines(rows):
    lines = ['Per round (s/step, peak MiB, step-time ratio to DeiT-S):']
    for row in rows:
        if ok(row):
            per = '  '.join(
                'failed' if p is None else f'{p[0]:.4f} {p[1]:.0f} ' + (f'{r:.2f}x' if r is not None else '-')
                for p, r in zip(row['per_round'], row['per_round_ratio']))
            lines.append(f"  {row['model']:44s} {row['mode']:14s} {per}")
    return lines


LEGEND = ('s/step, cpu s, peak MiB: medians over rounds (batch-1 rows: seconds per forward); t/..., m/...: time '
          'and peak-memory ratios to deit_small_patch16_224 (deit) and pvt_v2_b2 (pvt) in the row\'s reference '
          'mode (train rows to train, eval rows to eval, batch-1 rows to DeiT-S eval at batch 1); time ratios to '
          'DeiT-S are medians over step pairs taken in turn, then over rounds; t/own, m/own: the same model\'s '
          'row named in "own" (e.g. compiled vs eager, deployed vs training model).')
