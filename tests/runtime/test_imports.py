"""The runtime's modules form no import cycle: runner (thread backend and dispatch) and mpi (MPI
backend) both build on backend.py, mpi never imports runner, and runner loads mpi only when the mpi
backend is asked for (inside run_models)."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

RUNTIME = ROOT / "preserve_onnx" / "runtime"


def _executed(body: list[ast.stmt], top_level_only: bool):
    """The statements that run (``if TYPE_CHECKING:`` blocks never do), into functions unless
    top-level only."""
    for node in body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        if not top_level_only:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _executed(getattr(node, field, []), top_level_only)


def imported(module: str, *, top_level_only: bool = False) -> set[str]:
    """The preserve_onnx modules that ``preserve_onnx/runtime/<module>.py`` imports when it runs."""
    tree = ast.parse((RUNTIME / f"{module}.py").read_text())
    names = set()
    for node in _executed(tree.body, top_level_only):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("preserve_onnx"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("preserve_onnx"))
    return names


def test_mpi_and_runner_do_not_import_each_other_at_module_level():
    assert "preserve_onnx.runtime.runner" not in imported("mpi")
    assert "preserve_onnx.runtime.mpi" not in imported("runner", top_level_only=True)
    assert "preserve_onnx.runtime.backend" in imported("mpi", top_level_only=True)
    assert "preserve_onnx.runtime.backend" in imported("runner", top_level_only=True)


def test_backend_imports_neither_backend():
    assert not imported("backend") & {
        "preserve_onnx.runtime.runner",
        "preserve_onnx.runtime.mpi",
        "preserve_onnx.runtime.twin",
    }


def test_no_runtime_module_imports_one_that_imports_it_back():
    modules = [p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__"]
    graph = {
        m: {n.rsplit(".", 1)[1] for n in imported(m) if n.startswith("preserve_onnx.runtime.")}
        for m in modules
    }
    cycles = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, set()))
    assert cycles == []
