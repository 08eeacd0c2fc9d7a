# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs torch first where it is missing (a CPU build by default; set TORCH_SPEC
# to pick another), then the package with the extras it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EXTRAS_TEST ?= test,video,serve,ray,plot
PYTEST_ARGS ?=

.PHONY: setup setup-test demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first: a bare `torch` requirement would otherwise pull the newest CUDA build.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	touch $@

# The demo installs the package as a user would: a normal (non-editable) install, which prints no setuptools
# notices, redone when a file of the package changes. A venv set up for the tests already has it, editable.
PACKAGE_FILES := $(shell find glm4v_fast -type f -not -path '*/__pycache__/*' 2>/dev/null)
$(VENV)/.installed: pyproject.toml $(PACKAGE_FILES) $(VENV)/.torch
	[ -f $(VENV)/.installed-test ] || $(BIN)/python -m pip install -q ".[video]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS_TEST)]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: setup
	$(BIN)/glm4v-fast demo

# Triton kernels run on CPU tensors through the interpreter when there is no GPU (tests/conftest.py).
test: setup-test
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

bench: setup-test
	$(BIN)/python -m pytest -q bench --benchmark-json=.benchmarks/latest.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
