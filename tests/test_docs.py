"""Every command and snippet in README.md and docs/*.md is run by a test or by CI, so none can go stale.

Conventions (docs/testing.md explains them to writers):

* A fenced ``bash`` block holds commands, one per line (``\\`` continues a line, ``#`` starts a comment,
  ``&&`` chains two commands). Each command must match exactly one entry of :data:`COVERAGE`, which says
  how it is proven: ``ci`` (``.ci/run`` contains it verbatim), ``run`` (this file runs it), ``pytest`` (a
  selection of the suite CI runs: its files, tests and markers must exist) or ``tests`` (the named tests
  run it; they must exist, and every long option of the command must appear in their files).
* Commands of timm's stock scripts (``train.py`` ...) may only use options the script defines.
* A fenced ``python`` block runs, each block in a fresh namespace, in a temporary folder, with kernels
  forced to float (no measurement, no build of the packed extension) and the Hub offline. A block that
  cannot run (it needs a file or a network) is preceded by the line ``<!-- not run: REASON -->``.
* Blocks of any other language (``text``, ...) are output and are not checked.
* Every relative link resolves to a file of the repository.
"""
import configparser
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

import timm_sources

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / 'tests'
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
NOT_RUN = re.compile(r'^<!--\s*not run:\s*\S.*-->$')
STOCK_SCRIPTS = ('train.py', 'validate.py', 'inference.py', 'benchmark.py', 'onnx_export.py', 'onnx_validate.py')


@dataclass(frozen=True)
class Cover:
    """How the commands matching ``pattern`` (a regular expression on the whole command) are proven."""
    pattern: str
    how: str  # 'ci', 'run', 'pytest' or 'tests'
    tests: Tuple[str, ...] = ()  # 'tests/test_x.py::test_name' for how == 'tests'
    why: str = ''


COVERAGE = [
    Cover(r'python -m pip install -e "\.\[test\]"', 'ci'),
    Cover(r'python -m pytest -q tests', 'ci'),
    Cover(r'python -m pytest (?!-q tests$).*', 'pytest'),
    Cover(r'timm-binaryvit capability deit_small', 'run'),
    Cover(r'python examples/train_digits\.py( --quick)?', 'tests',
          ('tests/test_digits.py::test_quick_run_distils_binary_student',
           'tests/test_digits.py::test_quick_run_draws_the_picture'),
          'the tests run the script with --quick; its defaults differ only in the number of epochs'),
    Cover(r'python -c "import timm; print\(timm\.list_models\(\'binary\*\'\)\)"', 'tests',
          ('tests/test_autoload.py::test_import_timm_registers_models',)),
    Cover(r'python train\.py (?!.*--kd-model-name)(?!.*--amp).*', 'tests',
          ('tests/test_stock_scripts.py::test_train',)),
    Cover(r'python train\.py .*--amp.*', 'tests', ('tests/test_stock_scripts.py::test_train_option',)),
    Cover(r'python train\.py .*--kd-model-name .*', 'tests',
          ('tests/test_stock_scripts.py::test_train_logit_distillation',)),
    Cover(r'torchrun --nproc_per_node=\d+ train\.py -c examples/configs/\S+\.yaml .*', 'tests',
          ('tests/test_configs.py::test_keys_are_train_py_arguments',
           'tests/test_configs.py::test_train_py_has_the_options_the_docs_use',
           'tests/test_distributed.py::test_ranks_hold_identical_weights'),
          'no GPU in CI: the configs are checked against train.py, DDP runs on two CPU processes'),
    Cover(r'timm-binaryvit profile \S+ --plot \S+\.png', 'tests', ('tests/test_cli.py::test_profile_plot',)),
    Cover(r'timm-binaryvit convert .*', 'tests',
          ('tests/test_cli.py::test_convert_reference_checkpoint', 'tests/test_cli.py::test_convert_wrapped_pth_subprocess')),
    Cover(r'timm-binaryvit kernels', 'tests', ('tests/test_cli.py::test_kernels_subprocess_default_models',)),
    Cover(r'TIMM_BINARYVIT_KERNELS=\w+ timm-binaryvit kernels .*', 'tests',
          ('tests/test_cli.py::test_kernels_forced_mode',
           'tests/test_kernels.py::test_environment_variable_reaches_a_fresh_process')),
    Cover(r'python benchmarks/bench\.py --quick --tiny', 'tests',
          ('tests/test_benchmarks.py::test_quick_tiny_run_end_to_end',)),
    Cover(r'python benchmarks/bench\.py --rounds \d+', 'tests',
          ('tests/test_benchmarks.py::test_scripts_have_help', 'tests/test_benchmarks.py::test_quick_tiny_run_end_to_end'),
          'the full mode takes an hour: CI runs the same script in quick mode and checks that --rounds exists'),
]


# ---------------------------------------------------------------------------------------------
# Reading the documents


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: Optional[str]  # the reason, for a python block marked as not run

    @property
    def where(self) -> str:
        return f'{self.path.relative_to(ROOT)}:{self.line}'


def blocks(path: Path) -> List[Block]:
    found, lines = [], path.read_text(encoding='utf-8').splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith('```'):
            lang, start = lines[i][3:].strip(), i
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith('```')), None)
            assert end is not None, f'{path.name}:{i + 1}: unclosed code fence'
            previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), '')
            reason = previous if NOT_RUN.match(previous) else None
            found.append(Block(path, start + 1, lang, '\n'.join(lines[start + 1:end]) + '\n', reason))
            i = end
        i += 1
    return found


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in '"\'':
            quote = ch
        elif ch == '#' and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(text: str) -> List[str]:
    """The commands of a bash block: continuations joined, comments dropped, ``&&`` chains split."""
    out, current = [], ''
    for raw in text.splitlines():
        line = _strip_comment(raw)
        if line.endswith('\\'):
            current += line[:-1].strip() + ' '
            continue
        current += line.strip()
        out.extend(c.strip() for c in current.split(' && ') if c.strip())
        current = ''
    assert not current.strip(), f'a continued line ends the block: {current!r}'
    return [' '.join(c.split()) for c in out]


def all_blocks(lang: str) -> List[Block]:
    return [b for path in DOCS for b in blocks(path) if b.lang == lang]


def all_commands() -> List[Tuple[Block, str]]:
    return [(b, c) for b in all_blocks('bash') for c in commands(b.text)]


def cover_of(command: str) -> List[Cover]:
    return [c for c in COVERAGE if re.fullmatch(c.pattern, command)]


def _ids(items):
    return [f'{b.where}:{c[:40]}' for b, c in items]


# ---------------------------------------------------------------------------------------------
# The conventions themselves


def test_parsing_rules(tmp_path):
    text = 'pip install -e ".[test]"  # comment\npython a.py --x 1 \\\n    --y "a # b" && echo done\n# only a comment\n'
    assert commands(text) == ['pip install -e ".[test]"', 'python a.py --x 1 --y "a # b"', 'echo done']
    doc = '<!-- not run: needs a file -->\n```python\nx = 1\n```\n```bash\nls\n```\n'
    path = tmp_path / 'doc.md'
    path.write_text(doc)
    found = blocks(path)
    assert [(b.lang, b.line, b.not_run is not None) for b in found] == [('python', 2, True), ('bash', 5, False)]


def test_docs_have_commands_and_snippets():
    assert len(DOCS) >= 8, [p.name for p in DOCS]
    assert all_commands() and all_blocks('python')


def test_readme_is_short():
    lines = (ROOT / 'README.md').read_text(encoding='utf-8').splitlines()
    assert len(lines) <= 260, f'README.md has {len(lines)} lines; move detail into docs/'


# ---------------------------------------------------------------------------------------------
# Commands


@pytest.mark.parametrize('block,command', all_commands(), ids=_ids(all_commands()))
def test_command_is_covered(block, command):
    found = cover_of(command)
    assert len(found) == 1, (
        f'{block.where}: {command!r} matches {len(found)} entries of COVERAGE in tests/test_docs.py; '
        f'every documented command must say (once) which test or CI step runs it')
    cover = found[0]
    if cover.how == 'ci':
        ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8').splitlines()
        assert any(command in line for line in ci), f'{block.where}: .ci/run does not run {command!r}'
    elif cover.how == 'pytest':
        _check_pytest_selection(block, command)
    elif cover.how == 'tests':
        _check_named_tests(block, command, cover)
    else:
        assert cover.how == 'run', cover


def test_ci_runs_exactly_the_readme_commands():
    """.ci/run is the README's install command, then the README's test command, and nothing else."""
    ci = [ln.strip() for ln in (ROOT / '.ci' / 'run').read_text(encoding='utf-8').splitlines()
          if ln.strip() and not ln.lstrip().startswith('#')]
    readme = [c for b in blocks(ROOT / 'README.md') if b.lang == 'bash' for c in commands(b.text)]
    install, test = 'python -m pip install -e ".[test]"', 'python -m pytest -q tests'
    assert install in readme and test in readme, readme
    assert [ln for ln in ci if ln.startswith('python')] == [install, test], ci


def _test_exists(node: str) -> bool:
    file, _, name = node.partition('::')
    path = ROOT / file
    if not name:
        return path.exists()
    if not path.is_file():
        return False
    return re.search(rf'^(async )?def {re.escape(name)}\(', path.read_text(encoding='utf-8'), re.M) is not None


def _long_options(command: str) -> List[str]:
    return sorted({tok.split('=')[0] for tok in shlex.split(command) if tok.startswith('--') and len(tok) > 2})


def _check_named_tests(block: Block, command: str, cover: Cover):
    missing = [t for t in cover.tests if not _test_exists(t)]
    assert not missing, f'{block.where}: {command!r} is said to be run by {missing}, which do not exist'
    text = '\n'.join((ROOT / t.partition('::')[0]).read_text(encoding='utf-8') for t in cover.tests)
    untested = [o for o in _long_options(command) if o not in text and o[2:].replace('-', '_') not in text]
    assert not untested, (f'{block.where}: {command!r} uses {untested}, which none of {list(cover.tests)} passes; '
                          f'test the option or drop it from the docs')
    for token in shlex.split(command):
        if re.match(r'^(examples|benchmarks|tests|src)/', token):
            assert (ROOT / token).exists(), f'{block.where}: {token} does not exist'


def _check_pytest_selection(block: Block, command: str):
    args = shlex.split(command)
    assert args[:3] == ['python', '-m', 'pytest'], command
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'setup.cfg')
    declared = re.findall(r'^(\w+):', cfg['tool:pytest']['markers'].strip(), re.M)
    it = iter(args[3:])
    for arg in it:
        if arg in ('-m', '-k'):
            expr = next(it)
            if arg == '-m':
                unknown = set(re.findall(r'\w+', expr)) - {'not', 'and', 'or'} - set(declared)
                assert not unknown, f'{block.where}: markers {unknown} are not declared in setup.cfg'
        elif arg.startswith('-'):
            assert arg in ('-q', '-x', '-v', '-s'), f'{block.where}: unexpected pytest option {arg}'
        else:
            assert _test_exists(arg), f'{block.where}: {arg} does not exist'


STOCK_COMMANDS = [(b, c) for b, c in all_commands() if any(t in STOCK_SCRIPTS for t in shlex.split(c))]


@pytest.mark.parametrize('block,command', STOCK_COMMANDS, ids=_ids(STOCK_COMMANDS))
def test_stock_script_options_exist(block, command):
    """A documented option of timm's train.py / validate.py ... must be one the script defines."""
    script = next(tok for tok in shlex.split(command) if tok in STOCK_SCRIPTS)
    path = timm_sources.require_scripts([script])[script]
    source = path.read_text(encoding='utf-8')
    unknown = [o for o in _long_options(command) if f"'{o}'" not in source and f'"{o}"' not in source
               and o != '--nproc_per_node']
    assert not unknown, f'{block.where}: {script} has no option {unknown}'


def test_cheap_commands_run(capsys):
    from timm_binaryvit import cli

    ran = 0
    for block, command in all_commands():
        if cover_of(command)[:1] and cover_of(command)[0].how == 'run':
            args = shlex.split(command)
            assert args[0] == 'timm-binaryvit', command
            code = cli.main(args[1:])
            out = capsys.readouterr()
            assert code == 0, f'{block.where}: {command!r} exited {code}\n{out.out[-2000:]}\n{out.err[-2000:]}'
            assert out.out.strip(), f'{block.where}: {command!r} printed nothing'
            ran += 1
    assert ran, 'no documented command is run here'


# ---------------------------------------------------------------------------------------------
# Python snippets

RUNNER = textwrap.dedent('''
    import json, sys, traceback
    failures = []
    for block in json.load(open(sys.argv[1])):
        try:
            exec(compile(block['text'], block['where'], 'exec'), {'__name__': '__main__'})
        except BaseException:
            failures.append(block['where'] + '\\n' + traceback.format_exc(limit=4))
    print(json.dumps(failures))
''')


@pytest.mark.slow
@pytest.mark.parametrize('path', [p for p in DOCS if any(b.lang == 'python' for b in blocks(p))],
                         ids=lambda p: p.name)
def test_python_snippets_run(path, tmp_path):
    runnable = [b for b in blocks(path) if b.lang == 'python' and b.not_run is None]
    if not runnable:
        pytest.skip(f'every python block of {path.name} is marked not run')
    spec = tmp_path / 'blocks.json'
    spec.write_text(json.dumps([{'where': b.where, 'text': b.text} for b in runnable]))
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_BINARYVIT_AUTOLOAD'}
    env.update(TIMM_BINARYVIT_KERNELS='float', HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
    work = tmp_path / 'work'
    work.mkdir()
    proc = subprocess.run([sys.executable, '-c', RUNNER, str(spec)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, '\n\n'.join(failures)


# ---------------------------------------------------------------------------------------------
# Links


@pytest.mark.parametrize('path', DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    text = re.sub(r'```.*?```', '', path.read_text(encoding='utf-8'), flags=re.S)
    broken = []
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'^[a-z]+:', target) or target.startswith('#'):
            continue
        if not (path.parent / target.split('#')[0]).exists():
            broken.append(target)
    assert not broken, f'{path.relative_to(ROOT)}: links to missing files: {broken}'


def test_named_test_files_exist():
    """Test files the docs point readers to are real."""
    named = {m for p in DOCS for m in re.findall(r'tests/test_\w+\.py', p.read_text(encoding='utf-8'))}
    assert named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing
