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

An explicit backend that cannot run on the device, cannot take the dtype, or (``triton``) has no backward
when a gradient is needed raises a ValueError that says so: no path returns an output without its gradient.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch
import torch.nn.functional as F

from .options import ATTN_BACKENDS as BACKENDS

AUTO_ORDER_CUDA = ("flash_attn", "torch_varlen", "triton", "sdpa")
# dtypes each backend takes (sdpa: any floating dtype).
_HALF = (torch.float16, torch.bfloat16)
BACKEND_DTYPES = {"flash_attn": _HALF, "torch_varlen": _HALF, "triton": (torch.float32,) + _HALF}
FORWARD_ONLY = ("triton",)


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


def _triton_runs_on(device: torch.device) -> bool:
    from . import kernels

    return kernels.can_run_on(device)


def _takes(backend: str, dtype: torch.dtype | None) -> bool:
    if dtype is None:
        return True
    allowed = BACKEND_DTYPES.get(backend)
    return dtype.is_floating_point if allowed is None else dtype in allowed


def available_backends(device: torch.device | str, dtype: torch.dtype | None = None,
                       needs_grad: bool = False) -> list[str]:
    """The backends that can run on `device`, in `auto` preference order.

    With `dtype`, only those that take it; with `needs_grad`, only those that have a backward.
    """
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if _flash_attn_func() is not None:
            found.append("flash_attn")
        if _torch_varlen_func() is not None:
            found.append("torch_varlen")
    if _triton_runs_on(device):
        found.append("triton")
    found.append("sdpa")
    return [b for b in found if _takes(b, dtype) and not (needs_grad and b in FORWARD_ONLY)]


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
    if name not in available_backends(device):
        hint = {
            "flash_attn": "it needs a CUDA device and the flash-attn package (pip install glm4v-fast[flash])",
            "torch_varlen": "it needs a CUDA device and torch >= 2.9 (torch.nn.attention.varlen)",
            "triton": "it needs triton and a CUDA device, or TRITON_INTERPRET=1 for CPU tensors",
        }[name]
        raise ValueError(f"attn_backend {name!r} is not available on {device}: {hint}")
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
    """Attention within each segment of `batch` (a PackedBatch). Returns (N, H, D) in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "sdpa":
        return _sdpa_runs(q, k, v, batch.equal_runs, scale)
    if backend == "triton":
        from .kernels import varlen_attention as triton_varlen_attention

        # The (segment, query tile) work list is built from host-side bounds once per layout and cached on
        # it (a fixed-size device tensor for bucketed layouts): no host work after the first forward.
        plan = batch.tile_plan(q.shape[-1], q.device)
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
