"""How big GLM-4V makes an image or a clip: ``smart_resize`` and the pixel budgets it works within."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..validation import positive_int

#: ``Glm4vImageProcessor`` class defaults: total-pixel budgets, not edge lengths (docs/reference.md §5.1).
DEFAULT_IMAGE_SIZE = {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 15000}
#: ``Glm4vVideoProcessor`` defaults: a whole-clip budget (docs/reference.md §6.1).
DEFAULT_VIDEO_SIZE = {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 2 * 30000}


def smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 28,
                 min_pixels: int = DEFAULT_IMAGE_SIZE["shortest_edge"],
                 max_pixels: int = DEFAULT_IMAGE_SIZE["longest_edge"]) -> tuple[int, int]:
    """The (height, width) GLM-4V resizes an image or clip to (docs/reference.md §5.2, transformers 5.x).

    Both sides become multiples of ``factor`` (patch_size * merge_size), the aspect ratio is kept as well as
    rounding allows, and ``num_frames * h * w`` (rounded to whole temporal patches) lands in
    [min_pixels, max_pixels]. Images use ``num_frames = temporal_factor``, so the temporal factor is inside the
    budget. Sides under ``factor`` are first scaled up (transformers 4.x raised instead).

    The default budget is the ``Glm4vImageProcessor`` class default (12544, 11760000); transformers' free
    function defaults to max_pixels=9633792, the value released checkpoints are reported to use.

    Raises:
        ValueError: ``num_frames < temporal_factor``, non-positive sizes, or an aspect ratio over 200.
    """
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width),
                        ("temporal_factor", temporal_factor), ("factor", factor)):
        positive_int(value, name)
    if num_frames < temporal_factor:
        raise ValueError(f"num_frames={num_frames} must be at least temporal_factor={temporal_factor}")
    given = (height, width)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    # Checked after the upscale, as transformers does; the message gives the size the caller passed.
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {ratio:g} for a {given[1]}x{given[0]} "
                         "(width x height) input")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_size_dict(size: Any, name: str) -> dict[str, int]:
    if not isinstance(size, Mapping) or "shortest_edge" not in size or "longest_edge" not in size:
        raise ValueError(f"{name} must be a dict with 'shortest_edge' and 'longest_edge' (pixel budgets), got {size!r}")
    lo = positive_int(size["shortest_edge"], f"{name}['shortest_edge']")
    hi = positive_int(size["longest_edge"], f"{name}['longest_edge']")
    if lo > hi:
        raise ValueError(f"{name}: shortest_edge={lo} is larger than longest_edge={hi}")
    return {"shortest_edge": int(lo), "longest_edge": int(hi)}


__all__ = ["smart_resize", "check_size_dict", "DEFAULT_IMAGE_SIZE", "DEFAULT_VIDEO_SIZE"]
