# make test   set up .venv, build the extension, run the C++ tests (ctest) and pytest
# make bench  set up .venv, build the extension, run the benchmarks (then: python bench/report.py)
# make wheel  a wheel in dist/
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
CMAKE_BUILD := build/cmake
BENCH_ARGS ?=

.PHONY: all venv build ctest pytest test bench wheel clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall the pins whenever pyproject.toml changes them.
$(DEPS): pyproject.toml tools/pins.py | $(PY)
	$(PY) -m pip install $$($(PY) tools/pins.py build test bench)
	touch $@

venv: $(DEPS)

build: $(DEPS)
	$(PY) -m pip install --no-build-isolation -e .

# cmake and ctest come from the pinned PyPI package, so a machine needs no system cmake.
ctest: $(DEPS)
	$(VENV)/bin/cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release
	$(VENV)/bin/cmake --build $(CMAKE_BUILD) -j 2
	$(VENV)/bin/ctest --test-dir $(CMAKE_BUILD) --output-on-failure

pytest: build
	$(PY) -m pytest -q python_tests

test: build ctest pytest

bench: build
	$(PY) bench/run.py $(BENCH_ARGS)

wheel: $(DEPS)
	rm -rf dist
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info bk_kernels/_C*.so
