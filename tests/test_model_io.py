import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from preserve_onnx.errors import PreserveError
from preserve_onnx.model_io import (
    copy_file_atomic,
    find_rank_sets,
    load_model,
    save_model,
    sibling_rank_count,
)
from tests.builders import two_layer_mlp


def save_external(model, path):
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )


def set_location(model, location):
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location


def test_load_never_reads_external_data(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(two_layer_mlp(), path)
    (tmp_path / "m.onnx.data").unlink()  # loading must not need the data
    model = load_model(path)
    assert [t.data_location for t in model.graph.initializer] == [onnx.TensorProto.EXTERNAL] * 4
    assert [t.raw_data for t in model.graph.initializer] == [b""] * 4


@pytest.mark.parametrize(
    "location, message",
    [
        ("/etc/passwd", "is absolute"),
        ("../../etc/passwd", "escapes the model's folder"),
        ("sub/../../x.data", "escapes the model's folder"),
    ],
)
def test_external_locations_outside_the_folder_are_refused(tmp_path, location, message):
    m = two_layer_mlp()
    path = tmp_path / "m.onnx"
    save_external(m, path)
    model = load_model(path)
    set_location(model, location)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(PreserveError, match=message):
        load_model(path)


def test_symlinked_data_file_leaving_the_folder_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "m.onnx"
    save_external(two_layer_mlp(), path)
    os.replace(tmp_path / "in" / "m.onnx.data", tmp_path / "outside" / "m.onnx.data")
    os.symlink(tmp_path / "outside" / "m.onnx.data", tmp_path / "in" / "m.onnx.data")
    with pytest.raises(PreserveError, match="resolves outside the model's folder"):
        load_model(path)


def test_not_onnx_and_truncated_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello, I am not a model\n")
    with pytest.raises(PreserveError, match="not an ONNX model"):
        load_model(junk)
    good = two_layer_mlp().SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(PreserveError, match="not an ONNX model"):
        load_model(cut)
    with pytest.raises(PreserveError, match="no such file"):
        load_model(tmp_path / "missing.onnx")


def test_save_beside_source_references_the_data_file(tmp_path):
    path = tmp_path / "m.onnx"
    save_external(two_layer_mlp(), path)
    save_model(load_model(path), tmp_path / "out.onnx", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "out.onnx"]


def test_save_elsewhere_copies_data_without_hard_links(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_external(two_layer_mlp(), src / "m.onnx")
    dest = tmp_path / "dest"
    dest.mkdir()
    save_model(load_model(src / "m.onnx"), dest / "m.onnx", src)
    copied = dest / "m.onnx.data"
    assert copied.read_bytes() == (src / "m.onnx.data").read_bytes()
    assert copied.stat().st_nlink == 1 and (src / "m.onnx.data").stat().st_nlink == 1
    loaded = onnx.load(str(dest / "m.onnx"))  # onnx refuses hard-linked data files
    np.testing.assert_array_equal(
        numpy_helper.to_array(loaded.graph.initializer[0]),
        numpy_helper.to_array(two_layer_mlp().graph.initializer[0]),
    )
    assert sorted(p.name for p in dest.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temp files left


def test_missing_or_short_data_file_is_refused_when_copying(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_external(two_layer_mlp(), src / "m.onnx")
    model = load_model(src / "m.onnx")
    data = src / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(PreserveError, match="is short: 100 bytes"):
        save_model(model, tmp_path / "out.onnx", src)
    data.unlink()
    with pytest.raises(PreserveError, match="is missing"):
        save_model(model, tmp_path / "out.onnx", src)
    assert not (tmp_path / "out.onnx").exists()


def test_sparse_copy_keeps_holes_and_bytes(tmp_path):
    src = tmp_path / "sparse.data"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"payload")
    dest = tmp_path / "copy.data"
    seen = []
    copy_file_atomic(src, dest, lambda name, total: seen.append)
    assert dest.stat().st_size == 64 << 20
    assert sum(seen) == 64 << 20
    with open(dest, "rb") as f:
        f.seek(10 << 20)
        assert f.read(7) == b"payload"
    assert dest.stat().st_blocks * 512 < 8 << 20  # holes stayed holes


def test_rank_sets_olive_and_onnxruntime_naming(tmp_path):
    for name in (
        "model_00.onnx",
        "model_01.onnx",
        "rank_0_llama_decoder.onnx",
        "rank_1_llama_decoder.onnx",
        "config.json",
    ):
        (tmp_path / name).write_bytes(b"")
    sets = find_rank_sets(tmp_path)
    assert [(s.pattern, [f.name for f in s.files]) for s in sets] == [
        ("model_{rank}.onnx", ["model_00.onnx", "model_01.onnx"]),
        ("rank_{rank}_llama_decoder.onnx", ["rank_0_llama_decoder.onnx", "rank_1_llama_decoder.onnx"]),
    ]
    assert sibling_rank_count(tmp_path / "model_01.onnx") == 2
    assert sibling_rank_count(tmp_path / "config.json") == 1


def test_rank_gap_and_empty_directory_are_refused(tmp_path):
    with pytest.raises(PreserveError, match="no rank models"):
        find_rank_sets(tmp_path)
    for name in ("model_00.onnx", "model_02.onnx"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(PreserveError, match="rank 1 is missing from model_00.onnx, model_02.onnx"):
        find_rank_sets(tmp_path)


def test_writing_to_dev_null_keeps_the_device(tmp_path):
    import stat

    from preserve_onnx.model_io import write_bytes_atomic

    write_bytes_atomic("/dev/null", b"report")  # e.g. --report /dev/null
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    import threading

    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    write_bytes_atomic(fifo, b"through the pipe")
    reader.join(5)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
