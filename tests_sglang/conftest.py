"""Shared set-up of the SGLang tests: the sgl_kernel stand-in, SGLang's CPU engine, tiny checkpoints, engines.

Run with `make test-sglang` (its own virtual environment, .venv-sglang). SGLang runs on the CPU here
(SGLANG_USE_CPU_ENGINE=1, device="cpu", attention_backend="torch_native") with the test-only `sgl_kernel`
stand-in (cpu_kernels/, on PYTHONPATH so that SGLang's spawned processes find it too; it says why it exists).
TORCHDYNAMO_DISABLE=1: SGLang compiles a few CPU ops with torch.compile at the first request (about half a minute
here); eager runs the same operations, and the tests compare towers and routes, not compiled code.
"""
from __future__ import annotations

import contextlib
import os
import sys

_KERNELS = os.path.join(os.path.dirname(__file__), "cpu_kernels")
if _KERNELS not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    sys.path.insert(0, _KERNELS)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_KERNELS, os.environ.get("PYTHONPATH")]))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests_shared"))   # _checkpoints
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("GLM4V_FAST_COMPILE", "off")   # eager towers: the compiled CPU path is tests/test_compiled_cpu.py's
os.environ.pop("GLM4V_FAST_SGLANG", None)        # each engine sets it

import pytest  # noqa: E402

from _checkpoints import write_checkpoint  # noqa: E402

KINDS = ("glm4v", "glm4v_moe")
ENGINE_ARGS = dict(device="cpu", attention_backend="torch_native", dtype="float32", max_total_tokens=2048,
                   context_length=1024, disable_cuda_graph=True, random_seed=0, skip_server_warmup=True,
                   log_level="warning")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: write_checkpoint(root / kind, kind) for kind in KINDS}


@contextlib.contextmanager
def engine(path, fast: bool, **kwargs):
    """An offline SGLang Engine on `path` with glm4v-fast's tower (fast) or SGLang's own; shut down on exit.

    The tower is chosen by GLM4V_FAST_SGLANG, which SGLang's scheduler process inherits when it is spawned.
    """
    import sglang

    os.environ["GLM4V_FAST_SGLANG"] = "1" if fast else "0"
    try:
        llm = sglang.Engine(model_path=str(path), **{**ENGINE_ARGS, **kwargs})
    finally:
        os.environ.pop("GLM4V_FAST_SGLANG", None)
    try:
        yield llm
    finally:
        llm.shutdown()
