"""The package build compiles the reference runtime's custom-op library (pyproject.toml holds the rest).

``pip install .``, ``pip install`` of the sdist, ``pip wheel .`` / ``python -m build`` and the editable
install of ``make setup`` all run :class:`BuildRuntime`, which calls the one build procedure in
``tools/build_runtime.py`` (``make lib`` calls it too). The library is not a Python extension module:
it lands as ``preserve_onnx/runtime/_lib/libpreserve_ops.so``, and the wheel is tagged for the platform
but for any Python 3 (``py3-none-<platform>``).

When it cannot be built (no compiler, no headers), the install still succeeds for the optimizer; the
reason goes to ``_lib/NOT_BUILT`` and ``preserve-onnx run`` repeats it in its one-line error.
"""

import importlib.util
import os
import pathlib
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent
LIBRARY = "preserve_onnx.runtime._lib.libpreserve_ops"
MARKER = "NOT_BUILT"

_spec = importlib.util.spec_from_file_location("build_runtime", ROOT / "tools" / "build_runtime.py")
build_runtime = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_runtime)


class BuildRuntime(build_ext):
    """Builds ``libpreserve_ops.so`` with tools/build_runtime.py instead of a Python extension."""

    def get_ext_filename(self, fullname):
        # Called with the dotted name and (from get_ext_fullpath) with its last part alone.
        if fullname in (LIBRARY, LIBRARY.rpartition(".")[2]):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name != LIBRARY:
            return super().build_extension(ext)
        out = pathlib.Path(self.get_ext_fullpath(ext.name))
        marker = out.with_name(MARKER)
        try:
            build_runtime.build(out, build_dir=ROOT / "build")
            marker.unlink(missing_ok=True)
        except build_runtime.BuildError as exc:
            out.unlink(missing_ok=True)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{exc}\n")
            print(
                f"warning: the runtime's custom-op library was not built ({exc}); the optimizer works, "
                f"`preserve-onnx run` does not",
                file=sys.stderr,
            )

    def copy_extensions_to_source(self):
        """Editable installs: the library (or the reason it is missing) goes next to the sources."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:  # _lib/ is not in the repository
            pathlib.Path(self._get_inplace_equivalent(build_py, ext)[0]).parent.mkdir(
                parents=True, exist_ok=True
            )
        super().copy_extensions_to_source()
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            built_marker = pathlib.Path(regular_file).with_name(MARKER)
            source_marker = pathlib.Path(inplace_file).with_name(MARKER)
            if built_marker.is_file():
                shutil.copyfile(built_marker, source_marker)
            else:
                source_marker.unlink(missing_ok=True)


class PlatformWheel(bdist_wheel):
    """The library depends on the platform and the onnxruntime C API, not on the Python version."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    # optional: a failed build leaves no library, and the copy into an editable tree skips it.
    ext_modules=[Extension(LIBRARY, sources=["preserve_onnx/runtime/csrc/preserve_ops.cc"], optional=True)],
    cmdclass={"build_ext": BuildRuntime, "bdist_wheel": PlatformWheel},
)
