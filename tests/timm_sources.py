"""Where the tests find timm's own source files: its stock scripts and its model test-suite.

Nothing from timm's repository is kept in this repository.

* **Stock scripts** (``train.py``, ``validate.py``, ``inference.py``, ``benchmark.py``, ``onnx_export.py``,
  ``onnx_validate.py``): timm ships them in neither its wheel nor its sdist, only in its GitHub repository. They are
  read, unmodified, from ``../shared/timm-scripts/`` beside the repository root, or from the folder named by
  ``TIMM_SCRIPTS_DIR``. A missing folder or script fails the test under ``CI=true`` and skips it otherwise, with the
  path that was looked at.
* **timm's model test-suite** (``tests/test_models.py``): taken from timm's source distribution on PyPI for the
  *installed* timm version (``pip download --no-deps --no-binary :all: timm==<version>``), extracted into
  ``$TIMM_BINARYVIT_CACHE/timm-src-<version>`` (default ``~/.cache/timm-binaryvit/timm-src-<version>``), or copied
  from ``TIMM_SOURCE_DIR``, a checkout of huggingface/pytorch-image-models at the installed version's tag. A failed
  download fails the test under ``CI=true`` and skips it otherwise.

Only the archive's top-level ``*.py`` files, ``tests/`` and ``pyproject.toml`` are extracted; timm's own ``timm/``
package never is, so whatever runs from the cache imports the installed timm.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import timm

__all__ = [
    'SCRIPTS', 'TEST_MODELS', 'SCRIPTS_ENV', 'TimmSourceUnavailable', 'cache_dir', 'get_files', 'in_ci',
    'load_script_module', 'require', 'require_scripts', 'require_test_models', 'script_arguments', 'scripts_dir',
    'timm_version',
]

SCRIPTS = ('train.py', 'validate.py', 'inference.py', 'benchmark.py', 'onnx_export.py', 'onnx_validate.py')
SCRIPTS_ENV = 'TIMM_SCRIPTS_DIR'
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCRIPTS_DIR = REPO_ROOT.parent / 'shared' / 'timm-scripts'
TEST_MODELS = 'tests/test_models.py'
_COMPLETE = '.complete'


class TimmSourceUnavailable(RuntimeError):
    """The files could not be obtained."""


def timm_version() -> str:
    return timm.__version__


def _truthy(name: str) -> bool:
    return os.environ.get(name, '').strip().lower() not in ('', '0', 'false', 'no', 'off')


def in_ci() -> bool:
    return _truthy('CI')


def _fail_or_skip(reason: str):
    """Inside a test: fail under ``CI=true`` (CI must run everything), skip otherwise."""
    import pytest

    if in_ci():
        pytest.fail(reason + ' (CI=true requires it)', pytrace=False)
    pytest.skip(reason)


# --- the stock scripts -------------------------------------------------------------------------------------------

def scripts_dir() -> Path:
    """``$TIMM_SCRIPTS_DIR`` if set, else ``../shared/timm-scripts`` beside the repository root."""
    env = os.environ.get(SCRIPTS_ENV, '').strip()
    return Path(env).expanduser().resolve() if env else DEFAULT_SCRIPTS_DIR


def find_scripts(names: Iterable[str] = SCRIPTS) -> Dict[str, Path]:
    """``{name: path}`` of timm's stock scripts; raises ``TimmSourceUnavailable`` naming what is missing where."""
    folder = scripts_dir()
    source = f'${SCRIPTS_ENV}' if os.environ.get(SCRIPTS_ENV, '').strip() else 'the default location'
    if not folder.is_dir():
        raise TimmSourceUnavailable(
            f"timm's stock scripts not found: {folder} ({source}) is not a folder. Put timm's unmodified train.py, "
            f"validate.py, inference.py, benchmark.py, onnx_export.py and onnx_validate.py there (they live only in "
            f"timm's GitHub repository), or set {SCRIPTS_ENV} to a folder holding them.")
    names = list(names)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise TimmSourceUnavailable(f"timm's stock scripts: {', '.join(missing)} missing from {folder} ({source})")
    return {n: folder / n for n in names}


def require_scripts(names: Iterable[str] = SCRIPTS) -> Dict[str, Path]:
    """``find_scripts`` inside a test: a failure under ``CI=true``, a skip with the reason otherwise."""
    try:
        return find_scripts(names)
    except TimmSourceUnavailable as e:
        _fail_or_skip(str(e))


def load_script_module(path):
    """Import a stock script as a module (its ``if __name__ == '__main__'`` part does not run), e.g. to use the
    ``argparse`` parser ``train.py`` builds at import. Each call gives a fresh module, so ``set_defaults`` on one
    does not leak into the next."""
    path = Path(path)
    name = f'_timm_script_{path.stem}_{uuid.uuid4().hex[:8]}'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- timm's model test-suite, from its PyPI sdist ----------------------------------------------------------------

def cache_dir(version: Optional[str] = None) -> Path:
    root = os.environ.get('TIMM_BINARYVIT_CACHE') or os.path.join(
        os.path.expanduser('~'), '.cache', 'timm-binaryvit')
    return Path(root) / f'timm-src-{version or timm_version()}'


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise fetching between processes (e.g. pytest-xdist workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'a+') as f:
        try:
            import fcntl
        except ImportError:  # Windows: no lock, the atomic renames below still keep the cache consistent
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wanted(rel: str) -> bool:
    """Which archive members to keep, relative to the archive's top folder."""
    parts = rel.split('/')
    if not rel or parts[0] in ('timm', '..') or rel.startswith('/'):
        return False
    if len(parts) == 1:
        return rel.endswith('.py') or rel in ('pyproject.toml', 'LICENSE', 'PKG-INFO')
    return parts[0] == 'tests'


def _extract_members(members, dest: Path) -> List[str]:
    """Write the wanted ones of an archive's regular files, given as ``(name, open function)`` with every
    name under one top folder, into ``dest``; the names written, relative to that folder."""
    names = []
    for name, open_member in members:
        rel = name.split('/', 1)[1] if '/' in name else ''
        if not _wanted(rel):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_member() as src, open(target, 'wb') as out:
            shutil.copyfileobj(src, out)
        names.append(rel)
    return names


def _extract_tar(data: bytes, dest: Path) -> List[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode='r:gz') as tf:
        return _extract_members(
            ((m.name, functools.partial(tf.extractfile, m)) for m in tf.getmembers() if m.isfile()), dest)


def _extract_zip(data: bytes, dest: Path) -> List[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return _extract_members(
            ((i.filename, functools.partial(zf.open, i)) for i in zf.infolist() if not i.is_dir()), dest)


def _pip_download_sdist(version: str, dest: Path) -> None:
    """Download timm's sdist from the package index with pip and extract it into ``dest``."""
    with tempfile.TemporaryDirectory(prefix='timm-sdist-') as tmp:
        cmd = [
            sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
            '--disable-pip-version-check', f'timm=={version}', '-d', tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TimmSourceUnavailable(f'`pip download timm=={version}` did not run: {e!r}') from e
        if proc.returncode != 0:
            tail = '\n'.join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise TimmSourceUnavailable(f'`{" ".join(cmd[2:])}` failed (exit {proc.returncode}):\n{tail}')
        archives = [p for p in Path(tmp).iterdir() if p.name.lower().startswith('timm')]
        if not archives:
            raise TimmSourceUnavailable(f'pip download left no timm archive in {tmp}')
        data = archives[0].read_bytes()
        (_extract_zip if archives[0].name.endswith('.zip') else _extract_tar)(data, dest)


def _source_dir_version(src: Path) -> Optional[str]:
    vf = src / 'timm' / 'version.py'
    if not vf.is_file():
        return None
    for node in ast.parse(vf.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', '') == '__version__' for t in node.targets):
            if isinstance(node.value, ast.Constant):
                return str(node.value.value)
    return None


def _copy_from_source_dir(relpaths: Iterable[str], dest: Path) -> None:
    src = os.environ.get('TIMM_SOURCE_DIR')
    if not src:
        return
    src = Path(src).expanduser()
    found_version = _source_dir_version(src)
    if found_version is not None and found_version != timm_version():
        raise TimmSourceUnavailable(
            f'TIMM_SOURCE_DIR={src} is timm {found_version}, the installed timm is {timm_version()}')
    for rel in relpaths:
        if (src / rel).is_file():  # the checkout wins over what the cache holds
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)


def get_files(relpaths: Iterable[str], version: Optional[str] = None) -> Dict[str, Path]:
    """Return ``{relpath: path}`` for files of timm's source distribution (``'tests/test_models.py'``), fetching
    them if needed. Raises ``TimmSourceUnavailable``."""
    version = version or timm_version()
    relpaths = list(relpaths)
    dest = cache_dir(version)
    with _locked(dest.parent / f'.timm-src-{version}.lock'):
        dest.mkdir(parents=True, exist_ok=True)
        _copy_from_source_dir(relpaths, dest)
        missing = [r for r in relpaths if not (dest / r).is_file()]
        if missing and not (dest / _COMPLETE).exists():
            try:
                _pip_download_sdist(version, dest)
            except TimmSourceUnavailable as e:
                raise TimmSourceUnavailable(
                    f'could not fetch the source of timm {version} from the package index: {e}') from e
            (dest / _COMPLETE).write_text(f'timm {version} sdist extracted\n')
        missing = [r for r in relpaths if not (dest / r).is_file()]
        if missing:
            raise TimmSourceUnavailable(
                f"timm {version}: {', '.join(missing)} not in its source distribution (extracted into {dest}); set "
                f"TIMM_SOURCE_DIR to a checkout of huggingface/pytorch-image-models at tag v{version}")
    return {r: dest / r for r in relpaths}


def require(relpaths: Iterable[str], version: Optional[str] = None) -> Dict[str, Path]:
    """``get_files`` inside a test: a failure under ``CI=true``, a skip with the reason otherwise."""
    try:
        return get_files(relpaths, version)
    except TimmSourceUnavailable as e:
        _fail_or_skip(str(e))


def require_test_models() -> Path:
    return require([TEST_MODELS])[TEST_MODELS]


# --- reading a script's argparse definitions without running it -------------------------------------------------

def _const(node):
    try:
        return ast.literal_eval(node)
    except Exception:
        return None


def script_arguments(path) -> Dict[str, dict]:
    """The ``add_argument`` calls of a script, by destination name (``--kd-model-name`` -> ``kd_model_name``).

    Read from the source with ``ast``, so the script is never imported (``onnx_validate.py`` imports onnxruntime at
    module level). Each value holds ``options`` (the option strings), ``type`` (the name of the ``type=`` callable, if
    any), ``action``, ``nargs``, ``choices`` and ``default`` (literal values only, else ``None``)."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    found = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == 'add_argument'):
            continue
        options = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if not options:
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if 'dest' in kw and isinstance(kw['dest'], ast.Constant):
            dest = kw['dest'].value
        else:
            longs = [o for o in options if o.startswith('--')]
            first = longs[0] if longs else options[0]
            dest = first.lstrip('-').replace('-', '_')
        type_node = kw.get('type')
        if isinstance(type_node, ast.Name):
            type_name = type_node.id
        elif isinstance(type_node, ast.Attribute):
            type_name = type_node.attr
        else:
            type_name = None
        action = kw.get('action')
        if isinstance(action, ast.Constant):
            action = action.value
        elif isinstance(action, ast.Attribute):
            action = action.attr
        elif isinstance(action, ast.Name):
            action = action.id
        found[dest] = dict(
            options=options,
            type=type_name,
            action=action,
            nargs=_const(kw['nargs']) if 'nargs' in kw else None,
            choices=_const(kw['choices']) if 'choices' in kw else None,
            default=_const(kw['default']) if 'default' in kw else None,
        )
    return found
