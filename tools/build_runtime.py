"""Build the reference runtime's custom-op library (``libpreserve_ops.so``) from
``preserve_onnx/runtime/csrc/preserve_ops.cc``: the one build procedure that both the package build
(``setup.py``, for ``pip install``, wheels and sdists) and ``make lib`` use.

    python3 tools/build_runtime.py OUT.so [--build-dir build]

Needs only the standard library, a C++17 compiler (``$CXX``, else ``g++``, else ``c++``) and the
onnxruntime C API headers, which onnxruntime's PyPI wheel lacks. They are taken from
``$ORT_INCLUDE_DIR`` when set, else from Debian's ``libonnxruntime-dev`` package (suite trixie):
``apt-get download`` with a private apt state under BUILD_DIR/apt and ``dpkg -x`` into
BUILD_DIR/ort-headers, with no change to the system. The package comes from the Debian mirror this
machine's apt is configured with (/etc/apt/sources.list and sources.list.d), deb.debian.org only when
none is configured. The headers are fetched once per BUILD_DIR.

The library is not linked against onnxruntime (it receives the API through ``RegisterCustomOps``), so
it runs with any onnxruntime at least as new as the headers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "preserve_onnx" / "runtime" / "csrc" / "preserve_ops.cc"
HEADER = "onnxruntime_c_api.h"
DEB_PACKAGE = "libonnxruntime-dev"
DEB_SUITE = "trixie"  # the first Debian release with libonnxruntime-dev
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = (pathlib.Path("/etc/apt/sources.list"), pathlib.Path("/etc/apt/sources.list.d"))
CXXFLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-pthread")
# Suites of Debian's own archive (security updates live in another archive, without this package).
_DEBIAN_SUITES = {
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
    "sid",
    "experimental",
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
}


class BuildError(Exception):
    """The library cannot be built here; the message says what to install or set (one line)."""


def _is_debian_archive(uri: str, suites: list[str]) -> bool:
    return "security" not in uri and any(s.split("-")[0].split("/")[0] in _DEBIAN_SUITES for s in suites)


def _one_line_entries(text: str):
    """``(uri, suites)`` of the ``deb`` lines of a sources.list file."""
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], [words[2]]


def _deb822_entries(text: str):
    """``(uri, suites)`` of each enabled ``Types: deb`` stanza of a .sources file."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            yield uri, fields.get("suites", "").split()


def debian_mirror(sources: tuple[pathlib.Path, ...] | None = None) -> str:
    """The URI of the first Debian archive in apt's configuration (``deb`` lines of sources.list and
    ``*.list`` files, enabled ``Types: deb`` stanzas of ``*.sources`` files, in apt's order); the
    official redirector when there is none (a machine that is not Debian)."""
    files: list[pathlib.Path] = []
    for source in APT_SOURCES if sources is None else sources:
        if source.is_dir():
            files.extend(sorted(p for p in source.iterdir() if p.suffix in (".list", ".sources")))
        elif source.is_file():
            files.append(source)
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        entries = _deb822_entries(text) if path.suffix == ".sources" else _one_line_entries(text)
        for uri, suites in entries:
            if uri.startswith(("http://", "https://")) and _is_debian_archive(uri, suites):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """Holds an exclusive lock on ``path`` (two builds sharing a build folder fetch once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _run(command: list[str], what: str, cwd: pathlib.Path | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        raise BuildError(f"{what} failed: {lines[-1] if lines else f'exit status {result.returncode}'}")


def fetch_headers(build_dir: pathlib.Path, mirror: str | None = None) -> pathlib.Path:
    """The onnxruntime include folder unpacked from Debian's libonnxruntime-dev under ``build_dir``
    (fetched on first use)."""
    build_dir = pathlib.Path(build_dir).resolve()
    include = build_dir / "ort-headers" / "usr" / "include" / "onnxruntime"
    apt = build_dir / "apt"
    with _locked(build_dir / "ort-headers.lock"):
        if (include / HEADER).is_file():
            return include
        missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
        if missing:
            raise BuildError(
                f"no onnxruntime C headers: set ORT_INCLUDE_DIR to a folder with {HEADER} "
                f"(fetching Debian's {DEB_PACKAGE} needs {' and '.join(missing)})"
            )
        for folder in (apt / "lists" / "partial", apt / "cache" / "archives" / "partial"):
            folder.mkdir(parents=True, exist_ok=True)
        mirror = mirror or debian_mirror()
        (apt / "sources.list").write_text(f"deb {mirror} {DEB_SUITE} main\n")
        options = [
            "-o",
            f"Dir::Etc::SourceList={apt / 'sources.list'}",
            "-o",
            "Dir::Etc::SourceParts=/dev/null",
            "-o",
            f"Dir::State::Lists={apt / 'lists'}",
            "-o",
            f"Dir::Cache={apt / 'cache'}",
            "-o",
            "Debug::NoLocking=1",
        ]
        _run(["apt-get", *options, "update", "-qq"], f"apt-get update from {mirror} ({DEB_SUITE})")
        for old in apt.glob(f"{DEB_PACKAGE}_*.deb"):
            old.unlink()
        _run(
            ["apt-get", *options, "download", "-qq", DEB_PACKAGE], f"apt-get download {DEB_PACKAGE}", cwd=apt
        )
        debs = sorted(apt.glob(f"{DEB_PACKAGE}_*.deb"))
        if not debs:
            raise BuildError(f"apt-get download {DEB_PACKAGE} from {mirror} left no .deb file")
        unpacked = pathlib.Path(tempfile.mkdtemp(prefix="ort-headers.", dir=build_dir))
        try:
            _run(["dpkg", "-x", str(debs[-1]), str(unpacked)], f"dpkg -x {debs[-1].name}")
            if not (unpacked / "usr" / "include" / "onnxruntime" / HEADER).is_file():
                raise BuildError(f"{debs[-1].name} has no usr/include/onnxruntime/{HEADER}")
            shutil.rmtree(build_dir / "ort-headers", ignore_errors=True)
            unpacked.rename(build_dir / "ort-headers")
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
    return include


def include_dir(build_dir: pathlib.Path) -> pathlib.Path:
    """``$ORT_INCLUDE_DIR`` when set (checked), else the headers fetched into ``build_dir``."""
    given = os.environ.get("ORT_INCLUDE_DIR")
    if given:
        if not (pathlib.Path(given) / HEADER).is_file():
            raise BuildError(f"ORT_INCLUDE_DIR={given} has no {HEADER}")
        return pathlib.Path(given)
    return fetch_headers(build_dir)


def compiler() -> str:
    """The C++ compiler: ``$CXX`` when set, else g++, else c++."""
    given = os.environ.get("CXX", "").strip()
    if given:
        if shutil.which(given.split()[0]) is None:
            raise BuildError(f"CXX={given}: no such compiler on the PATH")
        return given
    for name in ("g++", "c++"):
        if shutil.which(name):
            return name
    raise BuildError("no C++ compiler: install g++ (Debian/Ubuntu: apt-get install g++), or set CXX")


def build(
    out: pathlib.Path, build_dir: pathlib.Path = ROOT / "build", source: pathlib.Path = SOURCE
) -> pathlib.Path:
    """Compiles ``source`` into the shared library ``out`` (written whole: temporary file, then rename).

    Raises:
        BuildError: No compiler, no headers, or the compiler failed; the message says which.
    """
    out = pathlib.Path(out)
    cxx = compiler()
    include = include_dir(pathlib.Path(build_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        _run(
            [*cxx.split(), *CXXFLAGS, f"-I{include}", "-o", str(tmp), str(source), "-ldl"],
            f"{cxx} {source.name}",
        )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path, help="the library to write (libpreserve_ops.so)")
    parser.add_argument(
        "--build-dir",
        type=pathlib.Path,
        default=ROOT / "build",
        help="where the fetched headers are kept (default: build/ in the project)",
    )
    args = parser.parse_args(argv)
    try:
        build(args.out, args.build_dir)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
