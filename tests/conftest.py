"""Test setup: with no GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is decided here, at collection.

Markers (pyproject.toml) that decide where a test runs:
- ``gpu``: needs a CUDA device; skipped without one.
- ``interpreter``: runs the Triton kernels on CPU tensors, which only the interpreter can do; skipped where the
  kernels are compiled (a CUDA machine, where TRITON_INTERPRET stays unset).
- ``slow``: the slowest interpreter cases; they run in the full suite (CI), and ``-m "not slow"`` leaves them
  out of a quick run while developing.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The entry points (CLI, server, pipeline, Ray) default to compile="auto", which on a CPU compiles the tower with
# torch.compile on its first call: tens of seconds per model. The suite keeps them eager; test_compiled_cpu.py
# tests the compiled path with explicit options.
os.environ.setdefault("GLM4V_FAST_COMPILE", "off")

import pytest  # noqa: E402

from glm4v_fast.kernels import interpreter_enabled  # noqa: E402  (after TRITON_INTERPRET is decided)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    skip_interpreter = pytest.mark.skip(
        reason="runs the Triton kernels on CPU tensors: needs the interpreter (TRITON_INTERPRET=1 before triton "
               "is imported); the kernels are compiled here")
    cuda, interpreted = torch.cuda.is_available(), interpreter_enabled()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not interpreted:
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
