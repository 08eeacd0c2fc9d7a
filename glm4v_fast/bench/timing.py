"""Timing, peak memory and the device's own peaks (matmul FLOP/s, copy bandwidth), and the guard that keeps
one failing measurement from losing a run.

The one measuring core of both benchmark trees: `glm4v-fast bench` and the pytest-benchmark runs under bench/
(whose conftest takes the device peaks from `measure_peaks`)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2: each kernel rep starts from cold caches


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
        # The key keeps its historical name whatever the dtype (result files are compared across runs);
        # peak_dtype says what it was measured in (bf16 on a GPU, float32 on a CPU).
        "bf16_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "hbm_tbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e12,
        "peak_dtype": str(dtype).removeprefix("torch."),
        "matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}",
        "copy_bytes": copy_bytes,
        "memory": "HBM (device-to-device copy)" if cuda else "DRAM (host tensor copy), not HBM",
    }


def guard(errors: list[str], label: str, fn: Callable, *args):
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


def ratio(a, b):
    return a / b if a is not None and b else None
