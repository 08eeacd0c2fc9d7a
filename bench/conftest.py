"""Shared benchmark helpers: device choice, measured device peaks, and metric recording.

Without a GPU the Triton kernels run on CPU tensors through the interpreter; TRITON_INTERPRET must be set
before triton is first imported, so it is decided here, at collection (as tests/conftest.py does).

Peaks are measured once per session on the device itself (a large device-to-device copy for bandwidth, a
large bf16 matmul for tensor-core throughput), so "fraction of peak" means fraction of what this machine
actually sustains, not of a datasheet number. On the CPU no peak is recorded; compare variants by ratio.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_RESULTS: dict[tuple[str, str], float] = {}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cuda_time(fn, iters: int) -> float:
    """Seconds per call of fn, timed with CUDA events over `iters` back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


@pytest.fixture(scope="session")
def peak_bandwidth(bench_device) -> float | None:
    """Measured device memory bandwidth in bytes/s (copy: read + write), or None on CPU."""
    if bench_device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=bench_device)   # 1 GiB: far beyond L2
    dst = torch.empty_like(src)
    best = min(_cuda_time(lambda: dst.copy_(src), 10) for _ in range(3))
    return 2 * src.numel() / best


@pytest.fixture(scope="session")
def peak_flops(bench_device) -> float | None:
    """Measured dense bf16 matmul throughput in FLOP/s, or None on CPU."""
    if bench_device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=bench_device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=bench_device, dtype=torch.bfloat16)
    best = min(_cuda_time(lambda: a @ b, 10) for _ in range(3))
    return 2 * n**3 / best


@pytest.fixture
def run_bench(benchmark, bench_device, peak_bandwidth, peak_flops):
    """Time fn with pytest-benchmark and record throughput metrics in benchmark.extra_info.

    On CUDA each timed round runs fn `inner` times and then synchronises, so the sync cost is amortised;
    pytest-benchmark's stats are per round, the extra_info metrics per call. Records tokens/s, GB/s (bytes
    read + written per call / time), TFLOP/s when `flops` is given, the fraction of the measured device
    peak (GPU), and the speed-up over the eager PyTorch twin of the same op when that ran first.
    """

    def run(fn, *, op: str, variant: str, tokens: int, bytes_moved: int, flops: float | None = None,
            rounds: int | None = None, inner: int | None = None):
        cuda = bench_device.type == "cuda"
        inner = inner or (20 if cuda else 1)
        rounds = rounds or (10 if cuda else 3)

        def timed():
            for _ in range(inner):
                fn()
            if cuda:
                torch.cuda.synchronize()

        timed()  # compile / autotune / first-launch costs stay out of the measurement
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        seconds = benchmark.stats.stats.median / inner
        info = benchmark.extra_info
        info.update(op=op, variant=variant, device=str(torch.cuda.get_device_name() if cuda else "cpu"),
                    torch=torch.__version__, triton=_triton_version(), tokens=tokens, seconds_per_call=seconds,
                    tokens_per_s=tokens / seconds, gb_per_s=bytes_moved / seconds / 1e9)
        if flops is not None:
            info["tflop_per_s"] = flops / seconds / 1e12
        if cuda and peak_bandwidth:
            info["peak_gb_per_s"] = peak_bandwidth / 1e9
            info["fraction_of_peak_bandwidth"] = bytes_moved / seconds / peak_bandwidth
        if cuda and flops is not None and peak_flops:
            info["peak_tflop_per_s"] = peak_flops / 1e12
            info["fraction_of_peak_flops"] = flops / seconds / peak_flops
        if not cuda:
            info["note"] = "CPU: Triton runs in the interpreter; compare ratios only"
        _RESULTS[(op, variant)] = seconds
        eager = _RESULTS.get((op, "torch"))
        if eager is not None and variant != "torch":
            info["speedup_vs_torch"] = eager / seconds
        return seconds

    return run
