"""One encoder workload: ours vs transformers, timed side by side, with output difference and peak memory."""
from __future__ import annotations

import torch

from ..config import VisionConfig
from ..packing import flops as model_flops
from .models import hf_embeddings, max_rel_err
from .timing import guard, peak_mib, ratio, time_ms, time_pair_ms
from .workloads import Workload


def run_encoder_workload(wl: Workload, ours, hf, config: VisionConfig, device: torch.device,
                         dtype: torch.dtype, repeats: int, peak_tflops: float, seed: int,
                         errors: list[str], notes: list[str] | None = None) -> dict:
    """Time ours and transformers on one workload; returns the JSON row.

    Where transformers' tower runs out of GPU memory (the huge-image workloads may), its fields are null and
    `notes` says so: that is a measurement, not an error."""
    pv = wl.pixel_values(config, dtype, device, seed)
    grid = wl.grid_tensor()                 # ours takes the processor's CPU grid (no device round trip)
    hf_grid = wl.hf_grid().to(device)       # transformers' Glm4vModel hands its tower a device tensor
    warmup = 2   # the first call builds Triton kernels, allocator pools and transformers' caches
    fl = model_flops(wl.seqlens, config)

    def ours_call():
        return ours(pv, grid)

    def hf_call():
        return hf_embeddings(hf(pv, hf_grid))

    hf_ms = hf_mem = err = None
    if hf is not None and device.type == "cuda" and not _fits(hf_call):
        if notes is not None:
            notes.append(f"{wl.name}: transformers ran out of GPU memory ({wl.patches} patches); its fields are null")
        hf = None
    if hf is not None:
        pair = guard(errors, f"{wl.name} ours vs transformers", time_pair_ms, ours_call, hf_call, device,
                     repeats, warmup)
        ours_ms, hf_ms = pair if pair is not None else (None, None)
    if hf is None or ours_ms is None:     # no comparison, or it failed: still time ours alone
        ours_ms = guard(errors, f"{wl.name} ours", time_ms, ours_call, device, repeats, warmup)
    ours_mem = guard(errors, f"{wl.name} ours memory", peak_mib, ours_call, device) \
        if ours_ms is not None else None
    if hf_ms is not None:
        hf_mem = guard(errors, f"{wl.name} transformers memory", peak_mib, hf_call, device)
        if ours_ms is not None and hf_ms is not None:
            err = guard(errors, f"{wl.name} output comparison", lambda: max_rel_err(ours_call(), hf_call()))
    tflops = fl / (ours_ms * 1e-3) / 1e12 if ours_ms else None
    return {
        "workload": wl.name,
        "description": wl.description,
        "images": wl.images,
        "patches": wl.patches,
        "segments": len(wl.seqlens),
        "grids": wl.grid_counts(),
        "flops": fl,
        "ours_ms": ours_ms,
        "hf_ms": hf_ms,
        "speedup": ratio(hf_ms, ours_ms),
        "tflops": tflops,
        "hf_tflops": fl / (hf_ms * 1e-3) / 1e12 if hf_ms else None,
        "mfu": ratio(tflops, peak_tflops),
        "tokens_per_s": wl.patches / (ours_ms * 1e-3) if ours_ms else None,
        "max_rel_err_vs_hf": err,
        "ours_peak_mib": ours_mem,
        "hf_peak_mib": hf_mem,
    }


def _fits(fn) -> bool:
    """Whether one call of fn runs without a CUDA out-of-memory error."""
    try:
        fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False
    return True
