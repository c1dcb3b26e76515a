"""Training-step, peak-memory and eval benchmarks of the binary models against timm's DeiT-S and PVT-v2-b2.

Usage (plain Python, from the repository root or anywhere)::

    python benchmarks/bench.py              # everything: train, train + grad checkpointing, eval, deployed eval
    python benchmarks/bench.py train        # training step only (with and without checkpointing)
    python benchmarks/bench.py eval         # eval forward only (plain and deployed)
    python benchmarks/bench.py --quick      # CI smoke run: tiny batch, few steps (~1-2 minutes on 2 cores)
    python benchmarks/bench.py --repeat 3   # measure every row 3 times (interleaved), report medians

``benchmarks/bench_train.py`` and ``benchmarks/bench_eval.py`` are shortcuts for the first two
subcommands.

Every (model, mode) row runs in its own Python subprocess, so the peak resident memory reported
for it is that process's own peak (``VmHWM`` of ``/proc/self/status``, falling back to
``getrusage(RUSAGE_SELF).ru_maxrss``): importing torch and timm, building the model, the
optimiser state and the step itself, with nothing subtracted. Times are medians over the
measured steps, after warm-up steps; the CPU time (user + system, all threads) of each step is
reported as well, since it is less sensitive than wall time to other load on the machine.

Modes:
    ``train``     one AdamW step (zero_grad, forward, cross-entropy, backward, step), float32.
    ``train_gc``  the same with ``model.set_grad_checkpointing(True)``.
    ``eval``      ``model.eval()`` forward under ``torch.inference_mode()``.
    ``eval_dep``  the same after ``timm_binaryvit.deploy.deploy(model)`` (binary models only;
                  ``n/a`` when the deploy module is not available).

Ratios are to ``deit_small_patch16_224`` and ``pvt_v2_b2`` measured in the same run (their
plain ``train`` / ``eval`` rows). The full mode checks the project's goals (see ``GOALS``).
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

# (model, mode, quantity, limit): quantity is 'time' or 'mem', the ratio to DeiT-S's plain row
# of the same kind (train rows to DeiT-S train, eval rows to DeiT-S eval).
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
    return dict(result, status='ok', times=times, cpu_times=cpu_times, peak_rss_mib=_peak_rss_mib())


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
    return statistics.median(values) if values else float('nan')


def combine(runs):
    """Several runs of one row -> one row: medians of the per-run medians (and the maximum peak memory
    is not used; the median peak is)."""
    ok = [r for r in runs if r.get('status') == 'ok']
    if not ok:
        return runs[0]
    row = dict(ok[0])
    row['time'] = _median([_median(r['times']) for r in ok])
    row['cpu'] = _median([_median(r['cpu_times']) for r in ok])
    row['mem'] = _median([r['peak_rss_mib'] for r in ok])
    row['per_run_time'] = [_median(r['times']) for r in ok]
    row['per_run_mem'] = [r['peak_rss_mib'] for r in ok]
    return row


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


def print_table(rows, baselines):
    header = (f"{'model':46s} {'mode':9s} {'s/step':>8s} {'cpu s':>8s} {'img/s':>8s} {'peak MiB':>9s}"
              + ''.join(f" {'t/' + short:>8s} {'m/' + short:>8s}" for short, _ in baselines))
    print(header)
    print('-' * len(header))
    for row in rows:
        if row.get('status') != 'ok':
            print(f"{row['model']:46s} {row['mode']:9s} {row.get('status')}")
            continue
        line = (f"{row['model']:46s} {row['mode']:9s} {_fmt(row['time'], '.3f'):>8s} {_fmt(row['cpu'], '.3f'):>8s} "
                f"{_fmt(row['batch'] / row['time'], '.1f'):>8s} {_fmt(row['mem'], '.0f'):>9s}")
        for _, base in baselines:
            ref = base.get('train' if row['mode'].startswith('train') else 'eval')
            if ref is None or ref.get('status') != 'ok':
                line += f" {'n/a':>8s} {'n/a':>8s}"
            else:
                line += f" {_fmt(row['time'] / ref['time'], '.2f', 'x'):>8s} {_fmt(row['mem'] / ref['mem'], '.2f', 'x'):>8s}"
        print(line)


def check_goals(table):
    deit = table.get(DEIT, {})
    print('\nGoals (ratios to deit_small_patch16_224 in this run):')
    all_met = True
    for model, mode, quantity, limit in GOALS:
        row = table.get(model, {}).get(mode)
        ref = deit.get('train' if mode.startswith('train') else 'eval')
        label = f'{model} {mode} {quantity}'
        if row is None or ref is None:
            continue
        if row.get('status') != 'ok' or ref.get('status') != 'ok':
            print(f'  {label:62s} <= {limit:.2f}x: not measured ({row.get("status")})')
            all_met = False
            continue
        ratio = row[quantity] / ref[quantity]
        met = ratio <= limit
        all_met &= met
        print(f"  {label:62s} <= {limit:.2f}x: {ratio:.2f}x  {'MET' if met else 'NOT MET'}")
    for model in BINARY_MODELS:
        row, ref = table.get(model, {}).get('train_gc'), deit.get('train')
        if row and ref and row.get('status') == 'ok' and ref.get('status') == 'ok':
            print(f"  {model + ' train_gc (informational)':62s}         "
                  f"time {row['time'] / ref['time']:.2f}x, memory {row['mem'] / ref['mem']:.2f}x")
    print(f"All goals met: {'yes' if all_met else 'no'}")
    return all_met


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('what', nargs='?', default='all', choices=('all', 'train', 'eval'))
    parser.add_argument('--quick', action='store_true', help='CI smoke run: batch 2, 1 warm-up and 2 measured steps')
    parser.add_argument('--batch', type=int, default=None, help='batch size (default 16, quick 2)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--warmup', type=int, default=None, help='warm-up steps (default 2, quick 1)')
    parser.add_argument('--steps', type=int, default=None, help='measured steps (default 5, quick 2)')
    parser.add_argument('--repeat', type=int, default=1, help='measure each row this many times, interleaved')
    parser.add_argument('--threads', type=int, default=0, help='torch threads in the children (0: torch default)')
    parser.add_argument('--models', nargs='+', default=None, help='models to measure (default: baselines + binary)')
    parser.add_argument('--modes', nargs='+', default=None, choices=MODES)
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per child process')
    parser.add_argument('--json', default=None, help='also write all results to this file')
    args = parser.parse_args(argv)

    batch = args.batch or (2 if args.quick else 16)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps or (2 if args.quick else 5)
    modes = args.modes or {'all': MODES, 'train': ('train', 'train_gc'), 'eval': ('eval', 'eval_dep')}[args.what]
    models = args.models or list(BASELINES + BINARY_MODELS)

    jobs = []
    for model in models:
        for mode in modes:
            if model in BASELINES and mode in ('train_gc', 'eval_dep'):
                continue  # the baselines have no deployed form; their checkpointed step is no goal
            jobs.append((model, mode))
    # The baselines' plain rows are needed for the ratios.
    for base in BASELINES:
        for mode in ('train', 'eval'):
            if (base, mode) not in jobs and any(m.startswith(mode) for _, m in jobs):
                jobs.insert(0, (base, mode))

    print(f'Machine: {machine_description()}')
    print(f'Batch {batch}, {args.img_size}x{args.img_size}, float32, {warmup} warm-up + {steps} measured steps '
          f'per process, {args.repeat} run(s) per row; one process per row; load average at start '
          f'{", ".join(f"{v:.2f}" for v in os.getloadavg())}', flush=True)
    runs = {job: [] for job in jobs}
    started = time.time()
    for _ in range(args.repeat):
        for model, mode in jobs:
            spec = dict(model=model, mode=mode, batch=batch, img_size=args.img_size, warmup=warmup,
                        steps=steps, threads=args.threads)
            runs[(model, mode)].append(run_child(spec, args.timeout))
    print(f'(measured in {time.time() - started:.0f} s; load average at end '
          f'{", ".join(f"{v:.2f}" for v in os.getloadavg())})\n')

    table = {}
    rows = []
    for model, mode in jobs:
        row = combine(runs[(model, mode)])
        table.setdefault(model, {})[mode] = row
        rows.append(row)
    order = {m: i for i, m in enumerate(models)}
    rows.sort(key=lambda r: (order.get(r['model'], -1), MODES.index(r['mode'])))
    baselines = [('deit', table.get(DEIT, {})), ('pvt', table.get(PVT, {}))]
    print_table(rows, baselines)
    if args.repeat > 1:
        print('\nPer-run medians (s/step) and peaks (MiB):')
        for row in rows:
            if row.get('status') == 'ok':
                print(f"  {row['model']:46s} {row['mode']:9s} "
                      f"{' '.join(f'{t:.3f}' for t in row['per_run_time'])}  |  "
                      f"{' '.join(f'{m:.0f}' for m in row['per_run_mem'])}")
    print('\nt/deit, m/deit: time and peak-memory ratios to deit_small_patch16_224; t/pvt, m/pvt: to pvt_v2_b2 '
          '(train rows to its train row, eval rows to its eval row).')
    if not args.quick:
        check_goals(table)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(batch=batch, img_size=args.img_size, rows=rows, runs={f'{k[0]}:{k[1]}': v for k, v in runs.items()}),
                      f, indent=1)
    return 0 if all(r.get('status') == 'ok' or r['mode'] == 'eval_dep' for r in rows) else 1


if __name__ == '__main__':
    if len(sys.argv) > 2 and sys.argv[1] == '_child':
        child_main(sys.argv[2])
    else:
        sys.exit(main())
