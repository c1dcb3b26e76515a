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
The machines this runs on are shared and their speed drifts by tens of percent within minutes, so
time is compared in lockstep: per mode, one DeiT-S process stays up while each other row's process
runs beside it, and the two take steps in turn (the other one waits on a pipe, using no CPU; the
order flips every step). A row's time ratio to DeiT-S is the median over its step pairs, taken
seconds apart; its ratio to PVT-v2-b2 is that divided by PVT-v2-b2's own lockstep ratio to DeiT-S.
Memory ratios are of the processes' peaks. With several rounds, every reported figure is the median
over rounds.
The full mode checks the project's goals (``GOALS``); ``--quick`` only smoke-tests.
"""
import argparse
import contextlib
import json
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
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


def _build_step(spec: dict):
    """The model of ``spec`` and a function running one step of its mode; ``(None, status)`` where the
    mode does not apply."""
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
    info = dict(threads=torch.get_num_threads(), params=sum(p.numel() for p in model.parameters()))
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
        return step, info
    model.eval()
    if mode == 'eval_dep':
        try:
            from timm_binaryvit.deploy import deploy
        except ImportError as e:
            return None, dict(info, status=f'n/a ({e.__class__.__name__}: {e})')
        deployed = deploy(model)
        model = deployed if deployed is not None else model

    def step():
        with torch.inference_mode():
            model(x)
    return step, info


def child_main(spec_json: str) -> None:
    """Serve steps on request: ``warmup`` (untimed) and ``step`` (answers ``TIME wall cpu``), then
    ``finish`` (answers ``RESULT {...}`` with the peak resident memory). Between requests the process
    waits on its input, using no CPU, so the driver can run two models' steps in turn."""
    spec = json.loads(spec_json)
    step, info = _build_step(spec)
    if step is None:
        print('RESULT ' + json.dumps(info), flush=True)
        return
    print('READY ' + json.dumps(info), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == 'warmup':
            step()
            print('OK', flush=True)
        elif command == 'step':
            t0, c0 = time.perf_counter(), _cpu_seconds()
            step()
            print(f'TIME {time.perf_counter() - t0!r} {_cpu_seconds() - c0!r}', flush=True)
        elif command == 'finish':
            print('RESULT ' + json.dumps(dict(status='ok', mem=_peak_rss_mib())), flush=True)
            return


# ---------------------------------------------------------------------------------------------
# Driver


class ChildFailed(RuntimeError):
    pass


class Child:
    """One measuring process (one model, one mode), driven over its standard input and output."""

    def __init__(self, spec: dict, timeout: float):
        self.spec, self.timeout = spec, timeout
        self.stderr = tempfile.TemporaryFile(mode='w+')
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), '_child', json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.times, self.cpu_times = [], []
        self.result = None
        kind, payload = self._answer()
        if kind == 'RESULT':  # the mode does not apply (e.g. no deploy module)
            self.result = dict(spec, **json.loads(payload))
            self.close()
        elif kind == 'READY':
            self.info = json.loads(payload)
        else:
            self._fail(f'unexpected answer {kind!r}')

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip('\n'))
        self.lines.put(None)

    def _fail(self, why: str):
        self.close()
        self.stderr.seek(0)
        tail = [ln for ln in self.stderr.read().strip().splitlines() if ln.strip()][-1:] or [why]
        raise ChildFailed(f'exit {self.proc.returncode}: {tail[0][:200]}')

    def _answer(self):
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise ChildFailed(f'timeout after {self.timeout:.0f} s')
            if line is None:
                self.proc.wait()
                self._fail('no answer')
            kind, _, payload = line.partition(' ')
            if kind in ('READY', 'RESULT', 'OK', 'TIME'):
                return kind, payload

    def request(self, command: str):
        try:
            self.proc.stdin.write(command + '\n')
            self.proc.stdin.flush()
        except OSError:
            self._fail('input closed')
        _, payload = self._answer()
        if command == 'step':
            wall, cpu = map(float, payload.split())
            self.times.append(wall)
            self.cpu_times.append(cpu)

    def finish(self) -> dict:
        """End the process; its result: the spec, the step times and its peak resident memory."""
        try:
            self.proc.stdin.write('finish\n')
            self.proc.stdin.flush()
        except OSError:
            self._fail('input closed')
        _, payload = self._answer()
        self.close()
        result = dict(self.spec, **self.info, **json.loads(payload), times=self.times, cpu_times=self.cpu_times)
        result.update(time=statistics.median(self.times), cpu=statistics.median(self.cpu_times))
        return result

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _failed(spec: dict, error: Exception) -> dict:
    return dict(spec, status=f'failed ({error})')


def run_round(jobs, make_spec, warmup: int, steps: int, timeout: float):
    """One round: per reference mode, one DeiT-S process stays up while every other row of that mode
    runs beside it, step for step in turn (the order flips every step), so that each step of a model
    is compared with a DeiT-S step taken seconds before or after it. Returns ``(results, ratios)``:
    ``ratios[(model, mode)]`` is ``(median of the step-time ratios, peak-memory ratio)`` to DeiT-S."""
    results, ratios = {}, {}
    for ref_mode in ('train', 'eval'):
        rows = [job for job in jobs if _reference_mode(job[1]) == ref_mode and job != (DEIT, ref_mode)]
        if not rows and (DEIT, ref_mode) not in jobs:
            continue
        try:
            base = Child(make_spec(DEIT, ref_mode), timeout)
        except ChildFailed as e:
            results[(DEIT, ref_mode)] = _failed(make_spec(DEIT, ref_mode), e)
            for job in rows:
                results[job] = _failed(make_spec(*job), f'no {DEIT} baseline: {e}')
            continue
        paired = {}
        try:
            for _ in range(warmup):
                base.request('warmup')
            for job in rows:
                try:
                    child = Child(make_spec(*job), timeout)
                    if child.result is not None:
                        results[job] = child.result
                        continue
                    for _ in range(warmup):
                        child.request('warmup')
                    base.request('warmup')  # the caches are the other process's after its warm-up
                    pairs = []
                    for i in range(steps):
                        order = (base, child) if i % 2 == 0 else (child, base)
                        for c in order:
                            c.request('step')
                        pairs.append(child.times[-1] / base.times[-1])
                    results[job] = child.finish()
                    paired[job] = statistics.median(pairs)
                except ChildFailed as e:
                    results[job] = _failed(make_spec(*job), e)
            if not base.times:  # DeiT-S alone (no other row of this mode): its own steps
                for _ in range(steps):
                    base.request('step')
            results[(DEIT, ref_mode)] = base.finish()
        except ChildFailed as e:
            results[(DEIT, ref_mode)] = _failed(make_spec(DEIT, ref_mode), e)
            for job in rows:
                if _ok(results.get(job)):
                    results[job] = _failed(make_spec(*job), f'{DEIT} baseline failed: {e}')
            continue
        base_mem = results[(DEIT, ref_mode)]['mem']
        ratios[(DEIT, ref_mode)] = (1.0, 1.0)
        for job, time_ratio in paired.items():
            ratios[job] = (time_ratio, results[job]['mem'] / base_mem)
    return results, ratios


def _median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float('nan')


def _ok(row) -> bool:
    return row is not None and row.get('status') == 'ok'


def _reference_mode(mode: str) -> str:
    return 'train' if mode.startswith('train') else 'eval'


def summarise(rounds, jobs):
    """Per row: medians over rounds of time, CPU time and peak memory, and per baseline the median over
    rounds of that round's ratio (to DeiT-S: measured in lockstep; to PVT-v2-b2: the ratio to DeiT-S
    divided by PVT-v2-b2's ratio to DeiT-S of the same round)."""
    rows = []
    for model, mode in jobs:
        runs = [results[(model, mode)] for results, _ in rounds]
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
        to_deit = [ratios.get((model, mode)) for _, ratios in rounds]
        pvt_key = (PVT, _reference_mode(mode))
        to_pvt = [(r[0] / p[0], r[1] / p[1]) for r, p in zip(to_deit, (ratios.get(pvt_key) for _, ratios in rounds))
                  if r is not None and p is not None]
        for base, values in ((DEIT, [r for r in to_deit if r is not None]), (PVT, to_pvt)):
            if values:
                row['ratios'][base] = (_median([t for t, _ in values]), _median([m for _, m in values]))
        row['per_round_ratio'] = [r[0] if r is not None else None for r in to_deit]
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
          f'per process, one process per row, each beside a DeiT-S process and stepped in turn with it, '
          f'{args.rounds} round(s); load average at start '
          f'{", ".join(f"{v:.2f}" for v in os.getloadavg())}', flush=True)
    def make_spec(model, mode):
        return dict(model=model, mode=mode, batch=batch, img_size=args.img_size, threads=args.threads)

    rounds = []
    started = time.time()
    for _ in range(args.rounds):
        rounds.append(run_round(jobs, make_spec, warmup, steps, args.timeout))
    print(f'(measured in {time.time() - started:.0f} s; load average at end '
          f'{", ".join(f"{v:.2f}" for v in os.getloadavg())})\n')

    rows = summarise(rounds, jobs)
    print_table(rows)
    if args.rounds > 1:
        print('\nPer round (s/step, peak MiB, step-time ratio to DeiT-S):')
        for row in rows:
            if _ok(row):
                per = '  '.join(
                    'failed' if p is None else f'{p[0]:.3f} {p[1]:.0f} ' + (f'{r:.2f}x' if r is not None else '-')
                    for p, r in zip(row['per_round'], row['per_round_ratio']))
                print(f"  {row['model']:44s} {row['mode']:9s} {per}")
    print('\ns/step, cpu s, peak MiB: medians over rounds; t/..., m/...: time and peak-memory ratios to '
          'deit_small_patch16_224 (deit) and pvt_v2_b2 (pvt), train rows to their train row, eval rows to '
          'their eval row; time ratios to DeiT-S are medians over step pairs taken in turn, then over rounds.')
    if not args.quick:
        check_goals(rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(batch=batch, img_size=args.img_size, rows=rows,
                           rounds=[dict(results={f'{k[0]}:{k[1]}': v for k, v in results.items()},
                                       ratios_to_deit={f'{k[0]}:{k[1]}': v for k, v in ratios.items()})
                                  for results, ratios in rounds]), f, indent=1)
    failed = [r for r in rows if not _ok(r) and not str(r.get('status', '')).startswith('n/a')]
    return 1 if failed else 0


if __name__ == '__main__':
    if len(sys.argv) > 2 and sys.argv[1] == '_child':
        child_main(sys.argv[2])
    else:
        sys.exit(main())
