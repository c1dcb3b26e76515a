"""The ``timm-binaryvit`` console script.

A few runs go through a subprocess (``python -m timm_binaryvit.cli`` and the installed console
script), the rest call ``timm_binaryvit.cli.main`` in process, which is the same code without
paying for a fresh interpreter.
"""
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import timm

from timm_binaryvit import cli, cli_commands, hub, kernels, model_card

from conftest import (AUTHORS_VARIANTS, QUICK_REFERENCE_TAGS, REFERENCE_DIR, reference_model_kwargs,
                      require_reference, slow_except)

REGISTERED = hub.registered_models()
COMMANDS = ('list', 'profile', 'capability', 'convert', 'export', 'kernels', 'demo')
TINY_PYRAMID = ['--embed-dims', '16', '32', '64', '128', '--depths', '1', '1', '1', '1', '--num-heads', '1', '2', '4',
                '8', '--mlp-ratios', '2', '2', '2', '2', '--sr-ratios', '2', '2', '1', '1', '--img-size', '64']
TAGS = sorted(json.loads((REFERENCE_DIR / 'manifest.json').read_text())) \
    if (REFERENCE_DIR / 'manifest.json').is_file() else ['(reference data absent)']


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_ENDPOINT='http://127.0.0.1:9', PYTHONUNBUFFERED='1')
    return env


def run_cli(*args, timeout=600, console_script=False):
    command = [shutil.which('timm-binaryvit')] if console_script else [sys.executable, '-m', 'timm_binaryvit.cli']
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)


def run_cli_ok(*args, expect=(), **kwargs):
    """:func:`run_cli`, which must exit with 0 and print each text of ``expect`` on its standard output."""
    proc = run_cli(*args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    missing = [text for text in expect if text not in proc.stdout]
    assert not missing, f'not printed: {missing}\n{proc.stdout}'
    return proc


def call(capsys, *args):
    """``main(args)`` in process: (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's --help / usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------
# Help and usage errors


@pytest.mark.slow
def test_help_lists_every_command():
    run_cli_ok('--help', expect=(*COMMANDS, 'BinaryViT', '2306.16678'))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('timm-binaryvit') is None, reason='the console script is not installed on PATH')
def test_console_script():
    run_cli_ok('capability', 'deit_small', console_script=True, expect=('155,568', '153,216'))


@pytest.mark.parametrize('command', COMMANDS)
def test_every_command_has_help(capsys, command):
    code, out, _ = call(capsys, command, '--help')
    assert code == 0
    assert out.startswith(f'usage: timm-binaryvit {command}')
    assert len(out.splitlines()) > 5


def test_no_command_prints_help(capsys):
    code, out, _ = call(capsys)
    assert code == 2 and 'COMMAND' in out


@pytest.mark.slow
def test_unknown_model_subprocess():
    proc = run_cli('profile', 'no_such_model')
    assert proc.returncode == 2
    assert "unknown model 'no_such_model'" in proc.stderr
    for name in REGISTERED:
        assert name in proc.stderr


@pytest.mark.parametrize('args', [
    ('profile', 'resnet50'),
    ('capability', 'no_such_model'),
    ('export', 'no_such_model', '--out', 'x.bin'),
    ('convert', 'ckpt.pth', '--model', 'no_such_model', '--out', 'x'),
    ('list', '--filter', 'nothing*'),
])
def test_unknown_model_exit_code_2(capsys, args):
    code, out, err = call(capsys, *args)
    assert code == 2, (out, err)
    assert 'error:' in err and 'binaryvit' in err


def test_bad_model_arguments_are_usage_errors(capsys):
    code, _, err = call(capsys, 'capability', 'binary_deit_small_patch16_224', '--sr-ratios', '2')
    assert code == 2 and 'no key/value reduction' in err
    code, _, err = call(capsys, 'capability', 'binary_deit_small_patch16_224', '--depth', '1', '2')
    assert code == 2 and 'takes one value' in err
    code, _, err = call(capsys, 'capability', 'binaryvit', '--model-kwargs', 'depths')
    assert code == 2 and 'KEY=VALUE' in err


# ---------------------------------------------------------------------------------------------
# list / profile


@pytest.mark.slow
def test_list_subprocess():
    proc = run_cli_ok('list', expect=REGISTERED)
    assert f'[1/{len(REGISTERED)}] building' in proc.stderr  # progress
    assert '%' in proc.stdout and 'MB' in proc.stdout and 'profile failed' not in proc.stdout


def test_list_without_profile(capsys):
    code, out, err = call(capsys, 'list', '--filter', 'binaryvit*', '--no-profile')
    assert code == 0
    assert 'binaryvit_small_patch4_224' in out and 'binary_deit' not in out
    assert 'skipped (--no-profile)' in out
    assert '22.49 M' in out  # parameters still listed


def test_list_binary_share_matches_profile(capsys):
    from timm_binaryvit.profile import profile

    code, out, _ = call(capsys, 'list', '--filter', 'binary_deit_small_patch16_224')
    assert code == 0
    result = profile(timm.create_model('binary_deit_small_patch16_224', device='meta'))
    share = 100 * result.params_binary / (result.params_binary + result.params_fp)
    assert f'{share:.1f}%' in out


def test_profile(capsys):
    code, out, err = call(capsys, 'profile', 'binaryvit', *TINY_PYRAMID)
    assert code == 0, err
    assert 'stages.0.blocks.0.attn.q' in out and 'building binaryvit' in err
    code, out2, err = call(capsys, 'profile', 'binaryvit', *TINY_PYRAMID[:-2], '--input-size', '3', '64', '64')
    assert code == 0, err
    assert out2 == out


@pytest.mark.slow
def test_profile_subprocess():
    proc = run_cli_ok('profile', 'binary_deit_small_patch16_224', '--depth', '1', '--input-size', '3', '224', '224')
    assert 'blocks.0' in proc.stdout


PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def test_profile_plot(capsys, tmp_path):
    pytest.importorskip('matplotlib', reason='the plot extra (matplotlib) is not installed')
    png = tmp_path / 'sub' / 'profile.png'
    code, out, err = call(capsys, 'profile', 'binaryvit', *TINY_PYRAMID, '--plot', png)
    assert code == 0, err
    assert 'stages.0.blocks.0.attn.q' in out and f'wrote {png}' in out
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_profile_plot_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import fails as if it were not installed
    png = tmp_path / 'profile.png'
    code, out, err = call(capsys, 'profile', 'binaryvit', *TINY_PYRAMID, '--plot', png)
    assert code == 1
    assert 'stages.0.blocks.0.attn.q' in out  # the table is still printed
    assert 'matplotlib' in err and 'pip install "timm-binaryvit[plot]"' in err
    assert not png.exists()


# ---------------------------------------------------------------------------------------------
# capability


@pytest.mark.parametrize('name, expected', [
    ('deit_small', ['155,568', '153,216']),
    ('resnet34', ['71,193,472']),
    ('resnet18', ['Total:']),
    ('binary_deit_small_patch16_224', ['155,568']),
    ('binaryvit', ['Total:']),
])
def test_capability(capsys, name, expected):
    code, out, err = call(capsys, 'capability', name)
    assert code == 0, err
    for text in expected:
        assert text in out


def test_capability_variants(capsys):
    code, out, _ = call(capsys, 'capability', 'deit_small', '--no-attention')
    assert code == 0 and 'Total: 153,216' in out
    code, out, _ = call(capsys, 'capability', 'binary_deit_small_patch16_224', '--depth', '1')
    assert code == 0 and 'blocks.0' in out and 'blocks.1.' not in out
    code, out, _ = call(capsys, 'capability', 'reactdeit')  # authors' variant name
    assert code == 0 and '155,568' in out


# ---------------------------------------------------------------------------------------------
# convert (the authors' checkpoints of ../shared/reference)


def _reference_flags(info):
    kwargs = reference_model_kwargs(info)
    flags = []
    for key, value in kwargs.items():
        flag = '--' + key.replace('_', '-')
        flags += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    return flags


def _check_reference_logits(folder, tag, reference):
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).double().eval()
    io = load_file(str(reference / f'{tag}.io.safetensors'))
    with torch.no_grad():
        logits = model(io['input'].double())
    rel = ((logits - io['logits']).norm() / io['logits'].norm()).item()
    assert rel < 1e-6, rel


@pytest.mark.reference
@pytest.mark.parametrize('tag', slow_except(TAGS, QUICK_REFERENCE_TAGS))
def test_convert_reference_checkpoint(capsys, tmp_path, tag):
    reference = require_reference()
    info = json.loads((reference / 'manifest.json').read_text())[tag]
    out = tmp_path / 'repo'
    flags = _reference_flags(info)
    if tag.startswith('bideit'):
        flags.remove('--num-classes')
        flags.remove(str(info['num_classes']))  # read from the checkpoint's classifier instead
    code, stdout, err = call(capsys, 'convert', reference / f'{tag}.official.safetensors',
                             '--model', info['official_variant'], '--out', out, *flags)
    assert code == 0, err
    assert 'verified' in stdout and 'converting' in err
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == hub.resolve_model_name(info['official_variant'])
    assert hub.constructor_args(timm.create_model(config['architecture'], device='meta')) == \
        hub.constructor_args(timm.create_model(AUTHORS_VARIANTS[info['official_variant']], device='meta'))
    assert config['num_classes'] == info['num_classes']
    card = (out / 'README.md').read_text()
    for text in ('2306.16678', 'CVPR 2023 Workshops', 'Le', model_card.PAPER_TITLE, config['architecture'],
                 f'{tag}.official.safetensors', "authors' BinaryViT training code"):
        assert text in card, text
    _check_reference_logits(out, tag, reference)


@pytest.mark.reference
@pytest.mark.slow
def test_convert_wrapped_pth_subprocess(tmp_path):
    """A .pth as the authors' training script saves it ({'model': ..., 'args': Namespace}), via the CLI."""
    import argparse

    reference = require_reference()
    tag = 'binaryvit_tinycfg'
    info = json.loads((reference / 'manifest.json').read_text())[tag]
    state_dict = load_file(str(reference / f'{tag}.official.safetensors'))
    checkpoint = tmp_path / 'checkpoint.pth'
    torch.save({'model': state_dict, 'epoch': 299, 'args': argparse.Namespace(lr=5e-4, model='binaryvit')},
               checkpoint)
    out = tmp_path / 'repo'
    proc = run_cli('convert', checkpoint, '--model', 'binaryvit', '--out', out, '--source', 'reference data',
                   '--repo-id', 'someone/binaryvit-tiny', *_reference_flags(info))
    assert proc.returncode == 0, proc.stderr
    assert 'reference data' in (out / 'README.md').read_text()
    assert 'hf-hub:someone/binaryvit-tiny' in (out / 'README.md').read_text()
    _check_reference_logits(out, tag, reference)

    proc = run_cli('convert', checkpoint, '--model', 'binaryvit', '--out', out, *_reference_flags(info))
    assert proc.returncode == 1 and '--force' in proc.stderr  # does not overwrite silently


@pytest.mark.reference
def test_convert_with_the_wrong_configuration(capsys, tmp_path):
    reference = require_reference()
    checkpoint = reference / 'binaryvit_tinycfg.official.safetensors'
    code, _, err = call(capsys, 'convert', checkpoint, '--model', 'binaryvit', '--out', tmp_path / 'x')
    assert code == 1
    assert 'binaryvit_tinycfg.official.safetensors' in err and 'does not fit' in err
    code, _, err = call(capsys, 'convert', checkpoint, '--model', 'binary_deit_small_patch16_224',
                        '--out', tmp_path / 'y', '--depth', '1')
    assert code == 1 and 'does not fit' in err and 'binaryvit_tinycfg.official.safetensors' in err


def test_convert_our_own_layout(capsys, tmp_path):
    """A checkpoint saved from this package's models (a plain state dict) converts too."""
    model = timm.create_model('binary_deit_small_gap_patch16_224', depth=1, img_size=32, num_classes=3).eval()
    checkpoint = tmp_path / 'ours.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, checkpoint)
    code, _, err = call(capsys, 'convert', checkpoint, '--model', 'binary_deit_small_gap_patch16_224',
                        '--out', tmp_path / 'repo', '--depth', '1', '--img-size', '32')
    assert code == 0, err
    loaded = timm.create_model(f'local-dir:{tmp_path / "repo"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_convert_unreadable_checkpoint(capsys, tmp_path):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    code, _, err = call(capsys, 'convert', bad, '--model', 'binaryvit', '--out', tmp_path / 'x')
    assert code == 1 and 'bad.pth' in err and 'cannot be read' in err
    code, _, err = call(capsys, 'convert', tmp_path / 'missing.pth', '--model', 'binaryvit', '--out', tmp_path / 'x')
    assert code == 1 and 'missing.pth' in err and 'no such file' in err


# ---------------------------------------------------------------------------------------------
# export


def _deploy_module():
    # the module, not the package attribute ``timm_binaryvit.deploy``, which is the deploy() function
    return importlib.import_module('timm_binaryvit.deploy')


def test_export_checkpoint_needs_model(capsys, tmp_path, monkeypatch):
    checkpoint = tmp_path / 'c.pth'
    torch.save({}, checkpoint)
    monkeypatch.setattr(_deploy_module(), 'export_packed', lambda model, path: None)
    code, _, err = call(capsys, 'export', checkpoint, '--out', tmp_path / 'x.bin')
    assert code == 2 and '--model' in err


@pytest.mark.parametrize('source', ['repo', 'checkpoint', 'name'])
def test_export_calls_export_packed(capsys, tmp_path, monkeypatch, source):
    """What reaches export_packed, and what is printed, with a stand-in export_packed."""
    seen = {}

    def fake_export_packed(model, path):
        seen['model'] = model
        Path(path).write_bytes(b'\0' * 1000)
        return dict(path=str(path), packed_bytes=1000, float32_bytes=32_000, ratio=32.0, binary_tensors=3,
                    binary_weights=7, other_values=11)

    monkeypatch.setattr(_deploy_module(), 'export_packed', fake_export_packed)
    model = timm.create_model('binaryvit', **cli_kwargs()).eval()
    if source == 'repo':
        hub.save_pretrained(model, tmp_path / 'repo')
        spec, extra = f'local-dir:{tmp_path / "repo"}', []
    elif source == 'checkpoint':
        save_file(model.state_dict(), str(tmp_path / 'c.safetensors'))
        spec, extra = tmp_path / 'c.safetensors', ['--model', 'binaryvit', *TINY_PYRAMID]
    else:
        spec, extra = 'binaryvit', TINY_PYRAMID
    code, out, err = call(capsys, 'export', spec, '--out', tmp_path / 'packed.bin', *extra)
    assert code == 0, err
    assert 'float32' in out and '1,000 bytes' in out
    if source != 'name':
        for key, value in model.state_dict().items():
            assert torch.equal(seen['model'].state_dict()[key], value), key
    else:
        assert 'randomly initialised' in err


def cli_kwargs():
    return dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratios=(2, 2, 2, 2),
                sr_ratios=(2, 2, 1, 1), img_size=64)


@pytest.mark.slow
def test_export_subprocess(tmp_path):
    model = timm.create_model('binaryvit', **cli_kwargs()).eval()
    hub.save_pretrained(model, tmp_path / 'repo')
    proc = run_cli_ok('export', f'local-dir:{tmp_path / "repo"}', '--out', tmp_path / 'model.packed')
    assert (tmp_path / 'model.packed').is_file()
    assert 'float32' in proc.stdout and 'packed' in proc.stdout


# ---------------------------------------------------------------------------------------------
# kernels

TINY_KERNEL_ARGS = ['--model', 'binaryvit', '--img-size', '32', '--batch-size', '2', '--model-kwargs',
                    'embed_dims=[16,32,64,128]', 'depths=[1,1,1,1]', 'num_heads=[1,2,4,8]', 'mlp_ratios=[2,2,2,2]']


def _choice_lines(out):
    return [line for line in out.splitlines() if ' -> ' in line]


@pytest.mark.parametrize('mode', ['int8', 'float'])
def test_kernels_forced_mode(capsys, mode):
    kernels.clear_cache()  # only this run's choices in the report (later products measure again)
    before = kernels.get_mode()
    code, out, err = call(capsys, 'kernels', *TINY_KERNEL_ARGS, '--mode', mode)
    assert code == 0, err
    assert kernels.get_mode() == before  # the forced mode held for the command only
    assert re.search(r'^binaryvit +2x3x32x32 ', out, re.M), out
    assert f'CPU: {kernels.describe_machine()}' in out
    assert f'mode: {mode} ' in out
    lines = _choice_lines(out)
    assert lines, 'no product asked timm_binaryvit.kernels.choose() which kernel to run'
    for line in lines:
        kind = line.split(' -> ')[1].split()[0]
        assert kind == mode or (kind == 'float' and f"mode {mode!r} forced" in line), line


def test_kernels_bad_arguments(capsys):
    code, _, err = call(capsys, 'kernels', '--model', 'no_such_model')
    assert code == 2 and "unknown model 'no_such_model'" in err
    code, _, err = call(capsys, 'kernels', *TINY_KERNEL_ARGS, '--batch-size', '0')
    assert code == 2 and '--batch-size' in err
    code, _, err = call(capsys, 'kernels', '--mode', 'fast')
    assert code == 2 and 'invalid choice' in err


@pytest.mark.slow
def test_kernels_subprocess_default_models():
    proc = run_cli_ok('kernels', '--batch-size', '1', '--img-size', '64')
    for name in cli_commands.DEFAULT_KERNEL_MODELS:
        assert re.search(rf'^{name} +1x3x64x64 ', proc.stdout, re.M), proc.stdout
    assert 'CPU: ' in proc.stdout and 'mode: auto' in proc.stdout
    assert 'measured: ' in proc.stdout  # auto mode times the candidates and shows the times


# ---------------------------------------------------------------------------------------------
# demo


def test_demo_passes_its_arguments(capsys, tmp_path, monkeypatch):
    script = tmp_path / 'train_digits.py'
    script.write_text('import json, sys\n'
                      'def main(argv=None):\n'
                      '    print(json.dumps(argv))\n'
                      '    return 0\n')
    monkeypatch.setattr(cli_commands, '_demo_script', lambda: script)
    code, out, _ = call(capsys, 'demo', '--epochs', '1', '--quick')
    assert code == 0 and json.loads(out) == ['--epochs', '1', '--quick']
    code, out, _ = call(capsys, 'demo', '--', '--help')
    assert code == 0 and json.loads(out) == ['--help']


def test_demo_missing_script(capsys, monkeypatch):
    monkeypatch.setattr(cli_commands, '_demo_script', lambda: None)
    code, _, err = call(capsys, 'demo')
    assert code == 1 and 'train_digits.py' in err


@pytest.mark.skipif(cli_commands._demo_script() is None,
                    reason='examples/train_digits.py (provided separately) is not there')
def test_demo_script_is_found():
    assert callable(getattr(_load(cli_commands._demo_script()), 'main', None))


def _load(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location('train_digits_under_test', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Opaque:
    """Stands in for an object a training script pickles beside the weights."""


def test_convert_pickled_objects_need_trust(capsys, tmp_path):
    model = timm.create_model('binary_deit_small_gap_patch16_224', depth=1, img_size=32, num_classes=3)
    checkpoint = tmp_path / 'c.pth'
    torch.save({'model': model.state_dict(), 'extra': _Opaque()}, checkpoint)
    args = ('convert', checkpoint, '--model', 'binary_deit_small_gap_patch16_224', '--depth', '1', '--img-size', '32')
    code, _, err = call(capsys, *args, '--out', tmp_path / 'x')
    assert code == 1 and 'c.pth' in err and '--trust-pickle' in err
    code, _, err = call(capsys, *args, '--out', tmp_path / 'y', '--trust-pickle')
    assert code == 0, err
