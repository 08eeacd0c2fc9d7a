"""Generate the example images in glm4v_fast/example_images/ (procedural, fixed seed, each well under 60 KB).

Run from the repository root: ``python examples/make_examples.py``. The outputs are committed, so the CLI demo and
the tests do not need to run this; it documents how they were made and regenerates them identically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Package data, so that `glm4v-fast demo` finds them after a normal install.
OUT = Path(__file__).resolve().parents[1] / "glm4v_fast" / "example_images"


def sunset(width: int = 320, height: int = 240) -> Image.Image:
    """A landscape JPEG: sky gradient, a sun, and a noisy hill silhouette."""
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    top, bottom = np.array([40, 60, 140]), np.array([250, 150, 70])
    sky = (top * (1 - y) + bottom * y) * np.ones((1, width, 1))
    image = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((200, 90, 260, 150), fill=(255, 220, 120))
    rng = np.random.default_rng(0)
    ridge = height * 0.7 + np.cumsum(rng.normal(0, 2.0, width))
    draw.polygon([(0, height)] + [(x, float(r)) for x, r in enumerate(ridge)] + [(width, height)], fill=(30, 50, 35))
    return image


def shapes(width: int = 224, height: int = 336) -> Image.Image:
    """A portrait PNG of flat-coloured shapes and text-like bars (sharp edges)."""
    image = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 120, 120), fill=(200, 40, 40))
    draw.ellipse((110, 90, 210, 190), fill=(40, 120, 200))
    draw.polygon([(30, 300), (110, 180), (190, 300)], fill=(60, 170, 80))
    for row in range(6):
        draw.rectangle((20, 200 + row * 12, 20 + 30 + (row * 37) % 150, 206 + row * 12), fill=(20, 20, 20))
    return image


def logo_rgba(size: int = 160) -> Image.Image:
    """A square PNG with an alpha channel: a soft radial disc with a transparent background."""
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(xx - size / 2, yy - size / 2) / (size / 2)
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 0] = (255 * (1 - r.clip(0, 1))).astype(np.uint8)
    rgba[..., 1] = (128 + 100 * np.sin(xx / 9.0)).astype(np.uint8)
    rgba[..., 2] = (128 + 100 * np.cos(yy / 7.0)).astype(np.uint8)
    rgba[..., 3] = (255 * (1 - r).clip(0, 1) ** 0.5).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


def panorama(width: int = 480, height: int = 96) -> Image.Image:
    """A wide JPEG (5:1) of smoothed noise, like a texture strip."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    sunset().save(OUT / "sunset_320x240.jpg", quality=85)
    shapes().save(OUT / "shapes_224x336.png", optimize=True)
    logo_rgba().save(OUT / "logo_rgba_160.png", optimize=True)
    panorama().save(OUT / "panorama_480x96.jpg", quality=85)
    for path in sorted(OUT.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
