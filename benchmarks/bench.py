"""Training, eval, deployed and batch-1 benchmarks of the binary models against timm's DeiT-S and PVT-v2-b2.

Usage (plain Python, from the repository root or anywhere)::

    python benchmarks/bench.py --rounds 3   # full mode: every row 3 times, medians; checks the goals
    python benchmarks/bench.py --quick      # smoke run in a few minutes: batch 2, one step, DeiT-S and the
                                            # binary models only, no grad checkpointing, no compile
    python benchmarks/bench.py train        # training rows only (eager, grad checkpointing, compiled)
    python benchmarks/bench.py eval         # eval rows only (plain, deployed, batch 1, packed)
    python benchmarks/bench.py --quick --tiny   # tiny model configs at 32x32 (what the test runs)

``benchmarks/bench_train.py`` and ``benchmarks/bench_eval.py`` are shortcuts for the two subcommands.

Every (model, mode) row runs in its own Python subprocess (``bench_child.py``), so the peak resident
memory reported for it is that process's own peak (``VmHWM``): importing torch and timm, building the
model, the optimiser state and the steps, nothing subtracted. Each process of this project's models
also returns what :mod:`timm_binaryvit.kernels` chose in it, printed under its row and in full after the
table; the machine (:func:`timm_binaryvit.kernels.describe_machine`) is printed at the top and above the
table, so every figure names the CPU, its flags and torch's capability.

Modes (``bench_report.REFERENCE_MODE``): ``train`` (one AdamW step, float32), ``train_gc`` (with
``set_grad_checkpointing(True)``), ``train_compiled`` (through ``torch.compile(model)``; compiling happens
in the warm-up steps), ``eval`` (forward under ``inference_mode``), ``eval_dep`` (after
``timm_binaryvit.deploy(model)``), and at batch 1: ``eval_b1`` (the baselines' latency), ``eval_dep_b1``
(deployed) and ``packed_b1`` (``timm_binaryvit.load_packed(path, deployed=True)`` of a file written
beforehand by another process).

The machines this runs on are shared and their speed drifts by tens of percent within minutes, so
time is compared in lockstep: per reference mode (train, eval, eval at batch 1) one DeiT-S process stays
up while each other row's process runs beside it, and the two take steps in turn (the waiting one sits
on a pipe, using no CPU; the order flips every step). A row's time ratio to DeiT-S is the median over its
step pairs; its ratio to PVT-v2-b2 is that divided by PVT-v2-b2's own ratio to DeiT-S in the same round,
and its ratio to another row of the same model (compiled vs eager, deployed vs training model) the
quotient of their ratios to DeiT-S in the same round. Memory ratios are of the processes' peaks. With
several rounds, every figure is the median over rounds. The goals (``bench_report.GOALS``) are printed
with PASS / FAIL; they are stated for batch 16 at 224x224, so any other configuration (``--quick``,
``--tiny``) labels them indicative only.
"""
import argparse
import contextlib
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_report import (  # noqa: E402
    BASELINES, BATCH1_MODES, BINARY_DEIT, BINARY_MODELS, BINARYVIT, DEIT, GOALS, LEGEND, MODES, PVT,
    REFERENCE_MODES, goal_lines, kernel_report_lines, ok, per_round_lines, plan, reference_mode, summarise,
    table_lines)

__all__ = ['BASELINES', 'BINARY_DEIT', 'BINARY_MODELS', 'BINARYVIT', 'DEIT', 'GOALS', 'MODES', 'PVT', 'TINY',
           'main', 'run_round', 'plan', 'summarise']

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bench_child.py')

#: ``--tiny``: small configurations of every model at 32x32, 10 classes (the end-to-end test).
TINY_IMG_SIZE, TINY_CLASSES = 32, 10
TINY = {
    DEIT: dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
    PVT: dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
    BINARYVIT: dict(img_size=32, embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
    BINARY_DEIT: dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
}


class ChildFailed(RuntimeError):
    pass


class Child:
    """One measuring process (one model, one mode), driven over its standard input and output."""

    def __init__(self, spec: dict, timeout: float):
        self.spec, self.timeout = spec, timeout
        self.stderr = tempfile.TemporaryFile(mode='w+')
        self.proc = subprocess.Popen([sys.executable, CHILD, json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.times, self.cpu_times = [], []
        _, payload = self._answer()
        self.info = json.loads(payload)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip('\n'))
        self.lines.put(None)

    def _fail(self, why: str):
        self.close()
        self.stderr.seek(0)
        tail = [ln for ln in self.stderr.read().strip().splitlines() if ln.strip()][-1:]
        if not why:
            why = f'exit {self.proc.returncode}' + (f': {tail[0][:200]}' if tail else ' without output')
        raise ChildFailed(why)

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
                self._fail('')
            kind, _, payload = line.partition(' ')
            if kind == 'ERROR':
                self._fail(json.loads(payload))
            if kind in ('READY', 'RESULT', 'OK', 'TIME'):
                return kind, payload

    def _send(self, command: str):
        try:
            self.proc.stdin.write(command + '\n')
            self.proc.stdin.flush()
        except OSError:
            self._fail('')

    def request(self, command: str):
        self._send(command)
        _, payload = self._answer()
        if command == 'step':
            wall, cpu = map(float, payload.split())
            self.times.append(wall)
            self.cpu_times.append(cpu)

    def finish(self) -> dict:
        """End the process; its result: the spec, the step times, its peak memory and kernel choices."""
        self._send('finish')
        _, payload = self._answer()
        self.close()
        result = dict(self.spec, **self.info, **json.loads(payload), times=self.times, cpu_times=self.cpu_times)
        result.update(time=_median(self.times), cpu=_median(self.cpu_times))
        return result

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _median(values):
    values = sorted(values)
    n = len(values)
    return (values[n // 2] + values[(n - 1) // 2]) / 2 if n else float('nan')


def _failed(spec: dict, why) -> dict:
    return dict(spec, status=f'failed ({why})')


def _lockstep(base: Child, child: Child, warmup: int, steps: int) -> float:
    """Warm ``child`` up, then ``steps`` step pairs in turn with ``base``; the median step-time ratio."""
    for _ in range(warmup):
        child.request('warmup')
    base.request('warmup')  # the caches are the other process's after its warm-up
    pairs = []
    for i in range(steps):
        for c in ((base, child) if i % 2 == 0 else (child, base)):
            c.request('step')
        pairs.append(child.times[-1] / base.times[-1])
    return _median(pairs)


def run_round(jobs, make_spec, warmup: int, steps: int, timeout: float):
    """One round: per reference mode, one DeiT-S process stays up while every other row of that mode runs
    beside it, step for step in turn. Returns ``(results, ratios)``: ``ratios[(model, mode)]`` is ``(median
    of the step-time ratios, peak-memory ratio)`` to that DeiT-S process."""
    results, ratios = {}, {}
    for ref_mode in REFERENCE_MODES:
        rows = [job for job in jobs if reference_mode(job[1]) == ref_mode and job != (DEIT, ref_mode)]
        if not rows and (DEIT, ref_mode) not in jobs:
            continue
        try:
            base = Child(make_spec(DEIT, ref_mode), timeout)
            for _ in range(warmup):
                base.request('warmup')
        except ChildFailed as e:
            results[(DEIT, ref_mode)] = _failed(make_spec(DEIT, ref_mode), e)
            for job in rows:
                results[job] = _failed(make_spec(*job), f'no {DEIT} baseline: {e}')
            continue
        paired = {}
        try:
            for job in rows:
                spec = make_spec(*job)
                if spec.get('unavailable'):
                    results[job] = _failed(spec, spec['unavailable'])
                    continue
                try:
                    child = Child(spec, timeout)
                    paired[job] = _lockstep(base, child, warmup, steps)
                    results[job] = child.finish()
                except ChildFailed as e:
                    results[job] = _failed(spec, e)
                    paired.pop(job, None)
                print(f'  [{ref_mode}] {job[0]} {job[1]}: {results[job]["status"]}', file=sys.stderr, flush=True)
            if not base.times:  # DeiT-S alone (no other row of this mode): its own steps
                for _ in range(steps):
                    base.request('step')
            results[(DEIT, ref_mode)] = base.finish()
        except ChildFailed as e:
            results[(DEIT, ref_mode)] = _failed(make_spec(DEIT, ref_mode), e)
            for job in rows:
                if ok(results.get(job)):
                    results[job] = _failed(make_spec(*job), f'{DEIT} baseline failed: {e}')
            continue
        base_mem = results[(DEIT, ref_mode)]['mem']
        ratios[(DEIT, ref_mode)] = (1.0, 1.0)
        for job, time_ratio in paired.items():
            ratios[job] = (time_ratio, results[job]['mem'] / base_mem)
    return results, ratios


def export_packed_files(models, make_spec, directory: str, timeout: float):
    """Write each model's packed file in a process of its own; ``{model: path or 'failed (...)'}``."""
    out = {}
    for model in models:
        path = os.path.join(directory, f'{model}.packed')
        spec = make_spec(model, 'eval')
        try:
            proc = subprocess.run([sys.executable, CHILD, '_export', json.dumps(spec), path],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            out[model] = f'export_packed timed out after {timeout:.0f} s'
            continue
        if proc.returncode == 0 and os.path.exists(path):
            out[model] = path
        else:
            err = next((ln[6:] for ln in proc.stdout.splitlines() if ln.startswith('ERROR ')), None)
            tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ['no output']
            out[model] = 'export_packed failed: ' + (json.loads(err) if err else tail[0][:200])
    return out


def machine_description() -> str:
    """:func:`timm_binaryvit.kernels.describe_machine` (CPU model, flags, torch capability, threads) plus
    the logical CPU count and the versions."""
    import timm
    import torch
    try:
        from timm_binaryvit.kernels import describe_machine
        machine = describe_machine()
    except Exception as e:  # the benchmark still names what it can
        machine = f'{platform.processor() or platform.machine()} (kernels.describe_machine failed: {e})'
    return (f'{machine}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, timm {timm.__version__}, '
            f'Python {platform.python_version()}')


def _load() -> str:
    return ', '.join(f'{v:.2f}' for v in os.getloadavg())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('what', nargs='?', default='all', choices=('all', 'train', 'eval'))
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: batch 2, 1 warm-up and 1 measured step, only the rows the goals need '
                             'except train_compiled (no PVT-v2-b2, no train_gc; --models / --modes add them); '
                             'goals printed as indicative only')
    parser.add_argument('--tiny', action='store_true', help='tiny configs of every model at 32x32, 10 classes')
    parser.add_argument('--batch', type=int, default=None, help='batch size (default 16, quick 2); *_b1 rows use 1')
    parser.add_argument('--img-size', type=int, default=None, help='image size (default 224, tiny 32)')
    parser.add_argument('--warmup', type=int, default=None, help='warm-up steps per process (default 2, quick 1)')
    parser.add_argument('--steps', type=int, default=None, help='measured steps per process (default 5, quick 1)')
    parser.add_argument('--b1-repeat', type=int, default=None,
                        help='forwards per step of the batch-1 rows (default 5, quick 2)')
    parser.add_argument('--rounds', type=int, default=1, help='measure every row this many times, interleaved')
    parser.add_argument('--threads', type=int, default=0, help='torch threads in the children (0: torch default)')
    parser.add_argument('--models', nargs='+', default=None, help='models to measure (default: baselines + binary)')
    parser.add_argument('--modes', nargs='+', default=None, choices=MODES)
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per answer of a child process')
    parser.add_argument('--json', default=None, help='also write all results to this file')
    args = parser.parse_args(argv)
    for name in ('batch', 'img_size', 'steps', 'b1_repeat', 'rounds'):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1, got {value}')
    if args.warmup is not None and args.warmup < 0:
        parser.error(f'--warmup must be at least 0, got {args.warmup}')
    return args


def _modes(args):
    if args.modes:
        return args.modes
    train = ('train',) if args.quick else ('train', 'train_gc', 'train_compiled')
    evaluation = ('eval', 'eval_dep', 'eval_b1', 'eval_dep_b1', 'packed_b1')
    return {'all': train + evaluation, 'train': train, 'eval': evaluation}[args.what]


def _models(args):
    # The quick run keeps to the rows the goals need: PVT-v2-b2 only gives context.
    return list(BINARY_MODELS) if args.quick else list(BASELINES + BINARY_MODELS)


def main(argv=None):
    args = parse_args(argv)
    batch = args.batch or (2 if args.quick else 16)
    img_size = args.img_size or (TINY_IMG_SIZE if args.tiny else 224)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps or (1 if args.quick else 5)
    repeat = args.b1_repeat or (2 if args.quick else 5)
    jobs = plan(args.models or _models(args), _modes(args))
    machine = machine_description()
    caveat = None
    if args.quick or args.tiny or batch != 16 or img_size != 224:
        caveat = (f'INDICATIVE ONLY: batch {batch} at {img_size}x{img_size}' + (', tiny configs' if args.tiny else '')
                  + (', quick mode' if args.quick else '') + '; the goals are stated for batch 16 at 224x224')

    print(f'Machine: {machine}')
    print(f'Batch {batch} (batch-1 rows: 1, {repeat} forwards per step), {img_size}x{img_size}, float32'
          f'{", tiny configs" if args.tiny else ""}, {warmup} warm-up + {steps} measured steps per process, one '
          f'process per row, each beside a DeiT-S process and stepped in turn with it, {args.rounds} round(s); '
          f'load average at start {_load()}', flush=True)

    packed = {}
    with tempfile.TemporaryDirectory(prefix='bench-packed-') as directory:
        need_packed = sorted({m for m, mode in jobs if mode == 'packed_b1'})

        def make_spec(model, mode):
            spec = dict(model=model, mode=mode, batch=1 if mode in BATCH1_MODES else batch, img_size=img_size,
                        threads=args.threads, repeat=repeat if mode in BATCH1_MODES else 1,
                        model_args=TINY.get(model, {}) if args.tiny else {},
                        num_classes=TINY_CLASSES if args.tiny else 1000)
            if mode == 'packed_b1':
                found = packed.get(model, 'no packed file was written')
                if os.path.exists(found):
                    spec['packed_path'] = found
                else:
                    spec['unavailable'] = found
            return spec

        packed.update(export_packed_files(need_packed, make_spec, directory, args.timeout))
        rounds = []
        started = time.time()
        for _ in range(args.rounds):
            rounds.append(run_round(jobs, make_spec, warmup, steps, args.timeout))
    print(f'(measured in {time.time() - started:.0f} s; load average at end {_load()})\n')

    rows = summarise(rounds, jobs)
    print('\n'.join(table_lines(rows, machine)))
    if args.rounds > 1:
        print('\n' + '\n'.join(per_round_lines(rows)))
    print('\n' + LEGEND)
    kernel_lines = kernel_report_lines(rows)
    if kernel_lines:
        print('\nKernels chosen by timm_binaryvit.kernels in each row\'s process (machine as above):')
        print('\n'.join(kernel_lines))
    print('\n' + '\n'.join(goal_lines(rows, caveat)[0]))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(machine=machine, batch=batch, img_size=img_size, tiny=args.tiny, rows=rows,
                           rounds=[dict(results={f'{k[0]}:{k[1]}': v for k, v in results.items()},
                                        ratios_to_deit={f'{k[0]}:{k[1]}': v for k, v in ratios.items()})
                                   for results, ratios in rounds]), f, indent=1)
    failed = [r for r in rows if not ok(r)]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
