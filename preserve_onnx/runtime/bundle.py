"""`optimize --with-runtime`: the custom-op library and a one-file runner written beside the rank models,
so that someone without preserve-onnx (a colleague, a vendor team) can execute the optimized models and
check them against the originals with nothing but onnxruntime and numpy.

The runner is :mod:`preserve_onnx.runtime.standalone_runner`, copied as it is: a script that imports
neither preserve_onnx nor anything outside onnxruntime, numpy and the standard library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from preserve_onnx.config import PrefetchNaming
from preserve_onnx.errors import PreserveError
from preserve_onnx.graph.dims import DecodeLayout
from preserve_onnx.model_io import copy_file_atomic, write_bytes_atomic
from preserve_onnx.runtime.backend import prefetch_attr_names
from preserve_onnx.runtime.library import PREFETCH_KERNEL_ATTRS, library_path

RUNNER_NAME = "run_ranks.py"
_RUNNER_SOURCE = Path(__file__).resolve().parent / "standalone_runner.py"


def write_runtime(
    folder: Path,
    naming: PrefetchNaming = PrefetchNaming(),
    dims: Mapping[str, int] | None = None,
    layout: DecodeLayout | None = None,
) -> tuple[Path, Path]:
    """Writes ``libpreserve_ops.so`` and ``run_ranks.py`` into ``folder`` (each atomically); the runner
    knows ``naming``, the spelling of the Prefetch nodes it will meet, ``dims`` (``--dim``) and
    ``layout``, the models' decode layout (docs/design.md §2): the dims the graphs fix and the KV-cache
    roles its generated inputs need.

    Returns:
        The paths of the library and of the runner.

    Raises:
        PreserveError: The library is not built (see :func:`library_path`) or a file cannot be written.
    """
    folder = Path(folder)
    library = library_path()
    copy_file_atomic(library, folder / library.name)
    runner = folder / RUNNER_NAME
    spelled = {
        "domain": naming.domain,
        "op": naming.op_type,
        **dict(zip(PREFETCH_KERNEL_ATTRS, prefetch_attr_names(naming), strict=True)),
    }
    source = _RUNNER_SOURCE.read_text()
    layout = layout or DecodeLayout()
    roles = {
        "kv": sorted(layout.kv_axes),
        "batch": sorted(layout.batch),
        "past": sorted(layout.past),
        "total": sorted(layout.total),
    }
    fixed = {**layout.fixed, **(dims or {})}
    for name, value in (("NAMING", spelled), ("DIMS", dict(sorted(fixed.items()))), ("LAYOUT", roles)):
        source, count = re.subn(rf"^{name} = \{{.*\}}$", f"{name} = {json.dumps(value)}", source, flags=re.M)
        if count != 1:  # pragma: no cover - the runner's source and this writer change together
            raise PreserveError(f"internal: run_ranks.py has no {name} line")
    write_bytes_atomic(runner, source.encode())
    runner.chmod(runner.stat().st_mode | 0o111)  # `./run_ranks.py` works too (it has a #! line)
    return folder / library.name, runner
