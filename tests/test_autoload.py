"""The .pth import hook: `import timm` alone registers our models.

Every check runs in a fresh interpreter (``sys.executable -c ...``) that
never imports timm_binaryvit itself, so what is seen is the work of the
installed ``timm_binaryvit_autoload.pth``.  The hook is installed by
``pip install -e .`` / ``pip install .`` (see setup.py); these tests fail
with a hint when the install predates it.

A check that imports timm starts a Python with torch (seconds on a 2-core CPU), so all but one
of those are ``slow``: the hook's file, a bare interpreter start (the hook installed once, nothing
heavy imported) and ``import timm`` importing the plugin stay in the quick selection.
"""
import importlib.metadata
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

PTH_NAME = "timm_binaryvit_autoload.pth"
MARKER = "_timm_binaryvit_autoload"  # attribute of the finder in sys.meta_path
REPO_ROOT = Path(__file__).resolve().parents[1]

# Prints the number of our finders on sys.meta_path, for the checks below.
COUNT_HOOKS = f"sum(bool(getattr(f, {MARKER!r}, False)) for f in sys.meta_path)"


def run_python(code, *flags, python=sys.executable, cwd=None, extra_env=None, timeout=300):
    env = dict(os.environ)
    env.pop("TIMM_BINARYVIT_AUTOLOAD", None)
    env.update(extra_env or {})
    proc = subprocess.run(
        [str(python), *flags, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed_pth():
    """The hook file of the installed distribution (editable or not)."""
    dist = importlib.metadata.distribution("timm-binaryvit")
    hooks = [f for f in dist.files or () if f.name == PTH_NAME]
    assert hooks, (
        f"the installed timm-binaryvit has no {PTH_NAME}; reinstall it: pip install -e '.[test]'"
    )
    path = Path(dist.locate_file(hooks[0]))
    assert path.is_file(), path
    return path


@pytest.fixture
def cwd(tmp_path):
    """Run subprocesses away from the checkout, so nothing is imported from it by accident."""
    return tmp_path


def test_pth_is_one_import_line(installed_pth):
    lines = [ln for ln in installed_pth.read_text(encoding="ascii").splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("import "), lines


def test_startup_imports_nothing_heavy(installed_pth, cwd):
    proc = run_python(f"""
        import sys
        print(sorted(m for m in ("torch", "timm", "timm_binaryvit") if m in sys.modules))
        print({COUNT_HOOKS})
    """, cwd=cwd)
    loaded, hooks = proc.stdout.split("\n")[:2]
    assert loaded == "[]"
    assert hooks == "1"  # installed, once, even if several site dirs carry the .pth


def test_import_timm_imports_plugin(installed_pth, cwd):
    proc = run_python(f"""
        import importlib.util, sys
        # probing for timm, as many libraries do, must not use the hook up
        assert importlib.util.find_spec("timm") is not None
        assert "timm" not in sys.modules and {COUNT_HOOKS} == 1
        import timm
        assert "timm_binaryvit" in sys.modules
        assert {COUNT_HOOKS} == 0, "one-shot: the finder must be gone"
        # timm keeps its own loader (the hook's wrapper is transient)
        assert "autoload" not in type(timm.__loader__).__module__, timm.__loader__
        assert timm.__spec__.loader is timm.__loader__
        print("ok")
    """, cwd=cwd)
    assert proc.stdout.strip() == "ok"
    assert "Warning" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_import_timm_registers_models(installed_pth, cwd):
    run_python("""
        import timm
        names = timm.list_models("binary*")
        assert names, "no binary* models registered"
        model = timm.create_model("binaryvit")
        assert sum(p.numel() for p in model.parameters()) > 0
    """, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("statement", ["from timm.models import create_model", "import timm.models"])
def test_submodule_imports(installed_pth, cwd, statement):
    run_python(f"""
        import sys
        {statement}
        assert "timm_binaryvit" in sys.modules
    """, cwd=cwd)


@pytest.mark.slow
def test_isolated_mode(installed_pth, cwd):
    # -I ignores PYTHON* variables and user site, but site-packages .pth files still run.
    run_python("""
        import sys
        assert sys.flags.isolated
        import timm
        assert "timm_binaryvit" in sys.modules
    """, "-I", cwd=cwd)


@pytest.mark.slow
def test_plugin_first_does_not_recurse(installed_pth, cwd):
    run_python(f"""
        import sys
        import timm_binaryvit, timm
        assert {COUNT_HOOKS} == 0
        assert sys.modules["timm_binaryvit"] is timm_binaryvit
    """, cwd=cwd)


@pytest.mark.slow
def test_timm_already_imported(installed_pth, cwd):
    # Drop the finder, import timm, then run the installed .pth line late.
    run_python(f"""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, {MARKER!r}, False)]
        import timm
        assert "timm_binaryvit" not in sys.modules
        exec(open({str(installed_pth)!r}, encoding="ascii").read())
        assert "timm_binaryvit" in sys.modules
        assert {COUNT_HOOKS} == 0
    """, cwd=cwd)


@pytest.mark.slow
def test_switch_off(installed_pth, cwd):
    proc = run_python(f"import sys; print({COUNT_HOOKS})", cwd=cwd,
                      extra_env={"TIMM_BINARYVIT_AUTOLOAD": "0"})
    assert proc.stdout.strip() == "0"


@pytest.mark.slow
def test_broken_plugin_warns_and_timm_works(installed_pth, tmp_path):
    # A broken timm_binaryvit ahead of the real one on sys.path.
    fake = tmp_path / "fake" / "timm_binaryvit"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated breakage')\n")
    proc = run_python("""
        import sys
        import timm
        assert "timm_binaryvit" not in sys.modules
        # timm is fully usable
        assert timm.list_models("resnet18") == ["resnet18"]
        from timm.models import create_model
        assert create_model("resnet18", num_classes=3).fc.out_features == 3
        print("ok")
    """, cwd=tmp_path, extra_env={"PYTHONPATH": str(tmp_path / "fake")})
    assert proc.stdout.strip() == "ok"
    # a warning that names the exception, not a traceback
    assert "RuntimeWarning" in proc.stderr, proc.stderr
    assert "ImportError: simulated breakage" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def _buildable_copy(dest):
    """What a wheel build reads; building a copy keeps build/ and *.egg-info out of the checkout."""
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (REPO_ROOT / name).is_file():
            shutil.copy2(REPO_ROOT / name, dest / name)
    for pattern in ("README*", "LICENSE*", "NOTICE*"):
        for path in REPO_ROOT.glob(pattern):
            if path.is_file():
                shutil.copy2(path, dest / path.name)
    shutil.copytree(REPO_ROOT / "src", dest / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return dest


def _can_build_offline():
    """setuptools >= 64 here, and a bdist_wheel: its own from 70.1 on, else the wheel package's."""
    try:
        version = tuple(int(v) for v in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1) or (version >= (64, 0) and importlib.util.find_spec("wheel") is not None)


def _site_dirs():
    """The site-packages folders of the interpreter running the tests, in its sys.path order."""
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    order = {os.path.realpath(p): i for i, p in enumerate(sys.path)}
    found = []
    for d in dirs:
        if os.path.isdir(d) and os.path.realpath(d) not in {os.path.realpath(f) for f in found}:
            found.append(d)
    return sorted(found, key=lambda d: order.get(os.path.realpath(d), len(order)))


@pytest.mark.slow
def test_wheel_install_ships_hook(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    _buildable_copy(project)
    wheels = tmp_path / "wheels"
    # Offline with the build backend at hand (the usual case); a fresh `python3 -m venv` of Python 3.12+ has no
    # setuptools, and then pip fetches the build requirements from the package index into an isolated build.
    offline = ["--no-build-isolation", "--no-index"] if _can_build_offline() else []
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", "-w", str(wheels), str(project)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, f"building the wheel failed:\n{build.stdout[-2000:]}\n{build.stderr[-3000:]}"
    (wheel,) = wheels.glob("timm_binaryvit-*.whl")

    # A venv of its own (no pip, no site-packages of any interpreter) that sees the packages of the interpreter
    # running these tests (torch, timm, pip) through a .pth file of plain paths. Plain path lines do not run
    # the .pth files inside those folders, so the editable install's hook and path are not seen: only the
    # wheel's. This works whether the tests run in the system interpreter or in a `python3 -m venv` environment
    # (whose packages `system_site_packages=True` would not show: that sees the base interpreter's).
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=False, with_pip=False, symlinks=os.name != "nt")
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    inner_purelib = Path(run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])",
                                    python=python, cwd=tmp_path).stdout.strip())
    inner_purelib.mkdir(parents=True, exist_ok=True)
    (inner_purelib / "outer_environment.pth").write_text("".join(f"{d}\n" for d in _site_dirs()), encoding="utf-8")
    # pip (the outer environment's, run by the venv's python) installs into the venv; --ignore-installed keeps
    # it from uninstalling the outer editable install it can see.
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    purelib = Path(run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])",
                              python=python, cwd=tmp_path).stdout.strip())
    assert (purelib / PTH_NAME).is_file(), sorted(p.name for p in purelib.iterdir())

    proc = run_python(f"""
        import sys
        assert "torch" not in sys.modules and "timm" not in sys.modules
        assert {COUNT_HOOKS} == 1
        import timm
        mod = sys.modules.get("timm_binaryvit")
        assert mod is not None, "import timm did not import timm_binaryvit"
        print(mod.__file__)
        assert timm.list_models("binary*"), "no binary* models registered"
    """, python=python, cwd=tmp_path)
    plugin_file = Path(proc.stdout.strip().splitlines()[0]).resolve()
    assert plugin_file.is_relative_to(purelib.resolve()), (plugin_file, purelib)
