"""The whole encoder: glm4v-fast's VisionModel vs transformers' Glm4vVisionModel (sdpa), pytest-benchmark.

Both towers get the same seeded weights (transformers' state_dict loaded into ours), the same random
pixel_values and run on the same device in the same session, one workload at a time (transformers first,
then ours, in one benchmark group per workload so they sit side by side). Workloads, models, timing
helpers and the FLOP model are glm4v_fast.bench's, the ones `glm4v-fast bench` uses.

GPU: the GLM-4.1V tower in bf16 on the real workloads. CPU: the small tower in fp32 on the workloads'
grids scaled down by 4 (a few minutes on 2 cores); only the ratios mean anything there.

extra_info of each run: patches, tokens/s, TFLOP/s by the FLOP model (docs/design.md §6), the fraction of the
device's measured matmul peak, and, for ours, the speed-up over transformers and the max relative
difference of the outputs. Run: ``python -m pytest -q bench/test_bench_encoder.py``
(``--benchmark-json=...`` to keep the numbers).
"""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from glm4v_fast import bench as gb
from glm4v_fast.config import VisionConfig
from glm4v_fast.packing import flops

from _tower_setup import DEVICE, DTYPE, GPU, ROUNDS, SEED, SMALL


# transformers runs first in each workload so that ours can report the speed-up over it.
CASES = [(name, side) for name in gb.WORKLOAD_NAMES for side in ("transformers", "glm4v_fast")]
_SECONDS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def encoders(device_peaks):
    """Both towers with identical weights, and the device's measured matmul/copy peaks (conftest)."""
    config = gb.small_config() if SMALL else VisionConfig()
    with_hf = importlib.util.find_spec("transformers") is not None
    with torch.inference_mode():
        ours, hf = gb.build_models(config, DEVICE, DTYPE, with_hf=with_hf, seed=SEED)
    yield SimpleNamespace(config=config, ours=ours, hf=hf, peaks=device_peaks)
    del ours, hf
    if GPU:
        torch.cuda.empty_cache()


def _call(fn):
    """One synchronised call: pytest-benchmark's wall clock then covers the device work too."""
    def run():
        with torch.inference_mode():
            out = fn()
        gb.synchronize(DEVICE)
        return out
    return run


@pytest.mark.parametrize("workload,side", CASES, ids=[f"{w}-{s}" for w, s in CASES])
def test_encoder(benchmark, encoders, workload, side):
    if side == "transformers" and encoders.hf is None:
        pytest.skip("transformers is not installed (pip install 'glm4v-fast[test]')")
    config = encoders.config
    (wl,) = gb.workloads(SMALL, [workload])
    pixel_values = wl.pixel_values(config, DTYPE, DEVICE, seed=SEED + 1 + gb.WORKLOAD_NAMES.index(workload))
    if side == "glm4v_fast":
        grid = wl.grid_tensor()
        run = _call(lambda: encoders.ours(pixel_values, grid))
    else:
        hf_grid = wl.hf_grid().to(DEVICE)          # videos split into (1, h, w) rows, as transformers does
        run = _call(lambda: gb.hf_embeddings(encoders.hf(pixel_values, hf_grid)))

    benchmark.group = f"encoder {workload}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    seconds = benchmark.stats.stats.median
    _SECONDS[(workload, side)] = seconds

    model_flops = flops(wl.seqlens, config)
    peak = encoders.peaks["bf16_tflops"]
    info = benchmark.extra_info
    info.update(
        side=side, workload=wl.name, description=wl.description, device=gb.device_name(DEVICE),
        dtype=str(DTYPE).removeprefix("torch."), mode="small" if SMALL else "full", images=wl.images,
        patches=wl.patches, seconds=seconds, tokens_per_s=wl.patches / seconds,
        tflops=model_flops / seconds / 1e12, peak_tflops=peak, peak_dtype=encoders.peaks["peak_dtype"],
        mfu=model_flops / seconds / 1e12 / peak,
    )
    if side == "glm4v_fast":
        hf_seconds = _SECONDS.get((workload, "transformers"))
        if hf_seconds is not None:
            info["speedup_vs_transformers"] = hf_seconds / seconds
        if encoders.hf is not None:
            with torch.inference_mode():
                ref = gb.hf_embeddings(encoders.hf(pixel_values, wl.hf_grid().to(DEVICE)))
                info["max_rel_err_vs_transformers"] = gb.max_rel_err(run(), ref)
    if not GPU:
        info["note"] = "CPU, small tower and grids / 4: compare ratios only"
