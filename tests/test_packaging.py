"""Installing preserve-onnx like any Python tool gives a working runtime, with no `make`.

Each test copies the project's files (what git tracks or would track) out of the clone, builds or
installs from that copy into a fresh venv, deletes the copy, and runs `preserve-onnx run SAMPLE
--against SAMPLE` from another folder with a PATH that holds nothing but the venv: no compiler and no
clone at that point. The venvs see this environment's dependencies (onnxruntime, numpy, setuptools,
...) through a .pth file of links, and pip runs with --no-deps --no-index --no-build-isolation, so the
tests download nothing; the package build itself compiles the custom-op library (headers from
ORT_INCLUDE_DIR, or the ones `make setup` fetched into build/, else fetched by the build).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLES

pytestmark = pytest.mark.slow

PASSED = "PASSED: 10 outputs on 2 rank(s) bit-identical to tp2 after 1 step(s) (max abs diff 0)"
_FETCHED_HEADERS = ROOT / "build" / "ort-headers" / "usr" / "include" / "onnxruntime"


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("ORT_INCLUDE_DIR") and (_FETCHED_HEADERS / "onnxruntime_c_api.h").is_file():
        env["ORT_INCLUDE_DIR"] = str(_FETCHED_HEADERS)
    return env


def _check(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def copy_tree(dest: Path) -> Path:
    """The project's files as a fresh clone has them (plus files not yet committed), nothing built."""
    listing = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listing):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def deps(tmp_path_factory) -> Path:
    """Links to this environment's installed distributions, without preserve-onnx itself."""
    links = tmp_path_factory.mktemp("deps")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("preserve_onnx", "__editable__", "__pycache__")):
            (links / entry.name).symlink_to(entry)
    return links


def fresh_venv(path: Path, deps: Path) -> Path:
    """A new venv (no pip of its own) that sees ``deps``; returns its bin folder."""
    _check([sys.executable, "-m", "venv", "--without-pip", path])
    purelib = _check(
        [path / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    )
    Path(purelib.stdout.strip(), "_deps.pth").write_text(f"{deps}\n")
    return path / "bin"


def pip_install(bin_dir: Path, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return _check(
        [
            bin_dir / "python",
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            *args,
        ],
        cwd=cwd,
        env=_build_env(),
    )


def bare_env(bin_dir: Path, home: Path) -> dict[str, str]:
    """What an installed tool runs with: the venv's bin folder on the PATH and nothing else."""
    assert shutil.which("g++", path=str(bin_dir)) is None and shutil.which("c++", path=str(bin_dir)) is None
    return {"PATH": str(bin_dir), "HOME": str(home), "NO_COLOR": "1", "COLUMNS": "120", "LANG": "C.UTF-8"}


def run_installed(bin_dir: Path, work: Path) -> str:
    """`preserve-onnx run tp2 --against tp2` of the installed tool in ``work``, away from the clone."""
    work.mkdir(exist_ok=True)
    shutil.copytree(SAMPLES / "llama-gqa" / "tp2", work / "tp2")
    env = bare_env(bin_dir, work)
    where = _check(
        [
            bin_dir / "python",
            "-c",
            "import preserve_onnx, preserve_onnx.runtime as r; "
            "print(preserve_onnx.__file__); print(r.library_path())",
        ],
        cwd=work,
        env=env,
    ).stdout.split()
    venv = bin_dir.parent
    assert all(Path(p).is_relative_to(venv) for p in where), where
    r = _check([bin_dir / "preserve-onnx", "run", "tp2", "--against", "tp2"], cwd=work, env=env)
    assert r.stdout.splitlines()[-1] == PASSED
    return r.stdout


def test_wheel_built_from_a_copy_installs_into_a_fresh_venv_and_runs_without_the_tree(tmp_path, deps):
    src = copy_tree(tmp_path / "src")
    r = _check(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-w",
            tmp_path / "dist",
            src,
        ],
        env=_build_env(),
    )
    # A quiet build: none of setuptools' packaging warnings (the byte-compiling one follows
    # PYTHONDONTWRITEBYTECODE).
    warnings = [
        line.strip()
        for line in r.stdout.splitlines() + r.stderr.splitlines()
        if "warning" in line.lower() and "byte-compiling is disabled" not in line
    ]
    assert warnings == []
    wheels = list((tmp_path / "dist").iterdir())
    assert len(wheels) == 1
    assert re.fullmatch(r"preserve_onnx-[\w.]+-py3-none-linux_\w+\.whl", wheels[0].name), wheels[0].name
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "preserve_onnx/runtime/_lib/libpreserve_ops.so" in names
    assert "preserve_onnx/hardware.toml" in names
    assert not [n for n in names if "csrc" in n or n.endswith("NOT_BUILT")]
    shutil.rmtree(src)

    bin_dir = fresh_venv(tmp_path / "venv", deps)
    pip_install(bin_dir, wheels[0])
    run_installed(bin_dir, tmp_path / "work")


def test_sdist_installs_compiling_the_library_during_the_install(tmp_path, deps):
    src = copy_tree(tmp_path / "src")
    built = _check(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))",
            tmp_path / "dist",
        ],
        cwd=src,
    )
    sdist = tmp_path / "dist" / built.stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {
        "setup.py",
        "MANIFEST.in",
        "tools/build_runtime.py",
        "preserve_onnx/runtime/csrc/preserve_ops.cc",
        "passes/__init__.py",
        "preserve_onnx/hardware.toml",
    } <= names
    assert not [n for n in names if n.endswith(".so")]
    shutil.rmtree(src)

    bin_dir = fresh_venv(tmp_path / "venv", deps)
    pip_install(bin_dir, sdist)
    run_installed(bin_dir, tmp_path / "work")


def _readme_ci_steps() -> tuple[str, str]:
    """The CI recipe's install command and its "Optimize and diff" script, as written in docs/cli.md."""
    text = (ROOT / "docs" / "cli.md").read_text()
    recipe = re.search(r"```yaml\n# \.github/workflows/preserve-onnx\.yml\n(.*?)```", text, re.S).group(1)
    install = re.search(r"- run: (pip install \S+)", recipe).group(1)
    lines = recipe.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "run: |" and "Optimize" in lines[i - 2])
    indent = len(lines[start]) - len(lines[start].lstrip()) + 2
    script = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        script.append(line[indent:])
    return install, "\n".join(script) + "\n"


def test_readme_ci_recipe_install_from_a_path_optimize_and_diff(tmp_path, deps):
    install, script = _readme_ci_steps()
    assert install == "pip install ./tools/preserve-onnx"
    repo = tmp_path / "repo"  # the user's repository, with this project checked out under tools/
    copy_tree(repo / "tools" / "preserve-onnx")
    shutil.copytree(SAMPLES / "llama-gqa" / "tp2", repo / "models" / "tp8")
    bin_dir = fresh_venv(tmp_path / "venv", deps)
    # The recipe's command, with the flags that keep this test offline (see the module docstring).
    pip_install(bin_dir, *install.split()[2:], cwd=repo)
    shutil.rmtree(repo / "tools")
    env = {
        **bare_env(bin_dir, tmp_path),
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "GITHUB_OUTPUT": str(tmp_path / "github_output"),
    }
    _check(
        [bin_dir / "preserve-onnx", "optimize", "models/tp8", "models/tp8-optimized", "-q"], cwd=repo, env=env
    )

    def ci_step() -> str:
        (tmp_path / "github_output").write_text("")
        shutil.rmtree(repo / "build", ignore_errors=True)
        _check(["bash", "-e", "-c", script], cwd=repo, env=env)  # GitHub's `run:` shell is `bash -e`
        return (tmp_path / "github_output").read_text()

    assert ci_step() == "changed=0\n"
    assert (
        (repo / "build" / "diff.md")
        .read_text()
        .startswith("### preserve-onnx diff: `models/tp8-optimized` → `build/tp8`\n")
    )
    assert sorted(p.name for p in (repo / "build" / "tp8").iterdir()) == sorted(
        p.name for p in (repo / "models" / "tp8").iterdir()
    )
    # The committed model goes stale (planned for a smaller budget): the step reports it, exit 0.
    shutil.rmtree(repo / "models" / "tp8-optimized")
    _check(
        [
            bin_dir / "preserve-onnx",
            "optimize",
            "models/tp8",
            "models/tp8-optimized",
            "--budget",
            "1MiB",
            "-q",
        ],
        cwd=repo,
        env=env,
    )
    assert ci_step() == "changed=1\n"
    diff = (repo / "build" / "diff.md").read_text().splitlines()
    assert diff[:3] == [
        "### preserve-onnx diff: `models/tp8-optimized` → `build/tp8`",
        "",
        "**2 of 2 model(s) differ**",
    ]
    assert (repo / "build" / "report.json").is_file()


def test_without_a_compiler_the_install_succeeds_and_run_says_what_to_install(tmp_path, deps):
    src = copy_tree(tmp_path / "src")
    bin_dir = fresh_venv(tmp_path / "venv", deps)
    env = {**_build_env(), "CXX": "/nonexistent/c++"}
    _check(
        [bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", src],
        env=env,
    )
    shutil.rmtree(src)
    work = tmp_path / "work"
    shutil.copytree(SAMPLES / "llama-gqa" / "tp2", work / "tp2")
    env = bare_env(bin_dir, work)
    optimized = _check([bin_dir / "preserve-onnx", "optimize", "tp2", "out", "-q"], cwd=work, env=env)
    assert optimized.stdout.startswith("done: 2 model(s), 30 prefetches")
    r = subprocess.run(
        [bin_dir / "preserve-onnx", "run", "out"], cwd=work, env=env, capture_output=True, text=True
    )
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (
        "error: the runtime's custom-op library was not built when preserve-onnx was installed "
        "(CXX=/nonexistent/c++: no such compiler on the PATH): provide what it names (a C++ compiler such as "
        "g++; onnxruntime's C headers: ORT_INCLUDE_DIR=<the include folder of onnxruntime's release archive "
        "or of Debian's libonnxruntime-dev>) and reinstall: pip install --force-reinstall --no-deps "
        "<preserve-onnx's source folder or sdist>\n"
    )


def test_make_mpi_installs_mpi4py_as_the_mpi_extra_pins_it():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["mpi"]
    assert extra == ["mpi4py>=3.1"]
    assert f"pip install -q '{extra[0]}'" in (ROOT / "Makefile").read_text()
