"""Register timm_binaryvit's models as soon as ``timm`` is imported.

timm has no plugin discovery, so timm's own scripts (validate.py,
inference.py, benchmark.py, ...) would not know the ``binaryvit`` models.
The installed ``timm_binaryvit_autoload.pth`` (written by setup.py for both
wheel and editable installs) runs :func:`install` at interpreter start.
That only puts a one-shot finder at the front of ``sys.meta_path``; nothing
heavy is imported.  When ``timm`` is first imported the finder lets the
normal import of timm run to the end and then imports ``timm_binaryvit``,
whose ``@register_model`` functions fill timm's registry.

Rules for this file, because setup.py embeds its source in the .pth file
and site.py executes it at every start of Python:

* standard library only, no relative imports, and nothing that imports
  torch or timm at module level;
* it must work both as ``timm_binaryvit._autoload`` and as a bare exec'd
  namespace.

Set ``TIMM_BINARYVIT_AUTOLOAD=0`` to switch the hook off.
"""
import importlib.abc
import os
import sys

TARGET = "timm"
PLUGIN = "timm_binaryvit"
ENV_SWITCH = "TIMM_BINARYVIT_AUTOLOAD"
# Attribute that marks our finder in sys.meta_path.  The .pth may be executed
# from more than one site directory (e.g. a venv with system site-packages),
# each time defining fresh classes, so duplicates are detected by attribute.
MARKER = "_timm_binaryvit_autoload"


def load_plugin():
    """Import the plugin; on failure warn and leave timm usable."""
    if PLUGIN in sys.modules:  # already imported, or being imported right now
        return
    try:
        __import__(PLUGIN)
    except Exception as exc:  # noqa: BLE001 - any failure must not break timm
        import warnings

        warnings.warn(
            f"{PLUGIN} could not be imported after timm, so its models are not "
            f"registered with timm ({type(exc).__name__}: {exc}). timm itself "
            f"works; set {ENV_SWITCH}=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,  # the line that imported timm (import machinery frames are skipped)
        )


class _Loader(importlib.abc.Loader):
    """Wraps timm's real loader: executes timm, then imports the plugin."""

    def __init__(self, loader, finder):
        self.loader = loader
        self.finder = finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # One-shot, and no recursion: the finder goes before timm's code runs.
        self.finder.remove()
        # Give timm its real loader back, too.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        load_plugin()

    def __getattr__(self, name):
        if name in ("loader", "finder"):  # not set yet (e.g. copy/pickle)
            raise AttributeError(name)
        return getattr(self.loader, name)


class AutoloadFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that fires once, when ``timm`` is actually loaded.

    It only wraps the loader of timm's spec.  It removes itself when that
    loader runs, not in find_spec: ``importlib.util.find_spec("timm")``, as
    libraries do to probe for timm, must not use it up.
    """

    def __init__(self):
        setattr(self, MARKER, True)

    def remove(self):
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader, self)
            return spec
        return None


def install():
    """Arrange for the plugin to be imported right after ``timm``.

    Idempotent.  If timm is already imported, the plugin is imported now.
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if TARGET in sys.modules:
        load_plugin()
        return
    if any(getattr(f, MARKER, False) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, AutoloadFinder())
