"""Image processor throughput: glm4v_fast.VisionProcessor vs the transformers processor of the same backend
(``pil``: Glm4vImageProcessorPil; ``torchvision``, the default: Glm4vImageProcessor, where torchvision is installed).

Both get the same batch of synthetic 0.3-2 MP photos (as PIL images, the common case) and must give identical
pixel_values and grids. pytest-benchmark times ours; transformers is timed in the same run with the same number
of rounds (best of N), and ``extra_info["speedup_vs_transformers"]`` records transformers' time / ours.

Run: ``python -m pytest -q bench/test_bench_processor.py``. bench/processor_backends.py compares all four on
camera-sized photos, idle and beside a running model.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from glm4v_fast.processing import VisionProcessor

SIZES = [(480, 640), (768, 1024), (1080, 1440), (1200, 1600)]  # 0.3, 0.8, 1.6, 1.9 MP
ROUNDS = 3


def _photos() -> list[Image.Image]:
    """Smooth colour fields with edges and mild noise, like downscaled photos (fixed seed)."""
    rng = np.random.default_rng(0)
    images = []
    for h, w in SIZES:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        rgb = np.stack([128 + 100 * np.sin(xx / 57 + yy / 91), 128 + 90 * np.cos(yy / 43),
                        (xx * 0.2 + yy * 0.1) % 256], -1)
        rgb[h // 3: h // 2, w // 4: w // 2] = (220, 40, 40)  # a sharp-edged block
        rgb += rng.normal(0, 6, rgb.shape)
        images.append(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)))
    return images


def _best_time(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_processor_vs_transformers(benchmark, backend):
    pytest.importorskip("transformers")
    if backend == "torchvision":
        pytest.importorskip("torchvision", reason="transformers' torchvision processor needs torchvision")
        from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor as HF
    else:
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil as HF

    images = _photos()
    ours, hf = VisionProcessor(backend=backend), HF()

    out = ours(images=images, return_tensors="np")
    ref = hf(images=images, return_tensors="np")
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
    assert np.abs(out["pixel_values"] - ref["pixel_values"]).max() <= 1e-6

    hf_time = _best_time(lambda: hf(images=images, return_tensors="np"), ROUNDS)
    benchmark.pedantic(lambda: ours(images=images, return_tensors="np"), rounds=ROUNDS, iterations=1,
                       warmup_rounds=1)
    ours_time = benchmark.stats.stats.min
    megapixels = sum(h * w for h, w in SIZES) / 1e6
    benchmark.extra_info.update({
        "images": len(images),
        "input_megapixels": round(megapixels, 2),
        "patches": int(out["pixel_values"].shape[0]),
        "transformers_s": round(hf_time, 4),
        "glm4v_fast_s": round(ours_time, 4),
        "speedup_vs_transformers": round(hf_time / ours_time, 2),
        "cpu_count": os.cpu_count(),
        "num_workers": ours.num_workers,
    })
