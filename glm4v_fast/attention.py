"""Varlen attention dispatch: one packed sequence, non-causal attention inside each cu_seqlens segment.

Backends (all take q, k, v (N, H, D), possibly strided views of the packed qkv buffer):

- ``flash_attn``:   flash-attention's `flash_attn_varlen_func` (FA3's `flash_attn_interface` first, then FA2).
- ``torch_varlen``: `torch.nn.attention.varlen.varlen_attn` (FA2 kernels inside libtorch, CUDA only).
- ``triton``:       our FlashAttention-2-style Triton kernel (`glm4v_fast.kernels.varlen_attention`).
- ``sdpa``:         `F.scaled_dot_product_attention`, one call per run of consecutive equal-length segments
                    (a video's frames or same-size images go in one batched call; no N x N mask is built).

``auto`` takes the first available of `AUTO_ORDER`. The order on CUDA follows the public H100 figures in
anchors.md §3 (FA3 > Triton-class > FA2-class, which is what torch's varlen_attn runs), with our Triton
kernel placed after torch_varlen until a GPU measurement of it (`glm4v-fast bench`, the "attention" sweep)
shows it ahead. On CPU it is ``sdpa``.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "torch_varlen", "triton", "sdpa")
AUTO_ORDER_CUDA = ("flash_attn", "torch_varlen", "triton", "sdpa")


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


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on `device`, in `auto` preference order."""
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
    return found


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map `auto` to a concrete backend and check that an explicit one can run on `device`."""
    device = torch.device(device)
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"attn_backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    available = available_backends(device)
    if name == "auto":
        return available[0] if device.type == "cuda" else "sdpa"
    if name not in available:
        hint = {
            "flash_attn": "it needs a CUDA device and the flash-attn package (pip install glm4v-fast[flash])",
            "torch_varlen": "it needs a CUDA device and torch >= 2.9 (torch.nn.attention.varlen)",
            "triton": "it needs triton and a CUDA device, or TRITON_INTERPRET=1 for CPU tensors",
        }[name]
        raise ValueError(f"attn_backend {name!r} is not available on {device}: {hint}")
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
