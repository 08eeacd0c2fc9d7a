"""Checks of the processor's arguments shared by its image and video halves: backend, resampling, mean/std."""
from __future__ import annotations

import math
from typing import Any

from ..validation import is_int

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


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "TORCH_RESAMPLE", "backend_name", "resample_code", "three_floats"]
