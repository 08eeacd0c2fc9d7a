"""The processor's arguments shared by its image and video halves: backend, resampling, mean/std, and the options
both of transformers' GLM-4V processors take (:class:`PixelOptions`), checked once."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..imageio import DEFAULT_MAX_IMAGE_PIXELS
from ..validation import boolean, is_int, positive_int, positive_number
from .sizing import check_size_dict

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The image backends, named as transformers names them. ``"torch"`` is an older name of ``"torchvision"``.
BACKENDS = ("torchvision", "pil")
_BACKEND_ALIASES = {"torch": "torchvision"}
#: transformers' default: ``AutoImageProcessor`` picks the torchvision processor whenever torchvision is installed,
#: as vLLM and SGLang do.
DEFAULT_BACKEND = "torchvision"

_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
#: PIL resampling codes the torch resize supports (nearest, bilinear, bicubic).
TORCH_RESAMPLE = (0, 2, 3)


def backend_name(value: Any) -> str:
    """``value`` as one of :data:`BACKENDS` (None: the default)."""
    if value is None:
        return DEFAULT_BACKEND
    name = _BACKEND_ALIASES.get(value, value) if isinstance(value, str) else value
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'torchvision' (alias 'torch') or 'pil', got {value!r}")
    return name


def resample_code(value: Any) -> int:
    if isinstance(value, str) and value.lower() in _RESAMPLE_NAMES:
        return _RESAMPLE_NAMES[value.lower()]
    if is_int(value) and 0 <= int(value) <= 5:
        return int(value)
    raise ValueError(f"resample must be a PIL resampling code 0-5 or one of {sorted(_RESAMPLE_NAMES)}, got {value!r}")


def three_floats(value: Any, name: str, positive: bool) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or 3 numbers, got {value!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
        raise ValueError(f"{name} must be 3 finite{' positive' if positive else ''} numbers, got {value!r}")
    return values  # type: ignore[return-value]


class PixelOptions:
    """The options transformers' GLM-4V image and video processors both take, with their defaults: the pixel
    budget (``size``, or ``min_pixels``/``max_pixels`` overriding its two entries), resampling, rescale and
    normalize, RGB conversion, patch geometry, and the decompression-bomb limit (``max_image_pixels``; None: none).
    Subclasses name their budget's default and how errors call it."""

    DEFAULT_SIZE: Mapping[str, int]
    SIZE_NAME: str

    def __init__(self, size: Mapping[str, int] | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, resample: int | str = 3, do_resize: bool = True,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
                 do_convert_rgb: bool = True, patch_size: int = 14, temporal_patch_size: int = 2,
                 merge_size: int = 2, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        size = dict(check_size_dict(size if size is not None else self.DEFAULT_SIZE, self.SIZE_NAME))
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        self.size = check_size_dict(size, self.SIZE_NAME)
        self.resample = resample_code(resample)
        self.do_resize, self.do_rescale = boolean(do_resize, "do_resize"), boolean(do_rescale, "do_rescale")
        self.do_normalize = boolean(do_normalize, "do_normalize")
        self.do_convert_rgb = boolean(do_convert_rgb, "do_convert_rgb")
        self.rescale_factor = positive_number(rescale_factor, "rescale_factor")
        self.image_mean = three_floats(image_mean, "image_mean", positive=False)
        self.image_std = three_floats(image_std, "image_std", positive=True)
        self.patch_size = positive_int(patch_size, "patch_size")
        self.temporal_patch_size = positive_int(temporal_patch_size, "temporal_patch_size")
        self.merge_size = positive_int(merge_size, "merge_size")
        self.max_image_pixels = None if max_image_pixels is None else positive_int(max_image_pixels,
                                                                                   "max_image_pixels")

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def options_dict(self) -> dict[str, Any]:
        """These options under transformers' config keys."""
        return {
            "size": dict(self.size),
            "resample": self.resample,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "PixelOptions", "TORCH_RESAMPLE",
           "backend_name", "resample_code", "three_floats"]
