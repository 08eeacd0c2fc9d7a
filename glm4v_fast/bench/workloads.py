"""The encoder workloads: batches of (t, h, w) patch grids as the processor emits them, full or scaled down."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from ..config import VisionConfig
from ..packing import split_temporal

PATCH = 14  # pixels per patch side: the grids below are the processor's output for these image sizes

# serving-mix draws its 64 image sizes (height, width in pixels) from these with random.Random(0).choice.
SERVING_MIX_PIXELS = ((224, 224), (336, 336), (448, 448), (448, 672), (672, 896), (1120, 1120))
SERVING_MIX_IMAGES = 64

WORKLOAD_NAMES = ("single-448", "serving-mix", "hires-1120", "hires-1680", "video-448", "huge-image",
                  "huge-image-max")

# One image in one attention segment at the processor's pixel budget. The class default, 11,760,000 pixels,
# counts the temporal factor 2 (spec 5.2), so a large square image becomes 2408x2408: (1, 172, 172), 29,584
# patches (smart_resize(2, 4000, 4000)). At most, the same budget per frame: 3416x3416, (1, 244, 244),
# 59,536 patches (smart_resize(2, 4000, 4000, max_pixels=2 * 11,760,000)), the ~60k single segment.
HUGE_IMAGE_GRID = (1, 172, 172)
HUGE_IMAGE_MAX_GRID = (1, 244, 244)

# The small tower for CPU runs: every code path of the full one (2 layers, 2 heads of 64, a merger),
# at about 1 MFLOP per patch so that thousands of patches take well under a second.
SMALL_CONFIG = {"depth": 2, "hidden_size": 128, "num_heads": 2, "out_hidden_size": 256, "intermediate_size": 512}
SMALL_SCALE = 4  # grid sides (and video temporal length) divided by this in --small mode


@dataclass(frozen=True)
class Workload:
    """A batch for one encoder call: items as (t, h, w) patch grids, exactly as the processor emits them."""

    name: str
    grid: tuple[tuple[int, int, int], ...]
    description: str

    @property
    def images(self) -> int:
        """Items in the call (a video counts once)."""
        return len(self.grid)

    @property
    def patches(self) -> int:
        return sum(t * h * w for t, h, w in self.grid)

    @property
    def seqlens(self) -> list[int]:
        """Attention segment lengths: one per image and one per video temporal slice."""
        return [h * w for t, h, w in self.grid for _ in range(t)]

    def grid_tensor(self) -> torch.Tensor:
        return torch.tensor(self.grid, dtype=torch.int64)

    def hf_grid(self) -> torch.Tensor:
        """The grid transformers' tower is called with: videos split into (1, h, w) rows, as its
        get_video_features does."""
        return split_temporal(self.grid_tensor())

    def grid_counts(self) -> dict[str, int]:
        return {f"{t}x{h}x{w}": n for (t, h, w), n in sorted(Counter(self.grid).items())}

    def pixel_values(self, config: VisionConfig, dtype: torch.dtype, device: torch.device,
                     seed: int) -> torch.Tensor:
        """Random (patches, patch_dim) pixel_values, generated on `device` from a fixed seed."""
        gen = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(self.patches, config.patch_dim, generator=gen, device=device,
                           dtype=torch.float32).to(dtype)


def _shrink(side: int, merge: int) -> int:
    """A grid side divided by SMALL_SCALE, kept a positive multiple of the spatial merge size."""
    return max(merge, side // SMALL_SCALE // merge * merge)


def workloads(small: bool = False, names: list[str] | tuple[str, ...] | None = None,
              merge: int = 2) -> list[Workload]:
    """The benchmark workloads (all, or `names` in the given order); grids scaled down when `small`."""
    rng = random.Random(0)
    mix = [rng.choice(SERVING_MIX_PIXELS) for _ in range(SERVING_MIX_IMAGES)]
    full = {
        "single-448": ([(1, 32, 32)], "one 448x448 image"),
        "serving-mix": ([(1, h // PATCH, w // PATCH) for h, w in mix],
                        f"{SERVING_MIX_IMAGES} images, sizes drawn with random.Random(0).choice from "
                        + ", ".join(f"{h}x{w}" for h, w in SERVING_MIX_PIXELS)),
        "hires-1120": ([(1, 80, 80)] * 8, "8 images of 1120x1120"),
        "hires-1680": ([(1, 120, 120)] * 2, "2 images of 1680x1680"),
        "video-448": ([(16, 32, 32)], "one 32-frame 448x448 video (temporal patch 2)"),
        "huge-image": ([HUGE_IMAGE_GRID], "one 2408x2408 image at the processor's default pixel budget: "
                                          "29,584 patches in one attention segment"),
        "huge-image-max": ([HUGE_IMAGE_MAX_GRID], "one 3416x3416 image, the default budget per frame: 59,536 "
                                                  "patches in one attention segment"),
    }
    names = list(names) if names is not None else list(WORKLOAD_NAMES)
    unknown = [n for n in names if n not in full]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOAD_NAMES)}")
    out = []
    for name in names:
        grid, description = full[name]
        if small:
            grid = [(t if t == 1 else max(1, t // SMALL_SCALE), _shrink(h, merge), _shrink(w, merge))
                    for t, h, w in grid]
            description += f" (grid sides / {SMALL_SCALE})"
        out.append(Workload(name, tuple(grid), description))
    return out


def small_config() -> VisionConfig:
    return VisionConfig(**SMALL_CONFIG)
