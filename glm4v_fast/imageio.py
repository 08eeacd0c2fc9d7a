"""Image loading and validation: every accepted input becomes an RGB uint8 (H, W, 3) numpy array.

The conversions reproduce what Hugging Face transformers' PIL-backend image processor does to each input type
before it resizes (so that the processor's output matches it bit for bit), with one deliberate difference for
floating-point inputs, described in :func:`to_rgb_uint8`.

Every bad input ends in a ``ValueError`` (``FileNotFoundError`` for a missing path, ``TypeError`` never) whose
message names the problem, raised here rather than deep inside PIL or numpy.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image

#: PIL's own hard limit (``2 * Image.MAX_IMAGE_PIXELS`` with the default setting): beyond this many pixels PIL
#: raises ``DecompressionBombError``. Used as the default of ``VisionProcessor.max_image_pixels``.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

# Image.open reads the global Image.MAX_IMAGE_PIXELS; when a caller raises our limit above PIL's we lift PIL's
# check for the duration of one open, under this lock, and enforce our own limit instead.
_PIL_LIMIT_LOCK = threading.Lock()

#: How to raise the limit, appended to every pixel-limit error.
RAISE_LIMIT_HINT = ("To allow it, raise the limit: max_image_pixels= of VisionProcessor or "
                    "create_glm4v_vision_encoder (None: no limit), or --max-image-pixels N of glm4v-fast encode and serve")

# Errors PIL raises for files it cannot parse or decode (truncated data, bad headers, broken compressed streams).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, MemoryError)


def check_pixel_count(width: int, height: int, max_image_pixels: int | None, what: str) -> None:
    """Refuse empty images and ones over the decompression-bomb limit (images and video frames alike)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} is empty: size {width}x{height}")
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ValueError(
            f"{what} has {width * height} pixels ({width}x{height}), more than max_image_pixels="
            f"{max_image_pixels}; refusing a possible decompression bomb. {RAISE_LIMIT_HINT}"
        )


def load_image(path: str | os.PathLike, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image file.

    The pixel-count limit is checked from the header before decoding. ``Image.load()`` forces the whole file to be
    decoded here, so a truncated or corrupt file fails now with a ``ValueError`` naming the file, not later.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"image path is a directory, not a file: {path!r}")
    pil_limit = Image.MAX_IMAGE_PIXELS
    lift_pil_limit = pil_limit is not None and (max_image_pixels is None or max_image_pixels > 2 * pil_limit)
    try:
        with warnings.catch_warnings():
            # Our own limit replaces PIL's warning (which would otherwise fire at half of PIL's error threshold).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if lift_pil_limit:
                with _PIL_LIMIT_LOCK:
                    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                    try:
                        image = Image.open(path)
                    finally:
                        Image.MAX_IMAGE_PIXELS = saved
            else:
                image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image file {path!r} is too large (decompression bomb): {exc}. {RAISE_LIMIT_HINT}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ValueError(f"cannot identify image file {path!r}: not an image or an unsupported format") from exc
    except _DECODE_ERRORS as exc:
        raise ValueError(f"cannot open image file {path!r}: {exc}") from exc
    check_pixel_count(image.width, image.height, max_image_pixels, f"image file {path!r}")
    _force_decode(image, f"image file {path!r}")
    return image


def _force_decode(image: Image.Image, what: str) -> None:
    """Decode a lazily opened PIL image now, turning PIL's decode errors into ValueError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{what} is too large (decompression bomb): {exc}. {RAISE_LIMIT_HINT}") from exc
    except _DECODE_ERRORS as exc:
        raise ValueError(f"{what} is corrupt or truncated and cannot be decoded: {exc}") from exc


def pil_to_rgb_uint8(image: Image.Image, do_convert_rgb: bool = True) -> np.ndarray:
    """A PIL image of any mode as RGB uint8 (H, W, 3).

    Transparency (an alpha band, or a palette/greyscale ``transparency`` entry) is composited onto white with PIL's
    ``alpha_composite``; every other mode goes through ``Image.convert("RGB")``. This is transformers'
    ``convert_to_rgb`` for PIL images, so e.g. mode ``I``/``I;16``/``F`` are clipped by PIL exactly as there.
    """
    if do_convert_rgb:
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"PIL image of mode {image.mode!r} is not 8-bit RGB and do_convert_rgb=False; enable do_convert_rgb"
        )
    return array


def _float_to_uint8(array: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 the way transformers' ``to_pil_image`` does: times 255 (in float64), truncate."""
    return (array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)


def _validate_values(array: np.ndarray, what: str) -> None:
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{what} contains NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{what} is a float array with values in [{lo}, {hi}]; float images must lie in [0, 1] "
                "(pass uint8 for 0..255 data)"
            )
    elif np.issubdtype(array.dtype, np.integer):
        if array.dtype != np.uint8:
            lo, hi = int(array.min()), int(array.max())
            if lo < 0 or hi > 255:
                raise ValueError(f"{what} is an integer array with values in [{lo}, {hi}], outside 0..255")
    else:
        raise ValueError(f"{what} has unsupported dtype {array.dtype}; use uint8 or float in [0, 1]")


def array_to_rgb_uint8(array: np.ndarray, channels_first: bool | None = None, what: str = "image",
                       do_convert_rgb: bool = True) -> np.ndarray:
    """A numpy image (HW, HWC or CHW; C in 1, 3, 4; uint8, other integers in 0..255, or float in [0, 1]) as
    RGB uint8 (H, W, 3).

    The layout is inferred as in transformers: a leading axis of size 1, 3 or 4 means channels-first (this wins
    when both ends could be channels), else a trailing one means channels-last. ``channels_first`` forces it.
    One channel is repeated to three. Four channels are blended onto white: for integers
    ``round(a/255 * rgb + (1 - a/255) * 255)``, for floats the same blend in [0, 1] before quantising. This is the
    numpy branch of transformers' ``convert_to_rgb``.

    Floats differ on purpose from transformers' defaults: transformers turns a [0, 1] float image into uint8
    pixels for PIL (times 255, truncated) and scales it back, and then applies ``do_rescale`` (1/255) a *second*
    time, which collapses the image to a constant. Here float inputs are taken to be already in [0, 1]: they are
    quantised the same way and then go through the uint8 pipeline, which equals transformers called with
    ``do_rescale=False`` for such inputs (exactly, also for RGBA).
    """
    if array.size == 0:
        raise ValueError(f"{what} is empty (shape {tuple(array.shape)})")
    if array.dtype == np.bool_:
        raise ValueError(f"{what} has unsupported dtype bool; use uint8 or float in [0, 1]")
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        if channels_first is None:
            channels_first = array.shape[0] in (1, 3, 4)
            if not channels_first and array.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"{what} has shape {tuple(array.shape)}: cannot find a channel axis with 1, 3 or 4 channels"
                )
        if channels_first:
            array = np.moveaxis(array, 0, -1)
    else:
        raise ValueError(f"{what} must have 2 (H, W) or 3 (H, W, C) dimensions, got shape {tuple(array.shape)}")
    channels = array.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"{what} has {channels} channels; only 1, 3 or 4 are supported")
    _validate_values(array, what)
    is_float = np.issubdtype(array.dtype, np.floating)
    if channels == 1:
        if not do_convert_rgb:
            raise ValueError(f"{what} has 1 channel and do_convert_rgb=False; enable do_convert_rgb")
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        if not do_convert_rgb:
            raise ValueError(f"{what} has 4 channels and do_convert_rgb=False; enable do_convert_rgb")
        if is_float:
            alpha = array[..., 3:4]
            array = (alpha * array[..., :3] + (1 - alpha) * 1.0).astype(array.dtype)
        else:
            alpha = array[..., 3:4] / 255
            array = np.round(alpha * array[..., :3] + (1 - alpha) * 255)
            array = array.astype(np.uint8)
    if is_float:
        return _float_to_uint8(array)
    return np.ascontiguousarray(array.astype(np.uint8, copy=False))


def to_rgb_uint8(image: Any, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, what: str = "image",
                 do_convert_rgb: bool = True) -> np.ndarray:
    """Any accepted image input as a contiguous RGB uint8 (H, W, 3) numpy array.

    Accepted: PIL images of any mode, numpy arrays (see :func:`array_to_rgb_uint8`), torch tensors (CHW preferred,
    as in transformers; HW and HWC are inferred), and file paths (``str`` or ``os.PathLike``).
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, max_image_pixels)
    if isinstance(image, Image.Image):
        check_pixel_count(image.width, image.height, max_image_pixels, what)
        _force_decode(image, what)
        return pil_to_rgb_uint8(image, do_convert_rgb)
    if _is_torch_tensor(image):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim >= 2 and image.size > 0:
            h, w = (image.shape[:2] if image.ndim == 2 or image.shape[0] not in (1, 3, 4) else image.shape[1:3])
            check_pixel_count(int(w), int(h), max_image_pixels, what)
        return array_to_rgb_uint8(image, what=what, do_convert_rgb=do_convert_rgb)
    raise ValueError(
        f"{what} has unsupported type {type(image).__name__}; expected a PIL image, a numpy array, a torch tensor "
        "or a file path"
    )


def _is_torch_tensor(obj: Any) -> bool:
    # Looked up in sys.modules so that this module never imports torch itself: if torch is not imported yet,
    # the object cannot be a torch tensor.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)
