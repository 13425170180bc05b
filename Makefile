# preserve-onnx: every target does its own set-up from nothing but Python, gcc and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/preserve-onnx
LIBDIR := preserve_onnx/runtime/_lib
LIB    := $(LIBDIR)/libpreserve_ops.so
# The runtime's library is built by tools/build_runtime.py, the same code the package build (setup.py)
# runs for pip: onnxruntime's C headers from ORT_INCLUDE_DIR=..., else from Debian's libonnxruntime-dev
# fetched from this machine's configured Debian mirror into build/ (private apt state, no system change).
export ORT_INCLUDE_DIR

.PHONY: setup demo test lint bench fuzz lib mpi clean exporter-samples

setup: $(VENV)/.installed $(LIB)

# The editable install builds the library too (setup.py). pip's own output goes to build/setup.log,
# shown when a step fails. An editable install byte-compiles nothing: compileall does it like a regular
# install (saves ~40 ms per CLI call; PYTHONDONTWRITEBYTECODE environments never cache it themselves).
$(VENV)/.installed: pyproject.toml setup.py
	@echo "set-up: $(VENV) with preserve-onnx and its test dependencies, the runtime library (log: build/setup.log)"
	@mkdir -p build
	@{ $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -e '.[test]' \
	   && $(PY) -m compileall -q preserve_onnx passes; } > build/setup.log 2>&1 || { tail -n 20 build/setup.log; exit 1; }
	@touch $@

lib: $(LIB)

$(LIB): preserve_onnx/runtime/csrc/preserve_ops.cc tools/build_runtime.py
	$(PYTHON) tools/build_runtime.py $@

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

# mpi4py as pyproject.toml's [mpi] extra pins it (installed alone: reinstalling the project would rebuild
# the runtime library for nothing).
$(VENV)/.mpi: $(VENV)/.installed
	@echo "set-up: Open MPI and mpi4py for the MPI backend (log: build/setup-mpi.log)"
	@{ { command -v mpirun >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(MPI_PACKAGES); }; } \
	  && $(PY) -m pip install -q 'mpi4py>=3.1'; } > build/setup-mpi.log 2>&1 || { tail -n 20 build/setup-mpi.log; exit 1; }
	@$(PY) -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"
	@touch $@

# Ruff with the rules pyproject.toml selects (the layering bans of passes/, no print in the library), the
# version the test extra pins; `make test` runs it before pytest.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup $(if $(NO_MPI),,mpi) lint
	$(if $(NO_MPI),,PRESERVE_REQUIRE_MPI=1) $(PY) -m pytest -q

# The property tests (tests/test_properties.py) with fresh seeds for FUZZ_MINUTES of wall clock;
# prints the examples tried and every failure with its reproduction. `make test` runs them bounded.
FUZZ_MINUTES ?= 10
fuzz: setup
	$(PY) -m tests.fuzz --minutes $(FUZZ_MINUTES)

bench: setup $(if $(NO_MPI),,mpi)
	$(PY) bench/run_bench.py

# Samples made by real exporters (sample_models/exporters/README.md), in their own pinned venv (torch CPU,
# transformers, onnxruntime-genai). Never part of `make test`, which only reads the committed files.
# Stage 1 exports into sample_models/exporters/<name>/full/; stage 2 runs `preserve-onnx shard` into <name>/tpN/.
EXPORTER_VENV := build/exporter-venv
exporter-samples: setup $(EXPORTER_VENV)/.installed
	$(EXPORTER_VENV)/bin/python sample_models/exporters/make_exporter_samples.py --shard $(CLI)

$(EXPORTER_VENV)/.installed: sample_models/exporters/requirements.txt
	$(PYTHON) -m venv $(EXPORTER_VENV)
	$(EXPORTER_VENV)/bin/python -m pip install -q -r $<
	touch $@

clean:
	rm -rf build $(LIBDIR) $(VENV)
