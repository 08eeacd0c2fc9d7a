"""Image preprocessing speed: glm4v-fast's two backends against the transformers processor each one equals.

    python bench/processor_backends.py --out bench/results/processor-backends.json [--photos web] [--repeats 7] [--load 1]

Needs transformers and torchvision (transformers' default processor is its torchvision one): run it in the
environment of `make test-torchvision` (.venv-torchvision). The inputs are realistic photos at common camera
sizes (natural-looking pictures, JPEG round trip), decoded to PIL images first (as vLLM and servers hand them
to a processor), so decoding is not timed. Every call of every processor is checked against transformers'
output first (bit for bit). Then each repeat calls the four processors once each, in an order that rotates
from repeat to repeat (side by side: the machine's load hits all four alike); the JSON has every time, the
median and range per processor, and the ratios of medians.

``--load N`` starts N processes running a GLM-4V vision tower forward in a loop beside the timing (torch's
default threads each: what a server preprocessing beside a running model sees), and reports the same.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: (width, height) of the photos of each set. "camera": phone photos (12 MP, 8 MP) with screenshots and web images,
#: the two largest shrunk to the pixel budget; "web": what chat users upload (0.3-2 MP), resized only to
#: multiples of 28.
PHOTO_SETS = {
    "camera": [(4032, 3024), (3264, 2448), (1920, 1080), (1600, 1200), (1280, 720), (1024, 768), (640, 480),
               (800, 1200)],
    "web": [(1280, 960), (1024, 768), (800, 600), (1920, 1080), (640, 480), (1080, 1350), (750, 1000), (1200, 800)],
}
SIZES = PHOTO_SETS["camera"]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A natural-looking picture: shading, soft and sharp edges, texture, noise, JPEG blocks (decoded)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    sky = np.stack([110 + 90 * np.cos(3 * yy + seed), 130 + 70 * yy, 210 - 100 * yy + 30 * xx], -1)
    image = Image.fromarray(sky.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * (width, height)
        box = [x0, y0, x0 + rng.uniform(0.05, 0.5) * width, y0 + rng.uniform(0.05, 0.5) * height]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 2.0))))
    array = np.asarray(image).astype(np.float32) + rng.normal(0, 4, (height, width, 1)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _model_loop(stop) -> None:
    """A GLM-4V vision tower (a small one, random weights) encoding 1024 patches, over and over."""
    import torch

    import glm4v_fast as gf

    config = gf.VisionConfig(depth=4, hidden_size=512, num_heads=8, intermediate_size=1536, out_hidden_size=512)
    model = gf.VisionModel(config, kernels="torch", attn_backend="sdpa").eval()
    pixels = torch.randn(1024, 3 * 2 * 14 * 14)
    grid = torch.tensor([[1, 32, 32]])
    with torch.inference_mode():
        while not stop.is_set():
            model(pixels, grid)


def _versions() -> dict:
    import torch
    import torchvision
    import transformers

    import glm4v_fast

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "transformers": transformers.__version__, "pillow": Image.__version__, "numpy": np.__version__,
            "glm4v_fast": glm4v_fast.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                    platform.processor())
    except (OSError, subprocess.SubprocessError):
        return platform.processor()


def measure(images: list, repeats: int) -> dict:
    from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from glm4v_fast.processing import VisionProcessor

    processors = {
        "glm4v_fast_torchvision": VisionProcessor(backend="torchvision"),
        "transformers_torchvision": Glm4vImageProcessor(),
        "glm4v_fast_pil": VisionProcessor(backend="pil"),
        "transformers_pil": Glm4vImageProcessorPil(),
    }
    calls = {name: (lambda p=p: p(images=images, return_tensors="np")) for name, p in processors.items()}
    outputs = {name: call() for name, call in calls.items()}  # also the warm-up
    for ours, theirs in (("glm4v_fast_torchvision", "transformers_torchvision"), ("glm4v_fast_pil", "transformers_pil")):
        np.testing.assert_array_equal(outputs[ours]["pixel_values"], np.asarray(outputs[theirs]["pixel_values"]))
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    summary = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "times_s": t}
               for name, t in times.items()}
    ratios = {
        "torchvision_backend_vs_transformers_default": summary["transformers_torchvision"]["median_s"]
        / summary["glm4v_fast_torchvision"]["median_s"],
        "pil_backend_vs_transformers_pil": summary["transformers_pil"]["median_s"]
        / summary["glm4v_fast_pil"]["median_s"],
        "torchvision_backend_vs_transformers_pil": summary["transformers_pil"]["median_s"]
        / summary["glm4v_fast_torchvision"]["median_s"],
    }
    return {"processors": summary, "speedup_of_medians": {k: round(v, 2) for k, v in ratios.items()},
            "patches": int(outputs["glm4v_fast_torchvision"]["pixel_values"].shape[0])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--load", type=int, default=0, help="model processes running beside the timing")
    parser.add_argument("--photos", choices=sorted(PHOTO_SETS), default="camera", help="which photo sizes")
    parser.add_argument("--out", help="write the JSON here (printed either way)")
    args = parser.parse_args()
    sizes = PHOTO_SETS[args.photos]
    images = [photo(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    stop = multiprocessing.Event()
    loads = [multiprocessing.Process(target=_model_loop, args=(stop,), daemon=True) for _ in range(args.load)]
    for p in loads:
        p.start()
    if loads:
        time.sleep(5)  # the models are built and running
    load_before = os.getloadavg()
    try:
        result = measure(images, args.repeats)
    finally:
        stop.set()
        for p in loads:
            p.join(timeout=30)
    report = {
        "benchmark": "image preprocessing, glm4v-fast backends vs transformers",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "cpu": _cpu(), "cpu_count": os.cpu_count(), "versions": _versions(),
        "load_processes": args.load, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "photos": args.photos, "images": [{"width": w, "height": h} for w, h in sizes],
        "input_megapixels": round(sum(w * h for w, h in sizes) / 1e6, 2), "repeats": args.repeats, **result,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(json.dumps({k: report[k] for k in ("load_processes", "loadavg_before", "loadavg_after",
                                               "speedup_of_medians")}, indent=1))
    for name, s in report["processors"].items():
        print(f"{name:26s} median {s['median_s'] * 1000:8.1f} ms  range {s['min_s'] * 1000:.1f}-{s['max_s'] * 1000:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
