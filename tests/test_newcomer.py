"""The friction a newcomer met (issue 19's list), each fixed and held here: docs/cli.md, "Newcomer
defaults"."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from preserve_onnx.cli import app
from preserve_onnx.errors import UsageError
from preserve_onnx.graph.dims import check_dim_names, dim_names
from tests.conftest import SAMPLES

runner = CliRunner()
RANKS = SAMPLES / "llama-gqa" / "tp2"
SINGLE = SAMPLES / "exporters" / "genai-llama-fp32" / "full"
RANK_DIMS = "batch_size, past_sequence_length, sequence_length, total_sequence_length"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


# -- 2. --dim with a name no tensor has ---------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("optimize", RANKS, "OUT"),
        ("inspect", RANKS),
        ("estimate", RANKS),
        ("explore", RANKS),
        ("run", RANKS),
        ("inspect", RANKS / "model_01.onnx"),
    ],
)
def test_unknown_dim_name_is_one_usage_line_naming_it_and_the_models_dims(command, tmp_path):
    args = [tmp_path / "out" if a == "OUT" else a for a in command]
    r = cli(*args, "--dim", "batch_size=2", "--dim", "batchsize=2")
    name = "model_01.onnx" if str(command[-1]).endswith("model_01.onnx") else "model_00.onnx"
    assert (r.exit_code, r.output) == (
        2,
        (
            f"error: --dim 'batchsize': no tensor of {name} has a dim of that name "
            f"(its symbolic dims: {RANK_DIMS})\n"
        ),
    )
    assert not (tmp_path / "out").exists()


def test_unknown_dim_name_on_shard_lists_the_single_models_dims(tmp_path):
    r = cli("shard", SINGLE, tmp_path / "tp2", "--tp", "2", "--dim", "kv_dim=16", "--dim", "head=2")
    assert (r.exit_code, r.output) == (
        2,
        (
            "error: --dim 'kv_dim' or 'head': no tensor of model.onnx has a dim of "
            "that name (its symbolic dims: batch_size, kv_cache_dim, "
            "past_sequence_length, sequence_length, total_sequence_length)\n"
        ),
    )
    assert not (tmp_path / "tp2").exists()


def test_known_dim_names_pass_the_check(tmp_path):
    r = cli("shard", SINGLE, tmp_path / "tp2", "--tp", "2", "--dim", "kv_cache_dim=16")
    assert r.exit_code == 0, r.output
    r = cli("inspect", tmp_path / "tp2", "--dim", "kv_cache_dim=16", "--dim", "batch_size=2")
    assert r.exit_code == 0, r.output


def test_no_dim_option_parses_nothing_for_the_check(monkeypatch):
    from preserve_onnx.graph import dims

    def refuse(*_):
        raise AssertionError("the --dim check ran without --dim")

    monkeypatch.setattr(dims, "check_dim_names", refuse)
    monkeypatch.setattr(dims, "dim_names", refuse)
    assert cli("inspect", RANKS).exit_code == 0


def _dims_model():
    """Names on a graph input, a graph output, main value_info, and only in an If branch's value_info;
    an expression ``past + 1``."""
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "past + 1"])],
        value_info=[helper.make_tensor_value_info("z", TensorProto.FLOAT, ["inner"])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        "main",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "total"])],
        value_info=[helper.make_tensor_value_info("v", TensorProto.FLOAT, ["mid", None])],
    )
    return helper.make_model(graph)


def test_dim_names_reads_every_graphs_inputs_outputs_and_value_info():
    assert dim_names(_dims_model()) == {"b", "past + 1", "past", "total", "mid", "inner"}
    check_dim_names(_dims_model(), {"inner": 2, "past": 3, "mid": 1})
    check_dim_names(_dims_model(), ())  # nothing given: nothing to check
    with pytest.raises(UsageError) as info:
        check_dim_names([_dims_model()], (("outer", 2),), "m.onnx")
    assert str(info.value) == (
        "--dim 'outer': no tensor of m.onnx has a dim of that name (its symbolic dims: "
        "b, inner, mid, past, past + 1, total)"
    )
    bare = helper.make_model(helper.make_graph([], "g", [], []))
    with pytest.raises(
        UsageError, match=r"^--dim 'b': no tensor of the model .*\(it has no symbolic dims\)$"
    ):
        check_dim_names(bare, {"b": 1})


# -- 9. OUT == IN names the option, not the Python argument -------------------------------------------


@pytest.mark.parametrize("command", ["optimize", "strip"])
@pytest.mark.parametrize("what", ["file", "folder"])
def test_out_is_in_names_only_the_option(command, what, sample_copy):
    src = sample_copy()
    path = src / "model_00.onnx" if what == "file" else src
    r = cli(command, path, path)
    assert (r.exit_code, r.output) == (1, f"error: OUT is IN ({path}); pass --in-place to overwrite it\n")


# -- 3. --version; 7. usage errors are one line (the real entry point) ---------------------------------

COMMAND = Path(sys.executable).parent / "preserve-onnx"


def command(*args):
    return subprocess.run(
        [str(COMMAND), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def test_version_prints_the_package_version():
    from importlib.metadata import version

    r = command("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"preserve-onnx {version('preserve-onnx')}\n", "")
    assert cli("--version").output == f"preserve-onnx {version('preserve-onnx')}\n"


@pytest.mark.parametrize(
    "args, line",
    [
        (["optimize", "in"], "Missing argument 'OUT'. (see 'preserve-onnx optimize --help')"),
        (["shard", "a", "b"], "Missing option '--tp'. (see 'preserve-onnx shard --help')"),
        (
            ["optimize", "a", "b", "--budgt", "1"],
            "No such option: --budgt (Possible options: --budget) (see 'preserve-onnx optimize --help')",
        ),
        (
            ["inspect", "m", "--batch", "z"],
            "Invalid value for '--batch': 'z' is not a valid int. (see 'preserve-onnx inspect --help')",
        ),
        (["optimise"], "No such command 'optimise'. Did you mean 'optimize'? (see 'preserve-onnx --help')"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args, line):
    r = command(*args)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {line}\n")


def test_help_and_no_arguments_still_print_the_help():
    r = command()
    assert r.returncode == 2 and "Usage: preserve-onnx [OPTIONS] COMMAND" in r.stdout and r.stderr == ""
    assert "--version" in r.stdout and "optimize" in r.stdout
    r = command("optimize", "--help")
    assert r.returncode == 0 and "Usage: preserve-onnx optimize [OPTIONS]" in r.stdout and r.stderr == ""


def test_errors_of_a_command_keep_their_codes_through_the_entry_point(tmp_path):
    assert command("inspect", tmp_path / "nothing").returncode == 1  # a user-facing error
    r = command("inspect", RANKS, "--json", "--dim", "x=1")
    assert (r.returncode, r.stdout) == (2, "")  # a UsageError raised by the command
    r = command("diff", RANKS, RANKS)
    assert r.returncode == 0 and r.stdout.startswith("equal")


def test_typers_ctrl_c_code_without_standalone_mode_is_one_line(monkeypatch, capsys):
    from preserve_onnx import _entry
    from preserve_onnx import cli as cli_module

    monkeypatch.setattr(cli_module, "app", lambda **_: 130)  # what typer returns for a Ctrl-C while parsing
    with pytest.raises(SystemExit) as info:
        _entry.main()
    assert info.value.code == 1 and capsys.readouterr().err == "interrupted: nothing was written\n"


# -- 8. "1 rank", not "1 ranks" ---------------------------------------------------------------------


def test_counted_says_one_noun_and_several_nouns():
    from preserve_onnx.report import counted

    assert [counted(n, "rank") for n in (0, 1, 2)] == ["0 ranks", "1 rank", "2 ranks"]
    assert [counted(n, "prefetch", "prefetches") for n in (1, 3)] == ["1 prefetch", "3 prefetches"]


def test_one_rank_is_singular_in_estimate_tables_and_closing_lines():
    r = cli("estimate", SINGLE / "model.onnx")
    lines = r.output.splitlines()
    assert r.exit_code == 0 and lines[0] == (
        f"{SINGLE / 'model.onnx'}: ascend-910b, batch 8, context 16384, 1 rank"
    )
    assert lines[-1].startswith("done: 0 windows estimated in ")
    r = cli("estimate", RANKS, "--sweep", "ranks=1,2")
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if "batch" in line and "context" in line)
    assert [c.strip() for c in header.strip("┃").split("┃")] == [
        "batch",
        "context",
        "1 rank",
        "2 ranks",
        "KV read (1 rank)",
        "hinted",
    ]
    assert r.output.splitlines()[-1].startswith(
        "done: 2 points; best 1.101x at batch 8, context 16384, 1 rank in "
    )


def test_explore_title_says_one_rank(tmp_path):
    r = cli("explore", SINGLE / "model.onnx")
    assert (
        r.exit_code == 0
        and ", 1 rank (perf/cost relative to the baseline's best)" in r.output.splitlines()[0]
    )


# -- 5. ranks with the same plan: one table ----------------------------------------------------------


def _big(out, layers, ranks=4):
    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from make_big_model import make_big_model

    make_big_model(out, "llama3-70b", ranks=ranks, layers=layers)
    return out


TABLE_00 = [
    "model_00.onnx: 4 windows, 7 prefetches, 166.1 MiB",
    "┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━┳━━━━━━━━━━━━┓",  # noqa: E501 - a table row as rich draws it
    "┃ collective                              ┃ tensors ┃  weights ┃ KV-cache ┃   budget ┃ used ┃ max tokens ┃",  # noqa: E501 - a table row as rich draws it
    "┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━╇━━━━━━━━━━━━┩",  # noqa: E501 - a table row as rich draws it
    "│ /model/layers.0/attn/o_proj/AllReduce   │       1 │ 41.5 MiB │      0 B │ 41.5 MiB │ 100% │        235 │",  # noqa: E501 - a table row as rich draws it
    "│ /model/layers.0/mlp/down_proj/AllReduce │       4 │ 40.0 MiB │  1.5 MiB │ 41.5 MiB │ 100% │          - │",  # noqa: E501 - a table row as rich draws it
    "│ /model/layers.1/attn/o_proj/AllReduce   │       1 │ 41.5 MiB │      0 B │ 41.5 MiB │ 100% │        235 │",  # noqa: E501 - a table row as rich draws it
    "│ /model/layers.1/mlp/down_proj/AllReduce │       1 │ 41.5 MiB │      0 B │ 41.5 MiB │ 100% │        235 │",  # noqa: E501 - a table row as rich draws it
    "└─────────────────────────────────────────┴─────────┴──────────┴──────────┴──────────┴──────┴────────────┘",  # noqa: E501 - a table row as rich draws it
]


def test_ranks_with_the_same_plan_print_one_table_and_one_line(tmp_path):
    src = _big(tmp_path / "tp4", layers=2)
    r = cli("optimize", src, tmp_path / "out", "--dry-run")
    lines = r.output.splitlines()
    assert r.exit_code == 0, r.output
    assert lines[:-1] == [*TABLE_00, "model_01.onnx ... model_03.onnx: same plan as model_00.onnx"]
    assert lines[-1].startswith(
        "done: 4 model(s), 28 prefetches, 664.5 MiB planned; dry run, nothing written"
    )
    r = cli("optimize", src, tmp_path / "out", "--dry-run", "-v")  # -v: every rank's tables
    titles = [line for line in r.output.splitlines() if line.startswith("model_0")]
    assert titles == [f"model_0{k}.onnx: 4 windows, 7 prefetches, 166.1 MiB" for k in range(4)]
    assert "same plan" not in r.output


def test_a_rank_with_another_plan_gets_its_own_table(tmp_path):
    src = _big(tmp_path / "tp4", layers=2)
    other = _big(tmp_path / "deeper", layers=3)
    for name in ("model_02.onnx", "model_02.onnx.data"):
        (other / name).replace(src / name)  # a rename: the sparse data file is not copied
    r = cli("optimize", src, tmp_path / "out", "--dry-run")
    lines = r.output.splitlines()
    same = "model_01.onnx, model_03.onnx: same plan as model_00.onnx"
    assert lines[: len(TABLE_00) + 1] == [*TABLE_00, same]
    assert lines[len(TABLE_00) + 1] == "model_02.onnx: 6 windows, 12 prefetches, 249.2 MiB"
    assert not any("same plan as model_02" in line for line in lines)


def test_inspect_prints_ranks_with_the_same_inspection_once(tmp_path):
    src = _big(tmp_path / "tp4", layers=2)
    r = cli("inspect", src)
    assert r.exit_code == 0, r.output
    titles = [line for line in r.output.splitlines() if line.startswith("model_0")]
    assert titles == [
        "model_00.onnx: 4 collectives, 4 planned, 7 prefetches, 166.1 MiB (min(0.5 x usable L2, "
        "achieved HBM BW x t_collective) on ascend-910b, 4 rank(s))",
        "model_01.onnx ... model_03.onnx: same plan as model_00.onnx",
    ]
    r = cli("inspect", src, "-v")  # -v: every rank's tables
    assert [line[:14] for line in r.output.splitlines() if line.startswith("model_0")] == [
        f"model_0{k}.onnx:" for k in range(4)
    ]
    assert "same plan" not in r.output


def test_inspect_gives_a_rank_with_another_plan_its_own_tables(tmp_path):
    src = _big(tmp_path / "tp4", layers=2)
    other = _big(tmp_path / "deeper", layers=3)
    for name in ("model_02.onnx", "model_02.onnx.data"):
        (other / name).replace(src / name)
    lines = cli("inspect", src).output.splitlines()
    assert "model_01.onnx, model_03.onnx: same plan as model_00.onnx" in lines
    assert any(line.startswith("model_02.onnx: 6 collectives") for line in lines)


def test_same_plan_line_names_runs_by_their_ends():
    from types import SimpleNamespace

    from preserve_onnx.report import same_plan_line

    ranks = [SimpleNamespace(source=Path(f"model_0{k}.onnx")) for k in range(8)]
    assert (
        same_plan_line(ranks[0], ranks[1:], ranks)
        == "model_01.onnx ... model_07.onnx: same plan as model_00.onnx"
    )
    assert (
        same_plan_line(ranks[0], ranks[1:3], ranks)
        == "model_01.onnx, model_02.onnx: same plan as model_00.onnx"
    )
    assert (
        same_plan_line(ranks[0], [ranks[2], ranks[5], ranks[6]], ranks)
        == "model_02.onnx, model_05.onnx, model_06.onnx: same plan as model_00.onnx"
    )


# -- 6. inspect's collectives table at 80 columns -----------------------------------------------------

NAMES = [
    "/model/layers.0/attn/o_proj/AllReduce",
    "/model/layers.0/mlp/down_proj/AllReduce",
    "/model/layers.1/attn/o_proj/AllReduce",
    "/model/layers.1/mlp/down_proj/AllReduce",
]


def _collectives_table(width):
    return _collectives_table_of(RANKS / "model_00.onnx", width)


def _collectives_table_of(model, width):
    from rich.console import Console

    from preserve_onnx.config import OptimizeConfig
    from preserve_onnx.inspection import inspect_path
    from preserve_onnx.report_ci import render_inspections

    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    render_inspections(console, inspect_path(model, OptimizeConfig(budget=1 << 20), jobs=1), 0)
    lines = console.export_text().splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    bottom = next(i for i, line in enumerate(lines) if line.startswith("└"))
    return lines, lines[top + 1], lines[top + 3 : bottom], lines[bottom + 1]


def _cells(line):
    return [c.strip() for c in line.strip().strip("┃│").split("┃" if "┃" in line else "│")]


def test_inspect_at_80_columns_leaves_out_columns_and_shows_the_collective_names():
    lines, header, rows, caption = _collectives_table(80)
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert _cells(header) == ["collective", "bytes", "budget", "planned", "max tokens"]
    assert "".join(_cells(row)[0] for row in rows) == "".join(NAMES)  # every name, folded but whole
    assert [_cells(row)[1:] for row in rows if _cells(row)[1]] == [
        ["36.0 KiB", "1.0 MiB", "36.0 KiB", "470"],
        ["16.0 MiB", "1.0 MiB", "1.0 MiB", "-"],
        ["36.0 KiB", "1.0 MiB", "36.0 KiB", "470"],
        ["40.0 KiB", "1.0 MiB", "40.0 KiB", "470"],
    ]
    assert caption.strip() == "(op, ops, used, tensors left out at 80 columns)"


def test_inspect_drops_only_what_the_width_needs():
    _, header, rows, caption = _collectives_table(100)
    assert _cells(header) == [
        "collective",
        "ops",
        "tensors",
        "bytes",
        "budget",
        "planned",
        "used",
        "max tokens",
    ]
    assert caption.strip() == "(op left out at 100 columns)"
    _, header, rows, caption = _collectives_table(160)
    assert _cells(header)[:3] == ["collective", "op", "ops"] and len(_cells(header)) == 9
    assert [_cells(row)[0] for row in rows] == NAMES and caption.startswith("candidates")  # no caption


# -- 4. -q on every command that prints more than one line --------------------------------------------


@pytest.mark.parametrize(
    "args, closing",
    [
        (
            ("inspect", RANKS),
            (
                "done: 2 model(s), 8 collectives, 30 prefetches, 32.3 MiB would be planned; "
                "nothing written in "
            ),
        ),
        (("estimate", RANKS), "done: 4 windows estimated in "),
        (
            ("estimate", RANKS, "--sweep", "ranks=2,4"),
            "done: 2 points; best 1.055x at batch 8, context 16384, 2 ranks in ",
        ),
        (("explore", RANKS), "done: 22 L2 sizes in "),
        (
            ("diff", RANKS, SAMPLES / "llama-gqa-fp16" / "tp2"),
            f"different: {RANKS} vs {SAMPLES / 'llama-gqa-fp16' / 'tp2'}: 2 of 2 model(s) differ",
        ),
        (("diff", RANKS, RANKS), f"equal: {RANKS} vs {RANKS}: no differences"),
    ],
)
def test_quiet_prints_only_the_closing_line(args, closing):
    loud, quiet = cli(*args), cli(*args, "-q")
    assert loud.exit_code == quiet.exit_code and loud.output.splitlines()[-1].startswith(closing)
    assert len(loud.output.splitlines()) > 1 or args[0] == "diff" and "equal" in closing
    assert len(quiet.output.splitlines()) == 1 and quiet.output.startswith(closing)


@pytest.mark.parametrize("command", ["strip", "shard"])
def test_quiet_is_accepted_where_the_closing_line_is_all_there_is(command, tmp_path):
    import re

    def run(out, *quiet):
        args = (SINGLE, out, "--tp", "2") if command == "shard" else (RANKS, out)
        r = cli(command, *args, *quiet)
        assert r.exit_code == 0, r.output
        return re.sub(r" in \d+\.\d+ s$", "", r.output.replace(str(out), "OUT").rstrip("\n"))

    loud, quiet = run(tmp_path / "a"), run(tmp_path / "b", "-q")
    assert quiet == loud and len(quiet.splitlines()) == 1 and quiet.startswith("done: ")


def test_quiet_still_prints_errors(tmp_path):
    r = cli("inspect", tmp_path / "none", "-q")
    assert (r.exit_code, r.output) == (1, f"error: {tmp_path / 'none'}: no such file or directory\n")


# -- 1. a single-device model: a note to shard it first ------------------------------------------------


def _note(model):
    return (
        f"note: {model} has no collectives: it looks like a single-device export; run "
        f"`preserve-onnx shard {model} OUT --tp N` first (docs/shard.md)"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("optimize", "MODEL", "OUT"),
        ("inspect", "MODEL"),
        ("estimate", "MODEL"),
        ("estimate", "MODEL", "--sweep", "ranks=1,2"),
        ("explore", "MODEL"),
    ],
)
def test_single_device_model_gets_one_note_to_shard_first(args, tmp_path):
    model = SINGLE / "model.onnx"
    argv = [model if a == "MODEL" else tmp_path / "out.onnx" if a == "OUT" else a for a in args]
    r = cli(*argv)
    assert r.exit_code == 0, r.output  # not an error: the model is valid, there is nothing to plan
    lines = r.output.splitlines()
    assert lines.count(_note(model)) == 1 and lines[-2] == _note(model) and lines[-1].startswith("done: ")
    assert "note:" not in cli(*argv, "-q").output  # -q: only the closing line


def test_a_model_without_collectives_at_80_columns_is_an_empty_table():
    _, header, rows, caption = _collectives_table_of(SINGLE / "model.onnx", 80)  # headers alone: the widths
    assert _cells(header) == ["collective", "tensors", "bytes", "budget", "planned", "max tokens"]
    assert rows == []
    assert caption.strip() == "(op, ops, used left out at 80 columns)"


@pytest.mark.parametrize(
    "args",
    [
        ("optimize", RANKS, "OUT", "--collectives", "AllGather"),
        ("inspect", RANKS, "--collectives", "AllGather"),
        ("estimate", RANKS, "--collectives", "AllGather"),
        ("explore", RANKS, "--collectives", "AllGather"),
        ("inspect", RANKS),
        ("estimate", RANKS),
    ],
)
def test_rank_models_get_no_note(args, tmp_path):
    r = cli(*[tmp_path / "out" if a == "OUT" else a for a in args])
    assert r.exit_code == 0 and "note:" not in r.output


def test_json_output_has_no_note():
    r = cli("inspect", SINGLE / "model.onnx", "--json")
    assert r.exit_code == 0 and r.output.startswith("{") and "note:" not in r.output
