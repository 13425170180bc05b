"""tools/build_runtime.py, the one build procedure of the runtime's library (setup.py and `make lib`):
which Debian mirror it fetches the onnxruntime headers from, how it calls apt, and its one-line errors.
apt-get and dpkg are stand-ins here that record their arguments; the real fetch runs in `make setup`."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("build_runtime", ROOT / "tools" / "build_runtime.py")
build_runtime = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_runtime)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_mirror_from_a_one_line_sources_list_skips_security_source_and_comment_lines(tmp_path):
    sources = _write(
        tmp_path / "sources.list",
        "\n".join(
            [
                "# deb http://commented.example/debian bookworm main",
                "deb-src http://src.example/debian bookworm main",
                "deb http://mirror.example/debian-security bookworm-security main",
                "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                "http://mirror.example/debian/ bookworm main contrib",
            ]
        ),
    )
    assert build_runtime.debian_mirror((sources,)) == "http://mirror.example/debian"


def test_mirror_from_deb822_sources_in_file_name_order_skips_disabled_stanzas(tmp_path):
    parts = tmp_path / "sources.list.d"
    _write(
        parts / "a-nodesource.sources",
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n",
    )
    _write(
        parts / "b-old.sources",
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nEnabled: no\n",
    )
    _write(
        parts / "c-debian.sources",
        "Types: deb\n# a comment\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\n\n"
        "Types: deb-src deb\nURIs: http://one.example/debian http://two.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n",
    )
    _write(parts / "d.list.disabled-by-someone", "deb http://not-read.example/debian bookworm main\n")
    missing = tmp_path / "sources.list"
    assert build_runtime.debian_mirror((missing, parts)) == "http://one.example/debian"


def test_mirror_defaults_to_the_official_redirector_without_a_debian_archive(tmp_path):
    sources = _write(tmp_path / "sources.list", "deb http://archive.ubuntu.com/ubuntu jammy main\n")
    assert build_runtime.debian_mirror((sources,)) == "http://deb.debian.org/debian"
    assert build_runtime.debian_mirror(()) == "http://deb.debian.org/debian"


def _fake_tools(tmp_path, *, update_fails=False):
    """apt-get and dpkg stand-ins on a PATH of their own; each call is appended to calls.log."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "calls.log"
    failed = "echo 'E: Failed to fetch http://mirror.example/debian/dists/trixie/InRelease'; exit 100"
    apt = f"""#!/bin/sh
echo "apt-get $*" >> {log}
case " $* " in
  *" update "*) {failed if update_fails else "exit 0"} ;;
  *" download "*) touch libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb ;;
esac
"""
    dpkg = f"""#!/bin/sh
echo "dpkg $*" >> {log}
mkdir -p "$3/usr/include/onnxruntime" && echo '// header' > "$3/usr/include/onnxruntime/onnxruntime_c_api.h"
"""
    for name, text in (("apt-get", apt), ("dpkg", dpkg)):
        path = _write(bin_dir / name, text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def test_headers_fetched_from_the_configured_mirror_with_a_private_apt_state_once(tmp_path, monkeypatch):
    bin_dir, log = _fake_tools(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sources = _write(tmp_path / "etc" / "sources.list", "deb http://mirror.example/debian bookworm main\n")
    monkeypatch.setattr(build_runtime, "APT_SOURCES", (sources,))
    build = tmp_path / "build"

    include = build_runtime.fetch_headers(build)

    assert include == build / "ort-headers" / "usr" / "include" / "onnxruntime"
    assert (include / "onnxruntime_c_api.h").read_text() == "// header\n"
    assert (build / "apt" / "sources.list").read_text() == "deb http://mirror.example/debian trixie main\n"
    private = (
        f"-o Dir::Etc::SourceList={build}/apt/sources.list -o Dir::Etc::SourceParts=/dev/null "
        f"-o Dir::State::Lists={build}/apt/lists -o Dir::Cache={build}/apt/cache -o Debug::NoLocking=1"
    )
    calls = log.read_text().splitlines()
    assert calls[:2] == [
        f"apt-get {private} update -qq",
        f"apt-get {private} download -qq libonnxruntime-dev",
    ]
    # unpacked into a temporary folder beside ort-headers, then renamed (a half-unpacked tree is never used)
    assert len(calls) == 3 and calls[2].startswith(
        f"dpkg -x {build}/apt/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb {build}/ort-headers."
    )
    assert sorted(p.name for p in build.iterdir()) == ["apt", "ort-headers", "ort-headers.lock"]

    assert build_runtime.fetch_headers(build) == include  # second call: nothing fetched
    assert len(log.read_text().splitlines()) == 3


def test_a_failed_apt_update_is_one_line_that_names_the_mirror(tmp_path, monkeypatch):
    bin_dir, _ = _fake_tools(tmp_path, update_fails=True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(build_runtime.BuildError) as caught:
        build_runtime.fetch_headers(tmp_path / "build", mirror="http://mirror.example/debian")
    assert str(caught.value) == (
        "apt-get update from http://mirror.example/debian (trixie) failed: "
        "E: Failed to fetch http://mirror.example/debian/dists/trixie/InRelease"
    )
    assert not (tmp_path / "build" / "ort-headers").exists()


def test_without_apt_the_error_says_to_set_ort_include_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(build_runtime.BuildError) as caught:
        build_runtime.fetch_headers(tmp_path / "build")
    assert str(caught.value) == (
        "no onnxruntime C headers: set ORT_INCLUDE_DIR to a folder with onnxruntime_c_api.h "
        "(fetching Debian's libonnxruntime-dev needs apt-get and dpkg)"
    )


def test_ort_include_dir_without_the_header_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    with pytest.raises(build_runtime.BuildError) as caught:
        build_runtime.include_dir(tmp_path / "build")
    assert str(caught.value) == f"ORT_INCLUDE_DIR={tmp_path} has no onnxruntime_c_api.h"


def test_a_cxx_that_does_not_exist_is_refused_not_replaced(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++ -Wall")
    with pytest.raises(build_runtime.BuildError) as caught:
        build_runtime.compiler()
    assert str(caught.value) == "CXX=/nonexistent/c++ -Wall: no such compiler on the PATH"


def test_the_command_line_prints_one_error_line_and_exits_1(tmp_path):
    env = {**os.environ, "CXX": "/nonexistent/c++"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_runtime.py"), str(tmp_path / "lib.so")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (r.returncode, r.stdout, r.stderr) == (
        1,
        "",
        "error: CXX=/nonexistent/c++: no such compiler on the PATH\n",
    )
    assert not (tmp_path / "lib.so").exists()
