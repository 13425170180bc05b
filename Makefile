# preserve-onnx: every target does its own set-up from nothing but Python, gcc and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/preserve-onnx
LIBDIR := preserve_onnx/runtime/_lib
LIB    := $(LIBDIR)/libpreserve_ops.so
HDRDIR := build/ort-headers
# Debian's libonnxruntime-dev carries the C API headers that the PyPI wheel lacks. It is fetched into
# build/ with a private apt state (no change to the system); ORT_INCLUDE_DIR=... skips the fetch.
ORT_INCLUDE_DIR ?= $(HDRDIR)/usr/include/onnxruntime
APT_OPTS := -o Dir::Etc::SourceList=$(CURDIR)/build/apt/sources.list -o Dir::Etc::SourceParts=/dev/null \
            -o Dir::State::Lists=$(CURDIR)/build/apt/lists -o Dir::Cache=$(CURDIR)/build/apt/cache \
            -o Debug::NoLocking=1

.PHONY: setup demo test bench fuzz lib mpi clean

setup: $(VENV)/.installed $(LIB)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# An editable install compiles nothing; byte-compile like a regular install does (saves ~40 ms per
	# CLI call, and PYTHONDONTWRITEBYTECODE environments never cache it themselves).
	$(PY) -m compileall -q preserve_onnx passes >/dev/null
	touch $@

$(HDRDIR)/usr/include/onnxruntime/onnxruntime_c_api.h:
	mkdir -p build/apt/lists/partial build/apt/cache/archives/partial $(HDRDIR)
	echo "deb http://deb.debian.org/debian trixie main" > build/apt/sources.list
	apt-get $(APT_OPTS) update -qq
	cd build/apt && apt-get $(APT_OPTS) download libonnxruntime-dev
	dpkg -x build/apt/libonnxruntime-dev_*.deb $(HDRDIR)

lib: $(LIB)

$(LIB): preserve_onnx/runtime/csrc/preserve_ops.cc $(if $(filter $(HDRDIR)/%,$(ORT_INCLUDE_DIR)),$(HDRDIR)/usr/include/onnxruntime/onnxruntime_c_api.h)
	mkdir -p $(LIBDIR)
	g++ -O2 -std=c++17 -fPIC -shared -pthread -I$(ORT_INCLUDE_DIR) -o $@.tmp $< -ldl && mv $@.tmp $@

demo: setup
	mkdir -p build/demo
	$(CLI) optimize sample_models/llama-gqa/tp2 build/demo/llama-gqa-tp2 --report build/demo/report.json
	$(CLI) run build/demo/llama-gqa-tp2 --against sample_models/llama-gqa/tp2 --steps 3

# The MPI backend (`run --backend mpi`): Open MPI from the distribution's packages (only when no mpirun is
# on PATH; needs root or sudo) and mpi4py into the venv. `make test` runs the 2-process tests with it;
# NO_MPI=1 skips the install (those tests then skip, the thread backend needs none of it).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
MPI_PACKAGES := openmpi-bin libopenmpi-dev

mpi: $(VENV)/.mpi

$(VENV)/.mpi: $(VENV)/.installed
	command -v mpirun >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(MPI_PACKAGES); }
	$(PY) -m pip install -q -e '.[test,mpi]'
	$(PY) -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"
	touch $@

test: setup $(if $(NO_MPI),,mpi)
	$(if $(NO_MPI),,PRESERVE_REQUIRE_MPI=1) $(PY) -m pytest -q

# The property tests (tests/test_properties.py) with fresh seeds for FUZZ_MINUTES of wall clock;
# prints the examples tried and every failure with its reproduction. `make test` runs them bounded.
FUZZ_MINUTES ?= 10
fuzz: setup
	$(PY) -m tests.fuzz --minutes $(FUZZ_MINUTES)

bench: setup $(if $(NO_MPI),,mpi)
	$(PY) bench/run_bench.py

clean:
	rm -rf build $(LIBDIR) $(VENV)
