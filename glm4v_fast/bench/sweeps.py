"""The kernel sweep (element-wise kernels vs their PyTorch twins and torch.compile) and the attention sweep
(every varlen attention backend over segment lengths)."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from functools import partial

import torch

from .. import attention as attn_dispatch
from ..config import VisionConfig
from ..packing import pack
from .timing import L2_FLUSH_BYTES, guard, time_ms

# Segment lengths for the attention sweep (square grids, so that `pack` builds the batch as the model
# would) and the total tokens packed per call.
ATTN_SEQLENS = {"full": (256, 1024, 4096, 16384, 65536), "small": (64, 256)}
ATTN_TOTAL = {"full": 32768, "small": 1024}
LONG_ATTN_SEQLEN = 16384  # above this a call takes milliseconds: --repeats samples suffice, not 5x
INTERPRETED_ATTN_SEQLEN = 64  # the Triton interpreter runs one program at a time: keep its sweep tiny

# Kernel sweep tokens. Full: one 32k-token packed batch (the size the bandwidth target of docs/design.md §8
# is set for).
# Small: enough rows to leave the per-call overhead behind on a CPU, or a handful under the interpreter.
KERNEL_TOKENS = {"full": 32768, "small": 4096, "interpreted": 64}


def _nbytes(*tensors: torch.Tensor) -> int:
    """Bytes of the elements a view covers (not its whole storage)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def kernel_cases(config: VisionConfig, tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(kernel, shape, ours, twin, args, bytes read + written) for each element-wise kernel of a layer."""
    from .. import kernels as K

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
    from .. import kernels as K

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
        ours_us = guard(errors, f"kernel {name} ours", timed_us, ours, args, ours_reps) if ours_runs else None
        torch_us = guard(errors, f"kernel {name} torch twin", timed_us, twin, args)
        # Compile failures (no C++ toolchain for Inductor on CPU, an unsupported op ...) become a null
        # with a note, not an error; the first (warmup) call is the one that compiles.
        compile_us = guard(notes, f"kernel {name} torch.compile", timed_us, torch.compile(twin, dynamic=False),
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
# SDPA pinned to each of its CUDA kernels (torch.nn.attention.SDPBackend names). The sweep's segments all have
# one length, so the "sdpa" dispatch makes one dense batched call: what these kernels take.
SDPA_CUDA_KERNELS = (("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-flash", "FLASH_ATTENTION"),
                     ("sdpa-efficient", "EFFICIENT_ATTENTION"))


def attention_backends(device: torch.device) -> list[tuple[str, str, Callable[[], contextlib.AbstractContextManager]]]:
    """(label, dispatch backend, context to run it in) for every attention variant the sweep times on `device`:
    the dispatch's available backends, and on CUDA also SDPA restricted to each of its kernels."""
    variants = [(b, b, contextlib.nullcontext) for b in attn_dispatch.available_backends(device)]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        variants += [(label, "sdpa", partial(sdpa_kernel, getattr(SDPBackend, kernel)))
                     for label, kernel in SDPA_CUDA_KERNELS]
    return variants


def run_attention_sweep(config: VisionConfig, mode: str, dtype: torch.dtype, device: torch.device,
                        repeats: int, notes: list[str], errors: list[str]) -> list[dict]:
    """varlen attention per backend x segment length, config.num_heads x config.head_dim, packed segments."""
    h, d = config.num_heads, config.head_dim
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for label, backend, context in attention_backends(device):
        interpreted = backend == "triton" and not cuda
        pinned = label != backend
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
            # As in the kernel sweep; long segments take milliseconds per call.
            reps = repeats if interpreted or seqlen > LONG_ATTN_SEQLEN else repeats * 5
            failures: list[str] = []
            with context():
                ms = guard(failures, f"attention {label} L={seqlen}", time_ms, call, device, reps, 2, False)
            for failure in failures:
                # A pinned SDPA kernel that does not take this dtype or shape is a fact to note, not a failure.
                (notes if pinned and "No available kernel" in failure else errors).append(failure)
            fl = 4 * seqlen * seqlen * h * d * segments
            rows.append({"backend": label, "seqlen": seqlen, "segments": segments, "heads": h, "head_dim": d,
                         "ms": ms, "tflops": fl / (ms * 1e-3) / 1e12 if ms else None,
                         "interpreted": interpreted})
    if any(r["interpreted"] for r in rows):
        notes.append("attention: the triton backend ran in the CPU interpreter (tiny; not a speed)")
    return rows
