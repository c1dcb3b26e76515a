"""Training-step, peak-memory and eval benchmarks of the binary models against timm's DeiT-S and PVT-v2-b2.

Usage (plain Python, from the repository root or anywhere)::

    python benchmarks/bench.py              # everything: train, train + grad checkpointing, eval, deployed eval
    python benchmarks/bench.py train        # training step only (with and without checkpointing)
    python benchmarks/bench.py eval         # eval forward only (plain and deployed)
    python benchmarks/bench.py --quick      # CI smoke run: batch 2, one step, a few minutes at most
    python benchmarks/bench.py --rounds 3   # measure everything 3 times, interleaved; report medians

``benchmarks/bench_train.py`` and ``benchmarks/bench_eval.py`` are shortcuts for the first two
subcommands.

Every (model, mode) row runs in its own Python subprocess, so the peak resident memory reported
for it is that process's own peak (``VmHWM`` of ``/proc/self/status``, falling back to
``getrusage(RUSAGE_SELF).ru_maxrss``): importing torch and timm, building the model, the
optimiser state and the steps themselves, with nothing subtracted. Times are medians over the
measured steps, after warm-up steps; the CPU time (user + system, all threads) of each step is
reported as well.

Modes:
    ``train``     one AdamW step (zero_grad, forward, cross-entropy, backward, step), float32.
    ``train_gc``  the same with ``model.set_grad_checkpointing(True)``.
    ``eval``      ``model.eval()`` forward under ``torch.inference_mode()``; img/s is the throughput.
    ``eval_dep``  the same after ``timm_binaryvit.deploy.deploy(model)`` (binary models only;
                  ``n/a`` when that module is not available).

Ratios are to ``deit_small_patch16_224`` and ``pvt_v2_b2`` (their plain ``train`` / ``eval`` rows).
With several rounds, each round measures every row once, in the same order, and a ratio is the
median over rounds of the ratio within a round: on a machine whose speed drifts (other load,
clock changes), a model is compared with the baseline measured minutes, not a quarter of an hour,
apart. The full mode checks the project's goals (``GOALS``); ``--quick`` only smoke-tests.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

DEIT = 'deit_small_patch16_224'
PVT = 'pvt_v2_b2'
BINARYVIT = 'binaryvit_small_patch4_224'
BINARY_DEIT = 'binary_deit_small_gap_mb_affine_patch16_224'
BASELINES = (DEIT, PVT)
BINARY_MODELS = (BINARYVIT, BINARY_DEIT)
MODES = ('train', 'train_gc', 'eval', 'eval_dep')

# (model, mode, quantity, limit): quantity 'time' or 'mem', as a ratio to DeiT-S's plain row of the
# same kind (train rows to DeiT-S train, eval rows to DeiT-S eval).
GOALS = (
    (BINARYVIT, 'train', 'time', 2.5),
    (BINARYVIT, 'train', 'mem', 2.0),
    (BINARY_DEIT, 'train', 'time', 1.3),
    (BINARY_DEIT, 'train', 'mem', 1.5),
    (BINARYVIT, 'eval_dep', 'time', 1.5),
    (BINARY_DEIT, 'eval_dep', 'time', 1.2),
)


# ---------------------------------------------------------------------------------------------
# Child: measure one (model, mode) in this process


def _peak_rss_mib() -> float:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != 'darwin' else peak / 2 ** 20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    import timm
    import timm_binaryvit  # noqa: F401  registers the binary models

    if spec.get('threads'):
        torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    name, mode = spec['model'], spec['mode']
    batch, size = spec['batch'], spec['img_size']
    model = timm.create_model(name, num_classes=1000)
    result = dict(model=name, mode=mode, batch=batch, img_size=size, threads=torch.get_num_threads(),
                  params=sum(p.numel() for p in model.parameters()))
    x = torch.randn(batch, 3, size, size)

    if mode.startswith('train'):
        if mode == 'train_gc':
            model.set_grad_checkpointing(True)
        model.train()
        target = torch.randint(0, 1000, (batch,))
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
    else:
        model.eval()
        if mode == 'eval_dep':
            try:
                from timm_binaryvit.deploy import deploy
            except ImportError as e:
                return dict(result, status=f'n/a ({e.__class__.__name__}: {e})')
            deployed = deploy(model)
            model = deployed if deployed is not None else model

        def step():
            with torch.inference_mode():
                model(x)

    for _ in range(spec['warmup']):
        step()
    times, cpu_times = [], []
    for _ in range(spec['steps']):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(_cpu_seconds() - c0)
    return dict(result, status='ok', times=times, cpu_times=cpu_times, peak_rss_mib=_peak_rss_mib(),
                time=statistics.median(times), cpu=statistics.median(cpu_times), mem=_peak_rss_mib())


def child_main(spec_json: str) -> None:
    result = measure(json.loads(spec_json))
    print('RESULT ' + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '_child', json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, status=f'failed (timeout after {timeout:.0f} s)')
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']
    return dict(spec, status=f'failed (exit {proc.returncode}: {tail[0][:200]})')


def _median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float('nan')


def _ok(row) -> bool:
    return row is not None and row.get('status') == 'ok'


def _reference_mode(mode: str) -> str:
    return 'train' if mode.startswith('train') else 'eval'


def summarise(rounds, jobs):
    """Per row: medians over rounds of time, CPU time and peak memory, and per baseline the median over
    rounds of the within-round ratios."""
    rows = []
    for model, mode in jobs:
        runs = [r[(model, mode)] for r in rounds]
        ok = [r for r in runs if _ok(r)]
        if not ok:
            rows.append(runs[0])
            continue
        row = dict(ok[0])
        row['time'] = _median([r['time'] for r in ok])
        row['cpu'] = _median([r['cpu'] for r in ok])
        row['mem'] = _median([r['mem'] for r in ok])
        row['per_round'] = [(r['time'], r['mem']) if _ok(r) else None for r in runs]
        row['ratios'] = {}
        for base in BASELINES:
            key = (base, _reference_mode(mode))
            pairs = [(r[(model, mode)], r.get(key)) for r in rounds]
            pairs = [(a, b) for a, b in pairs if _ok(a) and _ok(b)]
            if pairs:
                row['ratios'][base] = (_median([a['time'] / b['time'] for a, b in pairs]),
                                       _median([a['mem'] / b['mem'] for a, b in pairs]))
        rows.append(row)
    return rows


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith('Model name:'):
                model = line.split(':', 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    import torch
    import timm
    return (f'{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__} '
            f'({torch.get_num_threads()} threads), timm {timm.__version__}, Python {platform.python_version()}')


def _fmt(value, spec='.2f', suffix=''):
    if value is None or value != value:
        return 'n/a'
    return f'{value:{spec}}{suffix}'


def print_table(rows):
    header = (f"{'model':44s} {'mode':9s} {'s/step':>8s} {'cpu s':>8s} {'img/s':>8s} {'peak MiB':>9s}"
              f" {'t/deit':>7s} {'m/deit':>7s} {'t/pvt':>7s} {'m/pvt':>7s}")
    print(header)
    print('-' * len(header))
    for row in rows:
        if not _ok(row):
            print(f"{row['model']:44s} {row['mode']:9s} {row.get('status')}")
            continue
        line = (f"{row['model']:44s} {row['mode']:9s} {_fmt(row['time'], '.3f'):>8s} {_fmt(row['cpu'], '.3f'):>8s} "
                f"{_fmt(row['batch'] / row['time'], '.1f'):>8s} {_fmt(row['mem'], '.0f'):>9s}")
        for base in BASELINES:
            t, m = row['ratios'].get(base, (float('nan'), float('nan')))
            line += f" {_fmt(t, '.2f', 'x'):>7s} {_fmt(m, '.2f', 'x'):>7s}"
        print(line)


def check_goals(rows) -> bool:
    by_key = {(r['model'], r['mode']): r for r in rows}
    print('\nGoals (ratios to deit_small_patch16_224, medians over rounds):')
    all_met = True
    for model, mode, quantity, limit in GOALS:
        row = by_key.get((model, mode))
        if row is None:
            continue
        label = f'{model} {mode} {quantity}'
        ratio = row['ratios'].get(DEIT, (float('nan'),) * 2)[0 if quantity == 'time' else 1] if _ok(row) else None
        if ratio is None or ratio != ratio:
            print(f'  {label:58s} <= {limit:.2f}x: not measured ({row.get("status")})')
            all_met = False
            continue
        met = ratio <= limit
        all_met &= met
        print(f"  {label:58s} <= {limit:.2f}x: {ratio:.2f}x  {'MET' if met else 'NOT MET'}")
    for model in BINARY_MODELS:
        row = by_key.get((model, 'train_gc'))
        if _ok(row) and DEIT in row['ratios']:
            t, m = row['ratios'][DEIT]
            print(f"  {model + ' train_gc (no goal)':58s}          time {t:.2f}x, memory {m:.2f}x")
    print(f"All goals met: {'yes' if all_met else 'no'}")
    return all_met


def plan(models, modes):
    jobs = []
    for model in models:
        for mode in modes:
            if model in BASELINES and mode in ('train_gc', 'eval_dep'):
                continue  # no deployed form; their checkpointed step is no goal
            jobs.append((model, mode))
    # The baselines' plain rows are needed for the ratios.
    for base in reversed(BASELINES):
        for mode in ('eval', 'train'):
            if (base, mode) not in jobs and any(_reference_mode(m) == mode for _, m in jobs):
                jobs.insert(0, (base, mode))
    return jobs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('what', nargs='?', default='all', choices=('all', 'train', 'eval'))
    parser.add_argument('--quick', action='store_true',
                        help='CI smoke run: batch 2, 1 warm-up and 1 measured step, no goal check')
    parser.add_argument('--batch', type=int, default=None, help='batch size (default 16, quick 2)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--warmup', type=int, default=None, help='warm-up steps per process (default 2, quick 1)')
    parser.add_argument('--steps', type=int, default=None, help='measured steps per process (default 5, quick 1)')
    parser.add_argument('--rounds', type=int, default=1, help='measure every row this many times, interleaved')
    parser.add_argument('--threads', type=int, default=0, help='torch threads in the children (0: torch default)')
    parser.add_argument('--models', nargs='+', default=None, help='models to measure (default: baselines + binary)')
    parser.add_argument('--modes', nargs='+', default=None, choices=MODES)
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per child process')
    parser.add_argument('--json', default=None, help='also write all results to this file')
    args = parser.parse_args(argv)

    batch = args.batch or (2 if args.quick else 16)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps or (1 if args.quick else 5)
    modes = args.modes or {'all': MODES, 'train': ('train', 'train_gc'), 'eval': ('eval', 'eval_dep')}[args.what]
    jobs = plan(args.models or list(BASELINES + BINARY_MODELS), modes)

    print(f'Machine: {machine_description()}')
    print(f'Batch {batch}, {args.img_size}x{args.img_size}, float32, {warmup} warm-up + {steps} measured steps '
          f'per process, one process per row, {args.rounds} round(s); load average at start '
          f'{", ".join(f"{v:.2f}" for v in os.getloadavg())}', flush=True)
    rounds = []
    started = time.time()
    for _ in range(args.rounds):
        results = {}
        for model, mode in jobs:
            spec = dict(model=model, mode=mode, batch=batch, img_size=args.img_size, warmup=warmup,
                        steps=steps, threads=args.threads)
            results[(model, mode)] = run_child(spec, args.timeout)
        rounds.append(results)
    print(f'(measured in {time.time() - started:.0f} s; load average at end '
          f'{", ".join(f"{v:.2f}" for v in os.getloadavg())})\n')

    rows = summarise(rounds, jobs)
    print_table(rows)
    if args.rounds > 1:
        print('\nPer round (s/step, peak MiB):')
        for row in rows:
            if _ok(row):
                per = '  '.join(f'{t:.3f} {m:.0f}' if t is not None else 'failed'
                                for t, m in (p if p else (None, None) for p in row['per_round']))
                print(f"  {row['model']:44s} {row['mode']:9s} {per}")
    print('\ns/step, cpu s, peak MiB: medians over rounds; t/..., m/...: time and peak-memory ratios to '
          'deit_small_patch16_224 (deit) and pvt_v2_b2 (pvt), train rows to their train row, eval rows to '
          'their eval row.')
    if not args.quick:
        check_goals(rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(batch=batch, img_size=args.img_size, rows=rows,
                           rounds=[{f'{k[0]}:{k[1]}': v for k, v in r.items()} for r in rounds]), f, indent=1)
    failed = [r for r in rows if not _ok(r) and not str(r.get('status', '')).startswith('n/a')]
    return 1 if failed else 0


if __name__ == '__main__':
    if len(sys.argv) > 2 and sys.argv[1] == '_child':
        child_main(sys.argv[2])
    else:
        sys.exit(main())
