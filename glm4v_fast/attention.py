"""Varlen attention dispatch: one packed sequence, non-causal attention inside each cu_seqlens segment.

Backends (all take q, k, v (N, H, D), possibly strided views of the packed qkv buffer):

- ``flash_attn``:   flash-attention's `flash_attn_varlen_func` (FA3's `flash_attn_interface` first, then FA2).
- ``torch_varlen``: `torch.nn.attention.varlen.varlen_attn` (FA2 kernels inside libtorch, CUDA only).
- ``triton``:       our FlashAttention-2-style Triton kernel (`glm4v_fast.kernels.varlen_attention`).
- ``sdpa``:         `F.scaled_dot_product_attention`, one call per run of consecutive equal-length segments
                    (a video's frames or same-size images go in one batched call; no N x N mask is built).

``auto`` resolves by device, dtype and whether a gradient is needed:

- CPU: ``sdpa``.
- CUDA, float32: ``sdpa``. flash-attn and torch's varlen attention take only fp16/bf16, and our Triton
  kernel in fp32 runs its dots on FMA units with spilled accumulators at head dim 128.
- CUDA, fp16/bf16: the first available of `AUTO_ORDER_CUDA`. The order follows the public H100 figures in
  docs/design.md §3 (FA3 > Triton-class > FA2-class, which is what torch's varlen_attn runs), with our Triton
  kernel placed after torch_varlen until a GPU measurement of it (`glm4v-fast bench`, the "attention" sweep)
  shows it ahead. Our Triton kernel is forward-only: it is skipped when a gradient is needed.

An explicit backend is checked twice, each time with a ValueError that says what it needs. When a model is
built (`check_installed`): one that can run on no device of this machine (its package missing, or CUDA-only
with no GPU) is refused at once. When a forward resolves it (`resolve_backend`): one that cannot run on the
model's device, cannot take its dtype, or (``triton``) has no backward when a gradient is needed; device and
dtype wait until then because models are usually built on the CPU or the meta device and moved afterwards.
No path returns an output without its gradient.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch
import torch.nn.functional as F

from .options import ATTN_BACKENDS as BACKENDS

# `auto`'s preference on CUDA for fp16/bf16, and the order `available_backends` lists backends in.
AUTO_ORDER_CUDA = ("flash_attn", "torch_varlen", "triton", "sdpa")
# dtypes each backend takes (sdpa: any floating dtype).
_HALF = (torch.float16, torch.bfloat16)
BACKEND_DTYPES = {"flash_attn": _HALF, "torch_varlen": _HALF, "triton": (torch.float32,) + _HALF}
FORWARD_ONLY = ("triton",)
# What each backend needs to run (sdpa runs anywhere), for the errors that refuse it.
_NEEDS = {
    "flash_attn": "a CUDA device and the flash-attn package (pip install 'glm4v-fast[flash]')",
    "torch_varlen": "a CUDA device and torch >= 2.9 (torch.nn.attention.varlen)",
    "triton": "the triton package and a CUDA device, or, for CPU tensors, TRITON_INTERPRET=1 set before triton is "
              "imported",
}


@lru_cache(maxsize=None)
def _flash_attn_func():
    """flash_attn_varlen_func from FA3 (`flash_attn_interface`) or FA2 (`flash_attn`), or None."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return getattr(importlib.import_module(module), "flash_attn_varlen_func")
        except (ImportError, AttributeError, OSError):
            continue
    return None


@lru_cache(maxsize=None)
def _torch_varlen_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _takes(backend: str, dtype: torch.dtype | None) -> bool:
    if dtype is None:
        return True
    allowed = BACKEND_DTYPES.get(backend)
    return dtype.is_floating_point if allowed is None else dtype in allowed


def backend_runs_on(backend: str, device: torch.device) -> bool:
    """Whether `backend` can run on `device` in this process (installed, and built for that device type)."""
    if backend == "flash_attn":
        return device.type == "cuda" and _flash_attn_func() is not None
    if backend == "torch_varlen":
        return device.type == "cuda" and _torch_varlen_func() is not None
    if backend == "triton":
        from . import kernels

        return kernels.can_run_on(device)
    return True


def available_backends(device: torch.device | str, dtype: torch.dtype | None = None,
                       needs_grad: bool = False) -> list[str]:
    """The backends that can run on `device`, in `auto` preference order (`AUTO_ORDER_CUDA`).

    With `dtype`, only those that take it; with `needs_grad`, only those that have a backward.
    """
    device = torch.device(device)
    return [b for b in AUTO_ORDER_CUDA if backend_runs_on(b, device) and _takes(b, dtype)
            and not (needs_grad and b in FORWARD_ONLY)]


def check_installed(name: str) -> None:
    """Raise a ValueError when `name` is not a backend, or is one that can run on no device of this machine.

    This is what a model checks when it is built: the package is missing, or the backend needs CUDA and
    there is none (or, for `triton` on a CPU-only machine, the interpreter is off). Whether it takes the
    model's device and dtype is checked when a forward resolves it (`resolve_backend`): models are often
    built on the CPU or the meta device and moved to a GPU afterwards.
    """
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"attn_backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if name == "auto" or any(backend_runs_on(name, d) for d in devices):
        return
    machine = "a CUDA device is present" if len(devices) > 1 else "this machine has no CUDA device"
    raise ValueError(f"attn_backend {name!r} cannot run on this machine: it needs {_NEEDS[name]} ({machine}); "
                     "use 'auto' or 'sdpa'")


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None,
                    needs_grad: bool = False) -> str:
    """Map `auto` to a concrete backend for (device, dtype, needs_grad) and check that an explicit one can run.

    `dtype`: the dtype of q/k/v (the model's); None when unknown, which skips the dtype rules.
    `needs_grad`: whether the attention output must carry a gradient.
    """
    device = torch.device(device)
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"attn_backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type != "cuda" or dtype == torch.float32:
            return "sdpa"
        return available_backends(device, dtype, needs_grad)[0]
    if not backend_runs_on(name, device):
        raise ValueError(f"attn_backend {name!r} is not available on {device}: it needs {_NEEDS[name]}")
    if not _takes(name, dtype):
        allowed = ", ".join(str(d).replace("torch.", "") for d in BACKEND_DTYPES[name])
        raise ValueError(f"attn_backend {name!r} takes only {allowed} inputs, not {str(dtype).replace('torch.', '')}; "
                         "use 'sdpa' or 'auto', or convert the model")
    if needs_grad and name in FORWARD_ONLY:
        raise ValueError(f"attn_backend {name!r} is forward-only (no backward) and a gradient is needed; use "
                         "'auto', 'sdpa', 'torch_varlen' or 'flash_attn' for training, or run under torch.no_grad()")
    return name


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, backend: str,
                     scale: float | None = None) -> torch.Tensor:
    """Attention within each segment of `batch`. Returns (N, H, D) in q's dtype.

    batch: a packing.PackedBatch, or the static.StaticLayout a CUDA graph reads. Every backend reads
    `cu_seqlens` and `max_seqlen`; `triton` also `tile_plan()`, `sdpa` the host-side `equal_runs` (which a
    static layout lacks: CUDA graphs refuse sdpa).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "sdpa":
        return _sdpa_runs(q, k, v, batch.equal_runs, scale)
    if backend == "triton":
        from .kernels import varlen_attention as triton_varlen_attention

        # The (segment, query tile) work list is built from host-side bounds once per layout and kept on
        # it (a fixed-size device tensor for bucketed layouts): no host work after the first forward.
        plan = batch.tile_plan()
        return triton_varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, scale=scale, tile_plan=plan)
    if backend == "torch_varlen":
        return _torch_varlen_func()(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen,
                                    batch.max_seqlen, scale=scale)
    if backend == "flash_attn":
        out = _flash_attn_func()(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen, batch.max_seqlen,
                                 softmax_scale=scale, causal=False)
        return out[0] if isinstance(out, tuple) else out      # FA3 may also return the softmax LSE
    raise ValueError(f"unknown attention backend {backend!r}")


def _sdpa_runs(q, k, v, runs, scale):
    # One launch per run, sliced by host-side bounds: cheap eagerly, but not capturable in a CUDA graph
    # (the model refuses cuda_graphs with this backend). Empty segments of a bucketed layout form no run.
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for start, count, length in runs:
        stop = start + count * length
        # (count*L, H, D) -> (count, H, L, D): one batched call for every equal-length segment of the run.
        qs, ks, vs = (t[start:stop].unflatten(0, (count, length)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[start:stop] = o.transpose(1, 2).flatten(0, 1)
    return out
