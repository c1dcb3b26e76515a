"""The measuring side of ``bench.py``: one process measures one (model, mode) row.

``python bench_child.py SPEC_JSON`` builds the row's model and serves requests on its standard input:

* ``warmup``: one untimed step; answers ``OK``;
* ``step``: one timed step; answers ``TIME wall cpu`` (seconds per forward for batch-1 rows, which run
  ``repeat`` forwards per step);
* ``finish``: answers ``RESULT {...}`` with the process's peak resident memory and, for this project's
  models, the kernels :mod:`timm_binaryvit.kernels` chose in this process, then exits.

Any failure (building, compiling, a step) answers ``ERROR "message"`` and exits, so the driver can
report it on the row and go on. Between requests the process waits on its input, using no CPU.

``python bench_child.py _export SPEC_JSON PATH`` writes the packed file of SPEC's model
(:func:`timm_binaryvit.export_packed`) for the ``packed_b1`` rows, in a process of its own so that the
measuring process only ever holds what ``load_packed`` builds.
"""
import json
import resource
import sys
import time
import traceback
import types


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``, else ``ru_maxrss``) in MiB."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != 'darwin' else peak / 2 ** 20


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _public(name: str):
    """``timm_binaryvit.<name>`` as a function: the package exports ``deploy`` / ``load_packed`` /
    ``export_packed``; should ``deploy`` resolve to its module (a package in the making), take the
    function of the same name inside it."""
    import timm_binaryvit
    found = getattr(timm_binaryvit, name)
    return getattr(found, name) if isinstance(found, types.ModuleType) else found


def create_model(spec: dict):
    import timm
    import timm_binaryvit  # noqa: F401  registers the binary models
    return timm.create_model(spec['model'], num_classes=spec.get('num_classes', 1000), **spec.get('model_args', {}))


def build_step(spec: dict):
    """The model of ``spec`` (in its mode's form) and a function running one step of that mode."""
    import torch
    import torch.nn.functional as F

    if spec.get('threads'):
        torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    mode, batch, size = spec['mode'], spec['batch'], spec['img_size']
    if mode == 'packed_b1':
        model = _public('load_packed')(spec['packed_path'], deployed=True)
    else:
        model = create_model(spec)
    info = dict(threads=torch.get_num_threads(), params=sum(p.numel() for p in model.parameters()),
                ours=type(model).__module__.startswith('timm_binaryvit'))
    x = torch.randn(batch, 3, size, size)

    if mode.startswith('train'):
        model.train()
        if mode == 'train_gc':
            model.set_grad_checkpointing(True)
        net = torch.compile(model) if mode == 'train_compiled' else model
        target = torch.randint(0, spec.get('num_classes', 1000), (batch,))
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), target)
            loss.backward()
            optimizer.step()
        return step, info

    model.eval()
    if mode in ('eval_dep', 'eval_dep_b1'):
        model = _public('deploy')(model)  # the training model is dropped: the row holds what deploy keeps
    repeat = max(1, int(spec.get('repeat', 1)))

    def step():
        with torch.inference_mode():
            for _ in range(repeat):
                model(x)
    step.repeat = repeat
    return step, info


def kernel_choices() -> dict:
    """What :mod:`timm_binaryvit.kernels` decided in this process: its mode, each choice, the report."""
    try:
        from timm_binaryvit import kernels
        return dict(mode=kernels.get_mode(), report=kernels.report(),
                    choices=[dict(product=c.product, shape=list(c.shape), dtype=c.dtype, kind=c.kind, reason=c.reason)
                             for c in kernels.choices()])
    except Exception as e:  # an older or broken kernels module must not lose the row's figures
        return dict(mode='n/a', report=f'kernels report unavailable ({type(e).__name__}: {e})', choices=[])


def _error(e: BaseException) -> None:
    lines = [ln for ln in traceback.format_exception_only(type(e), e)[-1].strip().splitlines() if ln.strip()]
    print('ERROR ' + json.dumps((lines[0] if lines else type(e).__name__)[:300]), flush=True)
    traceback.print_exc()  # the whole story goes to the driver's stderr file


def serve(spec: dict) -> int:
    try:
        step, info = build_step(spec)
    except Exception as e:
        _error(e)
        return 1
    print('READY ' + json.dumps(info), flush=True)
    per_step = getattr(step, 'repeat', 1)
    for line in sys.stdin:
        command = line.strip()
        try:
            if command == 'warmup':
                step()
                print('OK', flush=True)
            elif command == 'step':
                t0, c0 = time.perf_counter(), cpu_seconds()
                step()
                wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                print(f'TIME {wall / per_step!r} {cpu / per_step!r}', flush=True)
            elif command == 'finish':
                result = dict(status='ok', mem=peak_rss_mib())
                if info['ours']:
                    result['kernels'] = kernel_choices()
                print('RESULT ' + json.dumps(result), flush=True)
                return 0
        except Exception as e:
            _error(e)
            return 1
    return 0


def export(spec: dict, path: str) -> int:
    try:
        _public('export_packed')(create_model(spec).eval(), path)
    except Exception as e:
        _error(e)
        return 1
    print('OK', flush=True)
    return 0


if __name__ == '__main__':
    if len(sys.argv) == 4 and sys.argv[1] == '_export':
        sys.exit(export(json.loads(sys.argv[2]), sys.argv[3]))
    if len(sys.argv) != 2:
        sys.exit('usage: bench_child.py SPEC_JSON  |  bench_child.py _export SPEC_JSON PATH (driven by bench.py)')
    sys.exit(serve(json.loads(sys.argv[1])))
