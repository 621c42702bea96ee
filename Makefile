# make test   set up .venv, build the extension, run the C++ tests (ctest) and pytest
# make bench  set up .venv, build the extension, run the benchmarks (then: python bench/report.py)
# make wheel  a wheel in dist/
# make gpu-check OUT=DIR  on a GPU machine (its own python3, no .venv, no network): build for
#             the local GPU, CUDA ctests, the GPU pytest cases, the GPU bench (tools/gpu_check.sh)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
CMAKE_BUILD := build/cmake
BENCH_ARGS ?=

.PHONY: all venv build ctest pytest triton-compat test bench wheel clean gpu-check

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall the pins whenever pyproject.toml changes them.
$(DEPS): pyproject.toml tools/pins.py | $(PY)
	$(PY) -m pip install $$($(PY) tools/pins.py build runtime test bench)
	touch $@

venv: $(DEPS)

# The extension is rebuilt only when a source, setup.py or the pins change (Python files are
# used in place by the editable install). setup.py compiles into build/ext with ninja, so a
# rebuild recompiles only the changed files.
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml bk_kernels/version.py
BUILT   := $(VENV)/.bk-built

$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

# cmake and ctest come from the pinned PyPI package, so a machine needs no system cmake.
ctest: $(DEPS)
	$(VENV)/bin/cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release
	$(VENV)/bin/cmake --build $(CMAKE_BUILD) -j 2
	$(VENV)/bin/ctest --test-dir $(CMAKE_BUILD) --output-on-failure

pytest: build
	$(PY) -m pytest -q python_tests

# The GPU check's machine has Triton 3.6, not our pin (3.8): every Triton kernel is compiled for
# sm_90 with 3.6 too, so what only that version refuses fails here, not on a lent GPU.
TRITON_COMPAT := build/triton-3.6
$(TRITON_COMPAT)/.installed: | $(PY)
	$(PY) -m pip install -q --no-deps --target $(TRITON_COMPAT) triton==3.6.0
	touch $@

triton-compat: build $(TRITON_COMPAT)/.installed
	PYTHONPATH=$(TRITON_COMPAT) $(PY) -m pytest -q -p no:cacheprovider python_tests/ops/test_triton_aot.py -k aot_compile

test: build ctest pytest triton-compat

bench: build
	$(PY) bench/run.py $(BENCH_ARGS)

wheel: $(DEPS)
	rm -rf dist
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info bk_kernels/_C*.so $(BUILT)

# Uses the machine's python3 (torch 2.11+ with CUDA, Triton 3.6+), not the pinned .venv.
OUT ?= gpu-check-results
gpu-check:
	bash tools/gpu_check.sh $(OUT)
