"""Run under `mpirun -n N` by test_mpi.py: one process per rank, through the Python API.

python _mpi_worker.py kernels OUT.npz        AllReduce (4 dtypes) + AllGather (3 axes), every rank's outputs
python _mpi_worker.py mismatch               rank 1 feeds a different shape into the AllReduce
python _mpi_worker.py kill|sleep MODEL_DIR   rank 1 dies (SIGKILL) / hangs before the run; rank 0 runs
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # tests.builders, which _rt_graphs uses
from _rt_graphs import allreduce, model, vi  # noqa: E402

from preserve_onnx.errors import PreserveError  # noqa: E402
from preserve_onnx.runtime.feeds import generate_feeds, save_outputs  # noqa: E402
from preserve_onnx.runtime.mpi import MpiRankSession, get_context  # noqa: E402

ELEMS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def kernel_models(world: int):
    """One model per rank: AllReduce of x in 4 dtypes (variadic: two inputs at once), AllGather on 3 axes."""
    nodes, inputs, outputs = [], [], []
    for elem in ELEMS:
        name = TensorProto.DataType.Name(elem).lower()
        inputs += [vi(f"x_{name}", elem, [4, 5]), vi(f"z_{name}", elem, [3])]
        outputs += [vi(f"ar_{name}", elem, None), vi(f"az_{name}", elem, None)]
        nodes.append(
            helper.make_node(
                "AllReduce",
                [f"x_{name}", f"z_{name}"],
                [f"ar_{name}", f"az_{name}"],
                name=f"ar_{name}",
                domain="com.microsoft",
            )
        )
    for axis in (0, 1, -1):
        tag = str(axis).replace("-", "m")
        inputs.append(vi(f"g{tag}", TensorProto.FLOAT, [2, 3]))
        outputs.append(vi(f"ag{tag}", TensorProto.FLOAT, None))
        nodes.append(
            helper.make_node(
                "AllGather",
                [f"g{tag}"],
                [f"ag{tag}"],
                name=f"ag{tag}",
                domain="com.microsoft",
                group_size=world,
                axis=axis,
            )
        )
    m = model(nodes, inputs, outputs)
    return [m] * world


def kernel_feeds(world: int):
    """Per-rank feeds with magnitudes far apart, so that summation order shows in the bits."""
    import ml_dtypes

    dtypes = {
        TensorProto.FLOAT: np.float32,
        TensorProto.FLOAT16: np.float16,
        TensorProto.BFLOAT16: ml_dtypes.bfloat16,
        TensorProto.DOUBLE: np.float64,
    }
    per_rank = {}
    for r in range(world):
        rng = np.random.default_rng(100 + r)
        feeds = {}
        for elem in ELEMS:
            name = TensorProto.DataType.Name(elem).lower()
            scale = 10.0 ** (2 * r)
            feeds[f"x_{name}"] = (rng.standard_normal((4, 5)) * scale).astype(np.float32).astype(dtypes[elem])
            feeds[f"z_{name}"] = (rng.standard_normal(3) * scale).astype(np.float32).astype(dtypes[elem])
        for tag in ("0", "1", "m1"):
            feeds[f"g{tag}"] = np.arange(6, dtype=np.float32).reshape(2, 3) + 100 * r
        per_rank[r] = feeds
    return per_rank


def main() -> int:
    mode = sys.argv[1]
    ctx = get_context()
    if mode == "kernels":
        session = MpiRankSession(kernel_models(ctx.size))
        out = session.run({}, kernel_feeds(ctx.size))
        everyone = ctx.gather(out[ctx.rank], 0, "test gather")
        if ctx.rank == 0:
            save_outputs(sys.argv[2], everyone)
        return 0
    if mode == "mismatch":
        m0 = model(
            [allreduce("x", "y")], [vi("x", TensorProto.FLOAT, ["n", 5])], [vi("y", TensorProto.FLOAT, None)]
        )
        session = MpiRankSession([m0] * ctx.size)
        x = np.ones((2 if ctx.rank == 0 else 3, 5), np.float32)
        try:
            session.run({"x": x})
        except PreserveError as exc:
            sys.stderr.write(f"error: {exc}\n")  # one write: ranks share the terminal
            sys.stderr.flush()
            return 1
        return 0
    files = sorted(str(p) for p in Path(sys.argv[2]).glob("model_*.onnx"))
    session = MpiRankSession(files, timeout_s=float(os.environ.get("TIMEOUT_S", "60")))
    shared, per_rank = generate_feeds(session)
    if ctx.rank == 1:
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    try:
        session.run(shared, per_rank)
    except PreserveError as exc:
        sys.stderr.write(f"error: {exc}\n")  # one write: ranks share the terminal
        sys.stderr.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
