"""Time the full-size tower in float32 and bfloat16 on one image, and compare their embeddings token by token.

    python examples/compare_dtypes.py [--checkpoint DIR] [--device cpu] [--image PATH] [--repeats 2]

Without --checkpoint the tower has GLM-4.1V's architecture and seeded random weights. The image (default: the
demo's sunset photo) is resized to 448x448: 1024 patches, 256 embeddings. Each dtype runs --repeats forwards and
reports the fastest; the agreement is the cosine of each bfloat16 embedding with its float32 one.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

import glm4v_fast as gf
from glm4v_fast.precision import cpu_native_dtypes

SUNSET = Path(gf.__file__).resolve().parent / "example_images" / "sunset_320x240.jpg"


def time_forward(model: gf.VisionModel, pixel_values: torch.Tensor, grid: torch.Tensor, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model(pixel_values.to(model.device, model.dtype), grid)
        if out.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out.float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a GLM-4V checkpoint dir (default: random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image", default=str(SUNSET))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with Image.open(args.image) as im:
        photo = im.convert("RGB").resize((448, 448), Image.BICUBIC)
    _, model, processor = gf.create_glm4v_vision_encoder(checkpoint=args.checkpoint, device=args.device,
                                                         dtype=torch.float32)
    batch = processor(images=[photo])
    pixel_values, grid = batch["pixel_values"], batch["image_grid_thw"]
    native = ", ".join(str(d).removeprefix("torch.") for d in sorted(cpu_native_dtypes(), key=str)) or "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, CPU-native reduced "
          f"dtypes: {native}; image {args.image} at 448x448: grid {grid[0].tolist()}, {pixel_values.shape[0]} patches")

    seconds32, out32 = time_forward(model, pixel_values, grid, args.repeats)
    print(f"float32:  {seconds32:.2f} s", flush=True)
    model = model.to(torch.bfloat16)        # in place: one copy of the weights at a time
    seconds16, out16 = time_forward(model, pixel_values, grid, args.repeats)
    print(f"bfloat16: {seconds16:.2f} s ({seconds32 / seconds16:.2f}x float32's speed)")
    cosine = torch.nn.functional.cosine_similarity(out16.double(), out32.double(), dim=-1)
    rel = ((out16 - out32).abs().max() / out32.abs().max()).item()
    print(f"bfloat16 vs float32, per-token cosine over {cosine.numel()} embeddings: min {cosine.min().item():.5f}, "
          f"mean {cosine.mean().item():.5f}; max relative error {rel:.2e}")


if __name__ == "__main__":
    main()
