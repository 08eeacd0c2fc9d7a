"""`glm4v-fast bench`: the encoder against transformers, the kernel and attention sweeps, device peaks.

Also ``python -m glm4v_fast.bench``.

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

The package, by concern:

- ``workloads``: the encoder workloads (patch grids) and the small CPU tower;
- ``timing``: timers, peak memory, the device's measured peaks, the per-measurement error guard (also what
  the pytest-benchmark runs under bench/ measure peaks with);
- ``models``: ours and transformers' tower with identical seeded weights;
- ``encoder``: one workload timed side by side;
- ``sweeps``: the kernel sweep and the attention sweep;
- ``report``: targets (stated in docs/design.md §8), tables, plot;
- ``cli``: the command in four steps: arguments (``plan_from_args``), the run (``measure``), the JSON and PNG
  files (``result_record``, ``write_result``), the printed tables (``run_bench`` calls them in order).
"""
from __future__ import annotations

from .cli import DESCRIPTION, add_bench_arguments, device_name, main, run_bench
from .encoder import run_encoder_workload
from .models import build_models, hf_embeddings, import_transformers, max_rel_err, seeded_init_
from .report import (ENCODER_TARGETS, KERNEL_PEAK_FRACTION_TARGET, MAX_REL_ERR_TARGET, evaluate_targets, finite,
                     format_tables, write_plot)
from .sweeps import (ATTN_SEQLENS, ATTN_TOTAL, INTERPRETED_ATTN_SEQLEN, KERNEL_TOKENS, LONG_ATTN_SEQLEN,
                     SDPA_CUDA_KERNELS, attention_backends, kernel_cases, run_attention_sweep, run_kernel_sweep)
from .timing import L2_FLUSH_BYTES, guard, measure_peaks, peak_mib, ratio, synchronize, time_ms, time_pair_ms
from .workloads import (HUGE_IMAGE_GRID, HUGE_IMAGE_MAX_GRID, PATCH, SERVING_MIX_IMAGES, SERVING_MIX_PIXELS,
                        SMALL_CONFIG, SMALL_SCALE, WORKLOAD_NAMES, Workload, small_config, workloads)

__all__ = [
    "ATTN_SEQLENS", "ATTN_TOTAL", "DESCRIPTION", "ENCODER_TARGETS", "HUGE_IMAGE_GRID", "HUGE_IMAGE_MAX_GRID",
    "INTERPRETED_ATTN_SEQLEN", "KERNEL_PEAK_FRACTION_TARGET", "KERNEL_TOKENS", "L2_FLUSH_BYTES", "LONG_ATTN_SEQLEN",
    "MAX_REL_ERR_TARGET", "PATCH", "SDPA_CUDA_KERNELS", "SERVING_MIX_IMAGES", "SERVING_MIX_PIXELS", "SMALL_CONFIG",
    "SMALL_SCALE", "WORKLOAD_NAMES", "Workload", "add_bench_arguments", "attention_backends", "build_models",
    "device_name", "evaluate_targets", "finite", "format_tables", "guard", "hf_embeddings", "import_transformers",
    "kernel_cases", "main", "max_rel_err", "measure_peaks", "peak_mib", "ratio", "run_attention_sweep", "run_bench",
    "run_encoder_workload", "run_kernel_sweep", "seeded_init_", "small_config", "synchronize", "time_ms",
    "time_pair_ms", "write_plot", "workloads",
]
