"""Shared benchmark fixtures: the device, its measured peaks, and metric recording.

Without a GPU the Triton kernels run on CPU tensors through the interpreter; TRITON_INTERPRET must be set
before triton is first imported, so it is decided here, at collection (as tests/conftest.py does).

Peaks are measured once per session on the device itself by glm4v_fast.bench's timing core (a large
device-to-device copy for bandwidth, a large matmul for throughput), so "fraction of peak" means fraction of
what this machine actually sustains, not of a datasheet number. Fractions of peak are recorded on a GPU only;
on the CPU compare variants by ratio.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from glm4v_fast import bench as gb  # noqa: E402  (after TRITON_INTERPRET is decided)
from _tower_setup import DEVICE, DTYPE, ROUNDS  # noqa: E402

_RESULTS: dict[tuple[str, str], float] = {}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def device_peaks() -> dict:
    """The device's measured matmul throughput and copy bandwidth, once per session, by the same code as
    `glm4v-fast bench` (glm4v_fast.bench.measure_peaks), in the dtype the whole-tower runs use."""
    with torch.inference_mode():
        return gb.measure_peaks(DEVICE, DTYPE, repeats=ROUNDS)


@pytest.fixture
def run_bench(benchmark, bench_device, device_peaks):
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
            gb.synchronize(bench_device)

        timed()  # compile / autotune / first-launch costs stay out of the measurement
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        seconds = benchmark.stats.stats.median / inner
        info = benchmark.extra_info
        info.update(op=op, variant=variant, device=gb.device_name(bench_device),
                    torch=torch.__version__, triton=_triton_version(), tokens=tokens, seconds_per_call=seconds,
                    tokens_per_s=tokens / seconds, gb_per_s=bytes_moved / seconds / 1e9)
        if flops is not None:
            info["tflop_per_s"] = flops / seconds / 1e12
        if cuda:
            peak_bandwidth = device_peaks["hbm_tbps"] * 1e12        # bytes/s, read + written
            info["peak_gb_per_s"] = peak_bandwidth / 1e9
            info["fraction_of_peak_bandwidth"] = bytes_moved / seconds / peak_bandwidth
        if cuda and flops is not None:
            peak_flops = device_peaks["bf16_tflops"] * 1e12
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
