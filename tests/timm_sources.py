"""Fetch timm's own source files (its stock scripts and its model test-suite) at test time.

Nothing from timm's repository is kept in this repository: the files are fetched for the *installed* timm version,
extracted into a cache directory and used from there.

Where the files come from, in order:

1. ``TIMM_SOURCE_DIR``: a checkout of huggingface/pytorch-image-models at the tag of the installed timm (its
   ``timm/version.py`` is checked). The files needed are copied into the cache, so that running a script from there
   never imports the checkout's ``timm`` package instead of the installed one.
2. The cache: ``$TIMM_BINARYVIT_CACHE/timm-src-<version>`` (default ``~/.cache/timm-binaryvit/timm-src-<version>``).
3. timm's source distribution on PyPI (``pip download --no-deps --no-binary :all: timm==<version>``). It holds
   ``tests/`` (and so ``tests/test_models.py``) but, as of timm 1.0.x, *not* the scripts (``train.py``,
   ``validate.py``, ``inference.py``, ``benchmark.py``), which exist only in the GitHub repository.
4. For the scripts only: the GitHub release archive of the matching tag, unless ``TIMM_BINARYVIT_NO_GITHUB=1``.

Only the repository root's ``*.py`` files, ``tests/`` and ``pyproject.toml`` are extracted; timm's own ``timm/``
package never is, so a script run from the cache imports the installed timm.

Failure policy (``require``): if the PyPI download itself fails, a test needing the files fails when ``CI`` is set
(``CI=true``) and is skipped otherwise. If the download works but no source provides the stock scripts (the normal
case where GitHub is out of reach), tests needing them are skipped with that reason, unless
``TIMM_BINARYVIT_REQUIRE_SCRIPTS=1``, which makes that a failure too.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import timm

__all__ = [
    'SCRIPTS', 'TEST_MODELS', 'TimmSourceUnavailable', 'cache_dir', 'get_files', 'require', 'require_scripts',
    'require_test_models', 'script_arguments', 'timm_version',
]

SCRIPTS = ('train.py', 'validate.py', 'inference.py', 'benchmark.py')
TEST_MODELS = 'tests/test_models.py'
GITHUB_ARCHIVE = 'https://codeload.github.com/huggingface/pytorch-image-models/tar.gz/refs/tags/v{version}'
_COMPLETE = '.complete'


class TimmSourceUnavailable(RuntimeError):
    """The files could not be obtained. ``download_failed`` tells a failed download (network, index) apart from
    files that the sources reached simply do not contain."""

    def __init__(self, message: str, download_failed: bool):
        super().__init__(message)
        self.download_failed = download_failed


def timm_version() -> str:
    return timm.__version__


def _truthy(name: str) -> bool:
    return os.environ.get(name, '').strip().lower() not in ('', '0', 'false', 'no', 'off')


def in_ci() -> bool:
    return _truthy('CI')


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
            raise TimmSourceUnavailable(f'`pip download timm=={version}` did not run: {e!r}', True) from e
        if proc.returncode != 0:
            tail = '\n'.join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise TimmSourceUnavailable(
                f'`{" ".join(cmd[2:])}` failed (exit {proc.returncode}):\n{tail}', True)
        archives = [p for p in Path(tmp).iterdir() if p.name.lower().startswith('timm')]
        if not archives:
            raise TimmSourceUnavailable(f'pip download left no timm archive in {tmp}', True)
        archive = archives[0]
        data = archive.read_bytes()
        if archive.name.endswith('.zip'):
            _extract_zip(data, dest)
        else:
            _extract_tar(data, dest)


def _github_download(version: str, dest: Path) -> None:
    url = GITHUB_ARCHIVE.format(version=version)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except Exception as e:  # no network, DNS failure, 404, ...
        raise TimmSourceUnavailable(f'could not download {url}: {e!r}', True) from e
    _extract_tar(data, dest)


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
            f'TIMM_SOURCE_DIR={src} is timm {found_version}, the installed timm is {timm_version()}', False)
    for rel in relpaths:
        if (src / rel).is_file():  # the checkout wins over what the cache holds
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)


def get_files(relpaths: Iterable[str], version: Optional[str] = None) -> Dict[str, Path]:
    """Return ``{relpath: path}`` for files of timm's source tree (``'train.py'``, ``'tests/test_models.py'``),
    fetching them if needed. Raises ``TimmSourceUnavailable``."""
    version = version or timm_version()
    relpaths = list(relpaths)
    dest = cache_dir(version)
    with _locked(dest.parent / f'.timm-src-{version}.lock'):
        dest.mkdir(parents=True, exist_ok=True)
        _copy_from_source_dir(relpaths, dest)

        def missing():
            return [r for r in relpaths if not (dest / r).is_file()]

        errors = []
        if missing() and not (dest / _COMPLETE).exists():
            try:
                _pip_download_sdist(version, dest)
            except TimmSourceUnavailable as e:
                raise TimmSourceUnavailable(
                    f'could not fetch the source of timm {version} from the package index: {e}', True) from e
            (dest / _COMPLETE).write_text(f'timm {version} sdist extracted\n')
        sdist_missing = missing()
        if sdist_missing and not _truthy('TIMM_BINARYVIT_NO_GITHUB'):
            try:
                _github_download(version, dest)
            except TimmSourceUnavailable as e:
                errors.append(str(e))
                # remember the failure for this process tree only: a later session may have network
                os.environ.setdefault('TIMM_BINARYVIT_NO_GITHUB', '1')
        still_missing = missing()
        if still_missing:
            msg = (
                f'timm {version}: {", ".join(still_missing)} not available. timm\'s source distribution on PyPI '
                f'does not ship them (the stock scripts live only in the GitHub repository). Set TIMM_SOURCE_DIR '
                f'to a checkout of huggingface/pytorch-image-models at tag v{version}, or put the files into '
                f'{dest}.'
            )
            if errors:
                msg += ' Tried: ' + '; '.join(errors)
            raise TimmSourceUnavailable(msg, False)
    return {r: dest / r for r in relpaths}


def require(relpaths: Iterable[str], version: Optional[str] = None) -> Dict[str, Path]:
    """``get_files`` for use inside a test: fails under CI when the download itself failed (or always, with
    ``TIMM_BINARYVIT_REQUIRE_SCRIPTS=1``), otherwise skips with the reason."""
    import pytest

    try:
        return get_files(relpaths, version)
    except TimmSourceUnavailable as e:
        if (e.download_failed and in_ci()) or _truthy('TIMM_BINARYVIT_REQUIRE_SCRIPTS'):
            pytest.fail(str(e), pytrace=False)
        pytest.skip(str(e))


def require_scripts(names: Iterable[str] = SCRIPTS) -> Dict[str, Path]:
    return require(names)


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

    Read from the source with ``ast``, so the script (which parses ``sys.argv`` and may touch devices at import) is
    never run. Each value holds ``options`` (the option strings), ``type`` (the name of the ``type=`` callable, if
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
