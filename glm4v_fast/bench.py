"""`glm4v-fast bench`: the encoder against transformers, the kernel and attention sweeps, device peaks.

One run measures, on one device and in one process:

1. the device's own peaks: a large matmul (FLOP/s) and a large tensor copy (bytes read + written per
   second), so that MFU and bandwidth fractions are fractions of what this machine sustains, not of a
   datasheet;
2. the encoder workloads (`WORKLOADS`): ours vs transformers' Glm4vVisionModel (sdpa) on the same seeded
   weights and the same random pixel_values, timed from (pixel_values, grid_thw) to the merged embeddings
   (image preprocessing excluded), with the output difference and the peak memory of each;
3. the element-wise kernels (glm4v_fast.kernels) vs their PyTorch twins and torch.compile of the twins;
4. varlen attention for every backend available on the device, over several segment lengths.

It prints tables and writes ``<out>/<date>-<device>[-small].json`` plus a PNG of the side-by-side.

On a GPU the full GLM-4.1V tower runs in bf16 on the real workload sizes. On the CPU (``--small``, the
default there) a small tower runs in fp32 on the workloads' grids scaled down by 4, so the whole command
finishes in a minute or two; only ratios mean anything then. transformers is imported here only, lazily.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata as md
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from . import attention as attn_dispatch
from .config import VisionConfig
from .packing import flops as model_flops
from .pipeline import default_device
from .packing import pack, split_temporal

PATCH = 14  # pixels per patch side: the grids below are the processor's output for these image sizes

# serving-mix draws its 64 image sizes (height, width in pixels) from these with random.Random(0).choice.
SERVING_MIX_PIXELS = ((224, 224), (336, 336), (448, 448), (448, 672), (672, 896), (1120, 1120))
SERVING_MIX_IMAGES = 64

WORKLOAD_NAMES = ("single-448", "serving-mix", "hires-1120", "hires-1680", "video-448")

# The small tower for CPU runs: every code path of the full one (2 layers, 2 heads of 64, a merger),
# at about 1 MFLOP per patch so that thousands of patches take well under a second.
SMALL_CONFIG = {"depth": 2, "hidden_size": 128, "num_heads": 2, "out_hidden_size": 256, "intermediate_size": 512}
SMALL_SCALE = 4  # grid sides (and video temporal length) divided by this in --small mode

# Segment lengths for the attention sweep (square grids, so that `pack` builds the batch as the model
# would) and the total tokens packed per call.
ATTN_SEQLENS = {"full": (256, 1024, 4096, 16384), "small": (64, 256)}
ATTN_TOTAL = {"full": 32768, "small": 1024}
INTERPRETED_ATTN_SEQLEN = 64  # the Triton interpreter runs one program at a time: keep its sweep tiny

# Kernel sweep tokens. Full: one 32k-token packed batch (the issue's bandwidth target is stated there).
# Small: enough rows to leave the per-call overhead behind on a CPU, or a handful under the interpreter.
KERNEL_TOKENS = {"full": 32768, "small": 4096, "interpreted": 64}

# Targets from the issue, reported against (never asserted). (workload, field, comparison, bound).
ENCODER_TARGETS = (("serving-mix", "speedup", ">=", 3.0), ("hires-1120", "speedup", ">=", 1.5),
                   ("hires-1120", "mfu", ">=", 0.55), ("single-448", "ours_ms", "<=", 3.0))
MAX_REL_ERR_TARGET = 1e-2
KERNEL_PEAK_FRACTION_TARGET = 0.8

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2: each kernel rep starts from cold caches


# ---------------------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """A batch for one encoder call: items as (t, h, w) patch grids, exactly as the processor emits them."""

    name: str
    grid: tuple[tuple[int, int, int], ...]
    description: str

    @property
    def images(self) -> int:
        """Items in the call (a video counts once)."""
        return len(self.grid)

    @property
    def patches(self) -> int:
        return sum(t * h * w for t, h, w in self.grid)

    @property
    def seqlens(self) -> list[int]:
        """Attention segment lengths: one per image and one per video temporal slice."""
        return [h * w for t, h, w in self.grid for _ in range(t)]

    def grid_tensor(self) -> torch.Tensor:
        return torch.tensor(self.grid, dtype=torch.int64)

    def hf_grid(self) -> torch.Tensor:
        """The grid transformers' tower is called with: videos split into (1, h, w) rows, as its
        get_video_features does."""
        return split_temporal(self.grid_tensor())

    def grid_counts(self) -> dict[str, int]:
        return {f"{t}x{h}x{w}": n for (t, h, w), n in sorted(Counter(self.grid).items())}

    def pixel_values(self, config: VisionConfig, dtype: torch.dtype, device: torch.device,
                     seed: int) -> torch.Tensor:
        """Random (patches, patch_dim) pixel_values, generated on `device` from a fixed seed."""
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(self.patches, config.patch_dim, generator=gen, device=device,
                           dtype=torch.float32).to(dtype)


def _shrink(side: int, merge: int) -> int:
    """A grid side divided by SMALL_SCALE, kept a positive multiple of the spatial merge size."""
    return max(merge, side // SMALL_SCALE // merge * merge)


def workloads(small: bool = False, names: list[str] | tuple[str, ...] | None = None,
              merge: int = 2) -> list[Workload]:
    """The benchmark workloads (all, or `names` in the given order); grids scaled down when `small`."""
    rng = random.Random(0)
    mix = [rng.choice(SERVING_MIX_PIXELS) for _ in range(SERVING_MIX_IMAGES)]
    full = {
        "single-448": ([(1, 32, 32)], "one 448x448 image"),
        "serving-mix": ([(1, h // PATCH, w // PATCH) for h, w in mix],
                        f"{SERVING_MIX_IMAGES} images, sizes drawn with random.Random(0).choice from "
                        + ", ".join(f"{h}x{w}" for h, w in SERVING_MIX_PIXELS)),
        "hires-1120": ([(1, 80, 80)] * 8, "8 images of 1120x1120"),
        "hires-1680": ([(1, 120, 120)] * 2, "2 images of 1680x1680"),
        "video-448": ([(16, 32, 32)], "one 32-frame 448x448 video (temporal patch 2)"),
    }
    names = list(names) if names is not None else list(WORKLOAD_NAMES)
    unknown = [n for n in names if n not in full]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOAD_NAMES)}")
    out = []
    for name in names:
        grid, description = full[name]
        if small:
            grid = [(t if t == 1 else max(1, t // SMALL_SCALE), _shrink(h, merge), _shrink(w, merge))
                    for t, h, w in grid]
            description += f" (grid sides / {SMALL_SCALE})"
        out.append(Workload(name, tuple(grid), description))
    return out


def small_config() -> VisionConfig:
    return VisionConfig(**SMALL_CONFIG)


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1,
            isolate: bool = True, flush: Callable[[], object] | None = None) -> float:
    """Median milliseconds per call of fn over `repeats` timed calls, after `warmup` untimed ones.

    CUDA: each call is bracketed by CUDA events (do_bench style). With `isolate` the stream is drained
    before each call, so host-side work that does not overlap the GPU counts, as it does for one request;
    without it calls queue back to back and only device time is seen (right for microsecond kernels, whose
    launch cost would otherwise dominate). `flush` runs untimed before each call (an L2 wipe).
    CPU: wall time with perf_counter.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            if flush is not None:
                flush()
            if isolate:
                torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(repeats):
            if flush is not None:
                flush()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_pair_ms(fn_a: Callable[[], object], fn_b: Callable[[], object], device: torch.device, repeats: int,
                 warmup: int = 1) -> tuple[float, float]:
    """Median milliseconds per call of two functions timed alternately (a, b, a, b, ...).

    A side-by-side comparison should not depend on when each side ran: drift in the machine's speed (other
    load on a shared host, clocks) then hits both alike, which two back-to-back blocks of calls do not ensure.
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(time_ms(fn_a, device, 1, warmup=0))
        times_b.append(time_ms(fn_b, device, 1, warmup=0))
    return statistics.median(times_a), statistics.median(times_b)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB allocated by one call of fn above what was allocated before it (activations, workspaces and the
    output; the resident weights and inputs are not counted). None off CUDA: the CPU allocator keeps no
    statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def _matmul_ms(n: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return time_ms(lambda: torch.matmul(a, b, out=c), device, reps, warmup=2, isolate=False)


def _copy_ms(nbytes: int, device: torch.device, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, reps, warmup=2, isolate=False)


def measure_peaks(device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """The device's measured matmul throughput (in `dtype`) and copy bandwidth (bytes read + written)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    copy_bytes = 2**30 if cuda else 256 * 2**20   # both far beyond the last-level cache
    reps = max(repeats, 10 if cuda else 3)
    matmul_ms = _matmul_ms(n, dtype, device, reps)
    copy_ms = _copy_ms(copy_bytes, device, reps)
    return {
        # "bf16_tflops" is the issue's name for the matmul peak; peak_dtype says what it was measured in.
        "bf16_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "hbm_tbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e12,
        "peak_dtype": str(dtype).removeprefix("torch."),
        "matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}",
        "copy_bytes": copy_bytes,
        "memory": "HBM (device-to-device copy)" if cuda else "DRAM (host tensor copy), not HBM",
    }


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def import_transformers():
    """transformers' (Glm4vVisionConfig, Glm4vVisionModel), imported lazily: only the bench needs them."""
    try:
        from transformers.models.glm4v.modeling_glm4v import Glm4vVisionConfig, Glm4vVisionModel
    except ImportError as e:
        raise ValueError(f"comparing with transformers needs it installed ({e}): pip install 'glm4v-fast[test]' "
                         "(or pass --no-hf to time glm4v-fast alone)") from None
    return Glm4vVisionConfig, Glm4vVisionModel


@torch.no_grad()
def seeded_init_(model: torch.nn.Module, seed: int, std: float) -> None:
    """Overwrite every parameter from a seeded generator on the model's device: matrices and biases
    N(0, std), norm weights 1 + N(0, 0.1) (non-trivial, so a misplaced norm weight would show)."""
    for name, p in model.named_parameters():
        gen = torch.Generator(device=p.device).manual_seed(seed)
        seed += 1
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        if p.dim() == 1 and not name.endswith("bias"):
            noise = 1.0 + 0.1 * noise
        else:
            noise = std * noise
        p.copy_(noise.to(p.dtype))


def build_models(config: VisionConfig, device: torch.device, dtype: torch.dtype, attn_backend: str = "auto",
                 kernels: str = "auto", with_hf: bool = True, seed: int = 0):
    """(ours, hf or None) on `device` in `dtype`, with identical seeded weights.

    transformers' Glm4vVisionModel (attention "sdpa") is built with `dtype` as the default dtype, as its
    from_pretrained(dtype=...) does, so its rotary inv_freq buffer stays fp32; it is seeded, and its
    state_dict (transformers' keys) is loaded into ours. Without transformers, ours is seeded directly.
    """
    from .model import VisionModel

    with torch.device("meta"):
        ours = VisionModel(config, attn_backend=attn_backend, kernels=kernels)
    ours = ours.to(dtype).to_empty(device=device).eval()
    ours.resolved()   # raises now, with a clear message, if the kernels or backend cannot run here

    hf = None
    if with_hf:
        hf_config_cls, hf_model_cls = import_transformers()
        hf_dict = config.to_dict()
        hf_dict.pop("model_type")
        hf_config = hf_config_cls(**hf_dict)
        hf_config._attn_implementation = "sdpa"
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                hf = hf_model_cls(hf_config).eval()
        finally:
            torch.set_default_dtype(default)
        seeded_init_(hf, seed, config.initializer_range)
        ours.load_state_dict(hf.state_dict(), strict=True)
    else:
        seeded_init_(ours, seed, config.initializer_range)
    return ours, hf


def hf_embeddings(out) -> torch.Tensor:
    """The merged embeddings from transformers' tower output (a ModelOutput, or a tensor in older releases)."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (the tests' measure), in float64."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------
# The encoder workloads
# ---------------------------------------------------------------------------------------------------------------
def _guard(errors: list[str], label: str, fn: Callable, *args):
    """fn(*args), or None with the error recorded: one failing measurement must not lose a whole GPU
    session's results. Recorded errors go into the JSON and make the command exit with status 1."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded, reported, and reflected in the exit status
        first_line = str(e).splitlines()[0][:300] if str(e) else ""
        errors.append(f"{label}: {type(e).__name__}: {first_line}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def _ratio(a, b):
    return a / b if a is not None and b else None


def run_encoder_workload(wl: Workload, ours, hf, config: VisionConfig, device: torch.device,
                         dtype: torch.dtype, repeats: int, peak_tflops: float, seed: int,
                         errors: list[str]) -> dict:
    """Time ours and transformers on one workload; returns the JSON row."""
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
    if hf is not None:
        pair = _guard(errors, f"{wl.name} ours vs transformers", time_pair_ms, ours_call, hf_call, device,
                      repeats, warmup)
        ours_ms, hf_ms = pair if pair is not None else (None, None)
    if hf is None or ours_ms is None:     # no comparison, or it failed: still time ours alone
        ours_ms = _guard(errors, f"{wl.name} ours", time_ms, ours_call, device, repeats, warmup)
    ours_mem = _guard(errors, f"{wl.name} ours memory", peak_mib, ours_call, device) \
        if ours_ms is not None else None
    if hf_ms is not None:
        hf_mem = _guard(errors, f"{wl.name} transformers memory", peak_mib, hf_call, device)
        if ours_ms is not None and hf_ms is not None:
            err = _guard(errors, f"{wl.name} output comparison", lambda: max_rel_err(ours_call(), hf_call()))
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
        "speedup": _ratio(hf_ms, ours_ms),
        "tflops": tflops,
        "hf_tflops": fl / (hf_ms * 1e-3) / 1e12 if hf_ms else None,
        "mfu": _ratio(tflops, peak_tflops),
        "tokens_per_s": wl.patches / (ours_ms * 1e-3) if ours_ms else None,
        "max_rel_err_vs_hf": err,
        "ours_peak_mib": ours_mem,
        "hf_peak_mib": hf_mem,
    }


# ---------------------------------------------------------------------------------------------------------------
# Kernel sweep
# ---------------------------------------------------------------------------------------------------------------
def _nbytes(*tensors: torch.Tensor) -> int:
    """Bytes of the elements a view covers (not its whole storage)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def kernel_cases(config: VisionConfig, tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(kernel, shape, ours, twin, args, bytes read + written) for each element-wise kernel of a layer."""
    from . import kernels as K

    c, i, h, d = config.hidden_size, config.out_hidden_size, config.num_heads, config.head_dim
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    x, r, w = randn(tokens, c), randn(tokens, c), randn(c)
    qkv = randn(tokens, 3, h, d)
    q = qkv[:, 0]                             # a strided view, as the model passes it
    angles = randn(tokens, d // 2, dt=torch.float32).repeat(1, 2)   # HF layout: cat(freqs, freqs)
    cos, sin = angles.cos(), angles.sin()
    gate_up = randn(tokens, 2 * i)
    gate, up = gate_up[:, :i], gate_up[:, i:]  # views of the one gate_up GEMM output
    return [
        ("rms_norm", f"{tokens}x{c}", K.rms_norm, K.rms_norm_reference, (x, w, config.rms_norm_eps),
         2 * _nbytes(x) + _nbytes(w)),
        ("rms_norm+residual", f"{tokens}x{c}", K.rms_norm, K.rms_norm_reference,
         (x, w, config.rms_norm_eps, r), 4 * _nbytes(x) + _nbytes(w)),
        ("apply_rotary", f"{tokens}x{h}x{d} (q of qkv)", K.apply_rotary, K.apply_rotary_reference, (q, cos, sin),
         2 * _nbytes(q) + _nbytes(cos, sin)),
        ("swiglu", f"{tokens}x{i} (gate_up views)", K.swiglu, K.swiglu_reference, (gate, up),
         _nbytes(gate, up) + _nbytes(gate)),
    ]


def run_kernel_sweep(config: VisionConfig, mode: str, dtype: torch.dtype, device: torch.device, repeats: int,
                     peak_tbps: float, notes: list[str], errors: list[str]) -> list[dict]:
    from . import kernels as K

    ours_runs = K.can_run_on(device)
    interpreted = ours_runs and device.type != "cuda"
    tokens = KERNEL_TOKENS["interpreted" if interpreted else mode]
    if not ours_runs:
        notes.append(f"kernels: the Triton kernels cannot run on {device.type} here (they need CUDA, or "
                     "TRITON_INTERPRET=1 set before triton is imported); only the twin and its compile are timed")
    elif interpreted:
        notes.append(f"kernels: ours ran in the Triton CPU interpreter at {tokens} tokens (a functional run, "
                     "not a speed)")
    cuda = device.type == "cuda"
    # Short timings: more samples are nearly free and steady the median (the interpreter is not short).
    reps, ours_reps = repeats * 5, (repeats if interpreted else repeats * 5)
    flush = None
    if cuda:
        scratch = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        flush = scratch.zero_

    def timed_us(fn, args, reps=reps):
        return 1e3 * time_ms(lambda: fn(*args), device, reps, warmup=2, isolate=False, flush=flush)

    rows = []
    for name, shape, ours, twin, args, nbytes in kernel_cases(config, tokens, dtype, device):
        ours_us = _guard(errors, f"kernel {name} ours", timed_us, ours, args, ours_reps) if ours_runs else None
        torch_us = _guard(errors, f"kernel {name} torch twin", timed_us, twin, args)
        # Compile failures (no C++ toolchain for Inductor on CPU, an unsupported op ...) become a null
        # with a note, not an error; the first (warmup) call is the one that compiles.
        compile_us = _guard(notes, f"kernel {name} torch.compile", timed_us, torch.compile(twin, dynamic=False),
                            args)
        gbps = nbytes / (ours_us * 1e-6) / 1e9 if ours_us else None
        rows.append({
            "kernel": name,
            "shape": shape,
            "dtype": str(dtype).removeprefix("torch."),
            "tokens": tokens,
            "bytes": nbytes,
            "ours_us": ours_us,
            "torch_us": torch_us,
            "compile_us": compile_us,
            "gbps": gbps,
            "peak_fraction": gbps / (peak_tbps * 1e3) if gbps else None,
            "torch_gbps": nbytes / (torch_us * 1e-6) / 1e9 if torch_us else None,
            "compile_gbps": nbytes / (compile_us * 1e-6) / 1e9 if compile_us else None,
            "ours_interpreted": interpreted,
        })
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Attention sweep
# ---------------------------------------------------------------------------------------------------------------
def run_attention_sweep(config: VisionConfig, mode: str, dtype: torch.dtype, device: torch.device,
                        repeats: int, notes: list[str], errors: list[str]) -> list[dict]:
    """varlen attention per backend x segment length, config.num_heads x config.head_dim, packed segments."""
    h, d = config.num_heads, config.head_dim
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for backend in attn_dispatch.available_backends(device):
        interpreted = backend == "triton" and not cuda
        seqlens = [s for s in ATTN_SEQLENS[mode] if not interpreted or s <= INTERPRETED_ATTN_SEQLEN] \
            or [INTERPRETED_ATTN_SEQLEN]
        for seqlen in seqlens:
            side = math.isqrt(seqlen)
            total = 2 * seqlen if interpreted else max(ATTN_TOTAL[mode], seqlen)
            segments = total // seqlen
            batch = pack(torch.tensor([[1, side, side]] * segments), config, device)
            qkv = torch.randn(segments * seqlen, 3, h, d, generator=gen, device=device,
                              dtype=torch.float32).to(dtype)
            q, k, v = qkv.unbind(1)           # strided views of one packed buffer, as in the model
            call = partial(attn_dispatch.varlen_attention, q, k, v, batch, backend, scale=d**-0.5)
            reps = repeats if interpreted else repeats * 5     # as in the kernel sweep
            ms = _guard(errors, f"attention {backend} L={seqlen}", time_ms, call, device, reps, 2, False)
            fl = 4 * seqlen * seqlen * h * d * segments
            rows.append({"backend": backend, "seqlen": seqlen, "segments": segments, "heads": h, "head_dim": d,
                         "ms": ms, "tflops": fl / (ms * 1e-3) / 1e12 if ms else None,
                         "interpreted": interpreted})
    if any(r["interpreted"] for r in rows):
        notes.append("attention: the triton backend ran in the CPU interpreter (tiny; not a speed)")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Targets, tables, plot
# ---------------------------------------------------------------------------------------------------------------
def _compare(value, op: str, bound) -> bool | None:
    if value is None or bound is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def evaluate_targets(encoder: list[dict], kernels: list[dict]) -> list[dict]:
    """The issue's targets with the measured value and whether it is met (None: not measured)."""
    rows = {r["workload"]: r for r in encoder}
    out = []
    for workload, field_, op, bound in ENCODER_TARGETS:
        if workload in rows:
            value = rows[workload][field_]
            out.append({"target": f"{workload} {field_} {op} {bound:g}", "value": value,
                        "met": _compare(value, op, bound)})
    for r in encoder:
        out.append({"target": f"{r['workload']} max_rel_err_vs_hf <= {MAX_REL_ERR_TARGET:g}",
                    "value": r["max_rel_err_vs_hf"], "met": _compare(r["max_rel_err_vs_hf"], "<=", MAX_REL_ERR_TARGET)})
        out.append({"target": f"{r['workload']} ours_peak_mib <= hf_peak_mib", "value": r["ours_peak_mib"],
                    "met": _compare(r["ours_peak_mib"], "<=", r["hf_peak_mib"])})
    for k in kernels:
        if k["ours_interpreted"]:
            continue      # interpreter timings say nothing about speed
        fraction = k["peak_fraction"]
        out.append({"target": f"kernel {k['kernel']} {k['shape']} peak_fraction >= {KERNEL_PEAK_FRACTION_TARGET:g}",
                    "value": fraction, "met": _compare(fraction, ">=", KERNEL_PEAK_FRACTION_TARGET)})
        out.append({"target": f"kernel {k['kernel']} {k['shape']} ours_us <= compile_us", "value": k["ours_us"],
                    "met": _compare(k["ours_us"], "<=", k["compile_us"])})
    return out


def _fmt(value, spec: str = ".2f", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def format_tables(result: dict) -> str:
    p = result["peaks"]
    lines = [(f"device: {result['device']}  torch {result['torch']}  triton {result['triton']}  "
              f"flash-attn {result['flash_attn']}  transformers {result['transformers']}"),
             (f"mode: {result['mode']} ({result['dtype']}; kernels={result['kernels_used']}, "
              f"attention={result['attn_backend_used']})"),
             (f"peaks: matmul {p['bf16_tflops']:.3f} TFLOP/s ({p['matmul']}), copy {p['hbm_tbps']:.3f} TB/s "
              f"({p['memory']})"), ""]
    if result["encoder"]:
        lines.append(f"{'workload':<12} {'images':>6} {'patches':>8} {'ours ms':>9} {'hf ms':>9} {'speedup':>8} "
                     f"{'TFLOP/s':>8} {'MFU':>6} {'rel err':>9} {'ours MiB':>9} {'hf MiB':>9}")
        for r in result["encoder"]:
            lines.append(f"{r['workload']:<12} {r['images']:>6} {r['patches']:>8} {_fmt(r['ours_ms'], '.2f'):>9} "
                         f"{_fmt(r['hf_ms'], '.2f'):>9} {_fmt(r['speedup'], '.2f'):>8} {_fmt(r['tflops'], '.3f'):>8} "
                         f"{_fmt(r['mfu'], '.1%'):>6} {_fmt(r['max_rel_err_vs_hf'], '.1e'):>9} "
                         f"{_fmt(r['ours_peak_mib'], '.0f'):>9} {_fmt(r['hf_peak_mib'], '.0f'):>9}")
        lines.append("")
    if result["kernels"]:
        lines.append(f"{'kernel':<18} {'shape':<26} {'ours us':>9} {'torch us':>9} {'compile us':>10} "
                     f"{'GB/s':>8} {'of peak':>8} {'torch GB/s':>10} {'compile GB/s':>12}")
        for k in result["kernels"]:
            ours = _fmt(k["ours_us"], ".1f") + ("*" if k["ours_interpreted"] and k["ours_us"] is not None else "")
            lines.append(f"{k['kernel']:<18} {k['shape']:<26} {ours:>9} {_fmt(k['torch_us'], '.1f'):>9} "
                         f"{_fmt(k['compile_us'], '.1f'):>10} {_fmt(k['gbps'], '.1f'):>8} "
                         f"{_fmt(k['peak_fraction'], '.1%'):>8} {_fmt(k['torch_gbps'], '.1f'):>10} "
                         f"{_fmt(k['compile_gbps'], '.1f'):>12}")
        if any(k["ours_interpreted"] for k in result["kernels"]):
            lines.append("  * Triton CPU interpreter: a functional run, not a speed")
        lines.append("")
    if result["attention"]:
        lines.append(f"{'backend':<14} {'seqlen':>7} {'segments':>8} {'ms':>9} {'TFLOP/s':>9}")
        for a in result["attention"]:
            lines.append(f"{a['backend'] + ('*' if a['interpreted'] else ''):<14} {a['seqlen']:>7} "
                         f"{a['segments']:>8} {_fmt(a['ms'], '.3f'):>9} {_fmt(a['tflops'], '.3f'):>9}")
        lines.append("")
    measured = [t for t in result["targets"] if t["met"] is not None]
    if measured:
        lines.append("targets" + ("" if result["targets_apply"] else
                                  " (defined for the full GPU workloads; shown for reference only)") + ":")
        for t in measured:
            lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {_fmt(t['value'], '.4g')}")
        lines.append("")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    for error in result["errors"]:
        lines.append(f"ERROR: {error}")
    return "\n".join(lines)


def write_plot(result: dict, path: Path) -> None:
    """Encoder latency side by side, kernel bandwidth, attention throughput: one PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    ax = axes[0]
    enc = [r for r in result["encoder"] if r["ours_ms"] is not None]
    if enc:
        xs = range(len(enc))
        ax.bar([x - 0.2 for x in xs], [r["ours_ms"] for r in enc], 0.4, label="glm4v-fast")
        hf_x = [x + 0.2 for x, r in zip(xs, enc) if r["hf_ms"] is not None]
        if hf_x:
            ax.bar(hf_x, [r["hf_ms"] for r in enc if r["hf_ms"] is not None], 0.4, label="transformers (sdpa)")
        for x, r in zip(xs, enc):
            if r["speedup"] is not None:
                ax.annotate(f"{r['speedup']:.2f}x", (x, max(r["ours_ms"], r["hf_ms"])), ha="center",
                            va="bottom", fontsize=9)
        ax.set_xticks(list(xs), [r["workload"] for r in enc], rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call (median, lower is better)")
        ax.legend()
    ax.set_title("encoder: glm4v-fast vs transformers")

    ax = axes[1]
    ks = result["kernels"]
    if ks:
        xs = range(len(ks))
        ours_label = "ours (Triton)" if any(k["gbps"] for k in ks) else "ours (Triton): cannot run here"
        if any(k["ours_interpreted"] for k in ks):
            ours_label = "ours (Triton interpreter: not a speed)"
        for offset, key, label in ((-0.27, "gbps", ours_label), (0.0, "torch_gbps", "PyTorch twin"),
                                   (0.27, "compile_gbps", "torch.compile(twin)")):
            ax.bar([x + offset for x in xs], [k[key] or 0.0 for k in ks], 0.27, label=label)
        ax.axhline(result["peaks"]["hbm_tbps"] * 1e3, color="k", ls="--", lw=1, label="measured copy peak")
        ax.set_xticks(list(xs), [k["kernel"] for k in ks], rotation=20)
        ax.set_ylabel("GB/s (bytes read + written)")
        ax.legend(fontsize=8)
    ax.set_title(f"element-wise kernels ({ks[0]['tokens']} tokens)" if ks else "element-wise kernels")

    ax = axes[2]
    att = result["attention"]
    for backend in dict.fromkeys(a["backend"] for a in att):
        pts = [(a["seqlen"], a["tflops"]) for a in att if a["backend"] == backend and a["tflops"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=backend)
    if att:
        ax.axhline(result["peaks"]["bf16_tflops"], color="k", ls="--", lw=1,
                   label=f"measured {result['peaks']['peak_dtype']} matmul peak")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("segment length (tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=8)
    ax.set_title("varlen attention")

    caveat = "  |  CPU, small shapes: compare ratios only" if result["device_type"] == "cpu" else ""
    fig.suptitle(f"glm4v-fast bench: {result['device']}, {result['dtype']}, {result['mode']} shapes, "
                 f"{result['date']}{caveat}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def _finite(obj, errors: list[str], path: str = ""):
    """obj with every non-finite float replaced by None (JSON has no NaN), each one recorded as an error."""
    if isinstance(obj, dict):
        return {k: _finite(v, errors, f"{path}.{k}" if path else k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v, errors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        errors.append(f"{path}: measured {obj}")
        return None
    return obj


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _command_line(args) -> str:
    """The canonical command for these settings (reproducible, whatever entry point was used)."""
    parts = ["glm4v-fast", "bench", "--small" if args.small else "--full", "--device", str(args.device),
             "--workloads", ",".join(args.workloads), "--repeats", str(args.repeats), "--out", str(args.out),
             "--attn-backend", args.attn_backend, "--kernels", args.kernels, "--seed", str(args.seed)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    parts += [flag for flag, on in (("--no-hf", args.no_hf), ("--kernels-only", args.kernels_only),
                                    ("--encoder-only", args.encoder_only), ("--no-plot", args.no_plot)) if on]
    env = "TRITON_INTERPRET=1 " if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return env + " ".join(parts)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from .model import KERNEL_CHOICES

    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", dest="small", action="store_true", default=None,
                      help="small tower (depth 2, hidden 128), grids / 4, fp32 (default on CPU)")
    size.add_argument("--full", dest="small", action="store_false",
                      help="the GLM-4.1V tower on the real workload sizes, bf16 on GPU (default on CUDA)")
    p.add_argument("--workloads", default=",".join(WORKLOAD_NAMES),
                   help=f"comma-separated subset of {','.join(WORKLOAD_NAMES)} (default: all)")
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda when available)")
    p.add_argument("--out", default="bench/results", metavar="DIR",
                   help="where <date>-<device>.json and its PNG go (default bench/results)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (its fields are null)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement, median reported (default 10 on "
                                               "GPU, x5 for the microsecond kernel and attention timings; 3 on CPU)")
    p.add_argument("--kernels-only", action="store_true",
                   help="skip the encoder workloads (peaks, kernel and attention sweeps only)")
    p.add_argument("--encoder-only", action="store_true",
                   help="skip the kernel and attention sweeps (e.g. the full tower on a CPU, where they take long)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--attn-backend", default="auto", choices=("auto",) + attn_dispatch.BACKENDS,
                   help="VisionModel attn_backend for the encoder workloads (default auto)")
    p.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                   help="VisionModel kernels for the encoder workloads (default auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice); on a shared "
                                               "machine 1 avoids stalls of threads waiting for busy cores")
    p.add_argument("--seed", type=int, default=0, help="weights seed; workload i uses seed + 1 + i for its "
                                                        "pixel_values (default 0)")


def run_bench(args) -> int:
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    args.device = str(device)
    if args.small is None:
        args.small = device.type != "cuda"
    names = [n.strip() for n in args.workloads.split(",") if n.strip()] if isinstance(args.workloads, str) \
        else list(args.workloads)
    args.workloads = names
    selected = workloads(args.small, names)                    # validates the names
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 10 if device.type == "cuda" else 3
    if args.kernels_only and args.encoder_only:
        raise ValueError("--kernels-only and --encoder-only exclude each other")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    mode = "small" if args.small else "full"
    config = small_config() if args.small else VisionConfig()
    # bf16 is what the encoder serves in on a GPU; CPUs have no fast bf16 matmul, so fp32 there.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with_hf = not args.no_hf and not args.kernels_only
    # Fail before any measurement: a missing transformers, kernels or attention backend that cannot run here.
    if with_hf:
        import_transformers()
    if not args.kernels_only:
        from .model import select_ops

        select_ops(args.kernels, device)
        attn_dispatch.resolve_backend(args.attn_backend, device)
    notes: list[str] = []
    errors: list[str] = []
    if device.type == "cpu":
        notes.append(f"CPU run{' with small shapes' if args.small else ''}: absolute numbers mean little; "
                     "compare ratios")

    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"glm4v-fast bench: {device_name(device)}, {mode} shapes, {dtype}; measuring peaks ...", flush=True)
    with torch.inference_mode():
        peaks = measure_peaks(device, dtype, args.repeats)
        encoder_rows: list[dict] = []
        kernels_used = attn_used = None
        if not args.kernels_only:
            ours, hf = build_models(config, device, dtype, args.attn_backend, args.kernels, with_hf, args.seed)
            kernels_used, attn_used = ours.resolved()
            for wl in selected:
                print(f"  encoder {wl.name}: {wl.images} item(s), {wl.patches} patches ...", flush=True)
                seed = args.seed + 1 + WORKLOAD_NAMES.index(wl.name)
                encoder_rows.append(run_encoder_workload(wl, ours, hf, config, device, dtype, args.repeats,
                                                         peaks["bf16_tflops"], seed, errors))
            del ours, hf
            if device.type == "cuda":
                torch.cuda.empty_cache()
        kernel_rows: list[dict] = []
        attention_rows: list[dict] = []
        if not args.encoder_only:
            print("  kernel sweep ...", flush=True)
            kernel_rows = run_kernel_sweep(config, mode, dtype, device, args.repeats, peaks["hbm_tbps"], notes,
                                           errors)
            print("  attention sweep ...", flush=True)
            attention_rows = run_attention_sweep(config, mode, dtype, device, args.repeats, notes, errors)

    result = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn", "flash_attn", "flash_attn_3", "flash-attn-3"),
        "transformers": _version("transformers"),
        "date": started.date().isoformat(),
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "command": _command_line(args),
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        "config": dataclasses.asdict(config),
        "kernels_used": kernels_used,
        "attn_backend_used": attn_used,
        "repeats": args.repeats,
        "timing": ("CUDA events, median of --repeats calls after warmup; encoder calls each start on an idle "
                   "stream; kernels run back to back after an L2 flush" if device.type == "cuda" else
                   "perf_counter wall time, median of --repeats calls after warmup"),
        "memory_note": ("peak MiB = torch.cuda.max_memory_allocated during one call minus what was allocated "
                        "before it" if device.type == "cuda" else "peak memory is not measured on CPU"),
        "peaks": peaks,
        "encoder": encoder_rows,
        "kernels": kernel_rows,
        "attention": attention_rows,
        "targets_apply": mode == "full" and device.type == "cuda",
        "notes": notes,
        "errors": errors,
    }
    result["targets"] = evaluate_targets(encoder_rows, kernel_rows)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['date']}-{_slug(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu')}"
    stem += "-small" if args.small else ""
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    result["plot"] = None
    if not args.no_plot:
        try:
            write_plot(result, png_path)
            result["plot"] = png_path.name
        except ImportError:
            notes.append("plot: matplotlib is missing (pip install 'glm4v-fast[plot]'); no PNG written")
    result = _finite(result, errors)
    result["errors"] = errors
    json_path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    print()
    print(format_tables(result))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if result["plot"] else ""))
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm4v_fast.bench", description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"glm4v-fast bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
