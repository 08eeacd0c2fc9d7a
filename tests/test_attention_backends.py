"""Attention backend choice: `auto` by device, dtype and grad; explicit backends checked when the model is built
(can it run on this machine at all) and when a forward resolves them (device, dtype, gradient).

Which backends are installed is pretended through `attention.backend_runs_on`, so that the CUDA rules are
tested on any machine.
"""
import pytest
import torch

import glm4v_fast as gf
from glm4v_fast import attention as attn_dispatch
from _tiny import CONFIGS


def _pretend_on_cuda(*backends):
    """backend_runs_on as on a CUDA machine where exactly `backends` (and sdpa) are installed."""
    return lambda backend, device: backend == "sdpa" or (torch.device(device).type == "cuda" and backend in backends)


@pytest.fixture
def cuda_backends(monkeypatch):
    """Pretend flash-attn, torch's varlen attention and the Triton kernels are all present on CUDA."""
    monkeypatch.setattr(attn_dispatch, "backend_runs_on", _pretend_on_cuda("flash_attn", "torch_varlen", "triton"))


def test_auto_resolves_by_dtype_and_grad(cuda_backends, monkeypatch):
    resolve = attn_dispatch.resolve_backend
    assert resolve("auto", "cuda", torch.bfloat16) == "flash_attn"
    assert resolve("auto", "cuda", torch.float16, needs_grad=True) == "flash_attn"
    assert resolve("auto", "cuda", torch.float32) == "sdpa"
    assert resolve("auto", "cuda", torch.float32, needs_grad=True) == "sdpa"
    assert resolve("auto", "cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(attn_dispatch, "backend_runs_on", _pretend_on_cuda("triton"))
    assert resolve("auto", "cuda", torch.bfloat16) == "triton"
    assert resolve("auto", "cuda", torch.bfloat16, needs_grad=True) == "sdpa"
    assert attn_dispatch.available_backends("cuda", torch.bfloat16, needs_grad=True) == ["sdpa"]


@pytest.mark.parametrize("backend,dtype,needs_grad,match", [
    ("flash_attn", torch.float32, False, "takes only float16, bfloat16"),
    ("torch_varlen", torch.float32, True, "takes only float16, bfloat16"),
    ("triton", torch.float64, False, "takes only float32, float16, bfloat16"),
    ("triton", torch.bfloat16, True, "forward-only"),
])
def test_explicit_backend_that_cannot_serve_raises(cuda_backends, backend, dtype, needs_grad, match):
    with pytest.raises(ValueError, match=match):
        attn_dispatch.resolve_backend(backend, "cuda", dtype, needs_grad)


def test_explicit_backend_that_can_serve(cuda_backends):
    assert attn_dispatch.resolve_backend("torch_varlen", "cuda", torch.bfloat16, True) == "torch_varlen"
    assert attn_dispatch.resolve_backend("triton", "cuda", torch.float32) == "triton"
    assert attn_dispatch.resolve_backend("sdpa", "cuda", torch.float64, True) == "sdpa"




def test_auto_selection_on_cpu():
    model = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]))
    assert model.resolved() == ("torch", "sdpa")


@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn"])
def test_backend_that_cannot_run_on_this_machine_is_refused_when_built(backend):
    """A CUDA-only backend on a machine without a GPU (or without its package) can never run: the model
    refuses it at construction, naming the backend and what it needs, not at its first forward; the same on
    the meta device, where from_pretrained builds."""
    if torch.cuda.is_available() and attn_dispatch.backend_runs_on(backend, "cuda"):
        pytest.skip(f"{backend} runs on this machine")
    with pytest.raises(ValueError, match=f"{backend}' cannot run on this machine: it needs a CUDA device"):
        gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), attn_backend=backend)
    with torch.device("meta"), pytest.raises(ValueError, match=backend):
        gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), attn_backend=backend)


def test_construction_checks_the_machine_not_the_device(monkeypatch):
    """A backend that runs only on CUDA is accepted when the machine has a GPU, whatever device the model is
    built on (it is moved there later); a CPU model then refuses it at its first forward."""
    monkeypatch.setattr(attn_dispatch, "backend_runs_on", _pretend_on_cuda("flash_attn"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), kernels="torch", attn_backend="flash_attn")
    monkeypatch.undo()
    pv = torch.zeros(4, 1176)
    with torch.no_grad(), pytest.raises(ValueError, match="'flash_attn' is not available on cpu: it needs a CUDA"):
        model(pv, [[1, 2, 2]])


def test_backend_that_cannot_take_the_dtype_is_refused_at_the_first_forward():
    """Built (the backend runs on this machine), then given a dtype it does not take: the forward refuses."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not attn_dispatch.backend_runs_on("triton", device):
        pytest.skip("needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
    model = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]), kernels="torch", attn_backend="triton")
    model = model.to(device, torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match="takes only float32, float16, bfloat16"):
        model(torch.zeros(4, 1176, device=device, dtype=torch.float64), [[1, 2, 2]])
