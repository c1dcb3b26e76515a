"""Build hook only; all metadata lives in pyproject.toml.

Ships ``timm_binaryvit_autoload.pth`` at the root of the wheel, so that it
lands in site-packages, for both ``pip install .`` and the PEP 660 editable
install ``pip install -e .``.  The .pth line carries the source of
src/timm_binaryvit/_autoload.py (stdlib only) and calls its install(), which
registers our models once ``timm`` is imported, without importing anything
heavy at interpreter start.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "timm_binaryvit_autoload.pth"
HOOK_SOURCE = os.path.join("src", "timm_binaryvit", "_autoload.py")


def pth_line():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), HOOK_SOURCE), encoding="utf-8") as f:
        source = f.read()
    # site.py executes a .pth line that starts with "import".  ascii() keeps
    # it on one line and independent of the locale encoding used to read it.
    return (
        "import sys; ns = {'__name__': '_timm_binaryvit_autoload'}; "
        f"exec(compile({ascii(source)}, {ascii(HOOK_SOURCE)}, 'exec'), ns); ns['install']()\n"
    )


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            # PEP 660: setuptools' editable_wheel points install_lib at the
            # unpacked editable wheel (build_lib is not shipped in that mode).
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib  # becomes the (purelib) wheel root
        self.mkpath(target)
        with open(os.path.join(target, PTH_NAME), "w", encoding="ascii") as f:
            f.write(pth_line())


setup(cmdclass={"build_py": build_py_with_pth})
