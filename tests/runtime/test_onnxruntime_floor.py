"""The onnxruntime floor: the library is built against one C API version (onnxruntime 1.N serves API N);
pyproject.toml requires that release, and `run` names what to upgrade when an older one is installed."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _rt_graphs import model, vi
from onnx import TensorProto
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.errors import PreserveError
from preserve_onnx.runtime import RankSession
from preserve_onnx.runtime import library as library_module
from tests.conftest import ROOT, SAMPLES

API = library_module.native_library().preserve_ort_api_version()
TOO_OLD = (
    f"onnxruntime 1.20.1 is older than the runtime's custom-op library needs (onnxruntime 1.{API}, C API "
    f"version {API}): upgrade it: pip install --upgrade 'onnxruntime>=1.{API}'"
)


def test_pyproject_requires_the_onnxruntime_the_library_is_built_for():
    floors = re.findall(r'"onnxruntime>=1\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert floors == [str(API)]


@pytest.mark.parametrize(
    "version, refused",
    [
        ("1.20.1", True),
        ("0.99.0", True),
        (f"1.{API - 1}.9", True),
        (f"1.{API}.0", False),
        (f"1.{API}.0.dev20250101", False),
        ("1.32.0", False),
        ("2.0.0", False),
    ],
)
def test_versions_older_than_the_library_are_refused(monkeypatch, version, refused):
    monkeypatch.setattr(library_module.ort, "__version__", version)
    m = model([], [vi("x", TensorProto.FLOAT, [1])], [vi("x", TensorProto.FLOAT, [1])])
    if refused:
        with pytest.raises(PreserveError, match=rf"^onnxruntime {re.escape(version)} is older than"):
            RankSession(m)
    else:
        np.testing.assert_array_equal(RankSession(m).run({"x": np.ones(1, np.float32)})[0]["x"], [1.0])


def test_run_says_in_one_line_what_to_upgrade(monkeypatch):
    monkeypatch.setattr(library_module.ort, "__version__", "1.20.1")
    r = CliRunner().invoke(app, ["run", str(SAMPLES / "llama-gqa" / "tp2")])
    assert r.exit_code == 1
    assert r.output == f"error: {TOO_OLD}\n"


def test_run_ranks_py_says_in_one_line_what_to_upgrade(tmp_path):
    """`optimize --with-runtime`'s runner, on an onnxruntime that reports an older version."""
    import subprocess
    import sys

    from preserve_onnx.runtime.bundle import write_runtime

    _, script = write_runtime(tmp_path)
    code = (
        "import sys, runpy, onnxruntime; onnxruntime.__version__ = '1.20.1'; "
        f"sys.argv = [{str(script)!r}, {str(SAMPLES / 'llama-gqa' / 'tp2')!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (
        f"error: onnxruntime 1.20.1 is older than libpreserve_ops.so needs (onnxruntime 1.{API}): "
        f"upgrade it: pip install --upgrade 'onnxruntime>=1.{API}'\n"
    )


def test_a_library_without_the_api_version_is_one_line():
    """A library built from an older source than the package (no preserve_ort_api_version)."""
    import ctypes
    import ctypes.util

    stale = ctypes.CDLL(ctypes.util.find_library("m"))
    with pytest.raises(PreserveError) as caught:
        library_module.check_onnxruntime(stale)
    assert str(caught.value) == (
        f"the runtime's custom-op library {stale._name} is older than this preserve-onnx: "
        f"rebuild it (`make lib` in a clone, or reinstall preserve-onnx)"
    )
