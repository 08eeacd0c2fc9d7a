"""Image loading and validation: every accepted input becomes an RGB uint8 (H, W, 3) numpy array.

The conversions reproduce what Hugging Face transformers' image processors do to each input type before they
resize (so that the processor's output matches theirs bit for bit): both backends convert PIL images alike and
differ only in how four-channel arrays are blended onto white (``blend=``). One deliberate difference for
floating-point inputs is described in :func:`array_to_rgb_uint8`.

Every bad input ends in a ``ValueError`` (``FileNotFoundError`` for a missing path, ``TypeError`` never) whose
message names the problem, raised here rather than deep inside PIL or numpy.
"""
from __future__ import annotations

import io
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .options import DEFAULT_MAX_IMAGE_PIXELS  # PIL's hard limit; the default of VisionProcessor.max_image_pixels

# Image.open reads the global Image.MAX_IMAGE_PIXELS; when a caller raises our limit above PIL's we lift PIL's
# check for the duration of one open, under this lock, and enforce our own limit instead.
_PIL_LIMIT_LOCK = threading.Lock()

#: How to raise the limit, appended to every pixel-limit error.
RAISE_LIMIT_HINT = ("To allow it, raise the limit: max_image_pixels= of VisionProcessor or "
                    "create_glm4v_vision_encoder (None: no limit), or --max-image-pixels N of glm4v-fast encode and serve")

#: Most scans a JPEG may have (progressive JPEGs from common encoders have about 10; each scan is a decoding
#: pass over the whole image, so a small file repeating one scan hundreds of times costs seconds).
DEFAULT_MAX_JPEG_SCANS = 100

_EXIF_ORIENTATION = 0x0112
# "https://...", "s3://...", "file://...": a scheme and "//" (a Windows drive "C:\\" has neither).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ImageLimits:
    """What an encoded image may cost, checked from its header before it is decoded."""

    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    max_jpeg_scans: int | None = DEFAULT_MAX_JPEG_SCANS


def check_local_path(path: str | os.PathLike, kind: str = "image") -> str:
    """`path` as a string, refusing a URL (nothing is downloaded) and a missing file with messages that say so."""
    path = os.fspath(path)
    if not os.path.exists(path):
        if _URL.match(path):
            raise ValueError(f"{kind} {path!r} is a URL: glm4v-fast does not fetch URLs (nothing is downloaded); "
                             f"download the file and pass its local path or its bytes")
        raise FileNotFoundError(f"{kind} file not found: {path!r}")
    return path


class ImageTooLarge(ValueError):
    """A ValueError for input refused by a size or cost limit (pixels, JPEG scans, memory) rather than malformed:
    callers such as the server answer it differently (413)."""


def check_pixel_count(width: int, height: int, max_image_pixels: int | None, what: str) -> None:
    """Refuse empty images and ones over the decompression-bomb limit (images and video frames alike)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} is empty: size {width}x{height}")
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ImageTooLarge(
            f"{what} has {width * height} pixels ({width}x{height}), more than max_image_pixels="
            f"{max_image_pixels}; refusing a possible decompression bomb. {RAISE_LIMIT_HINT}"
        )


def count_jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """Number of scans (SOS segments) in a JPEG stream, read from its markers without decoding.

    A progressive JPEG is decoded once per scan, each pass over the whole image, so the count bounds the decode
    cost. Counting stops early once it exceeds ``stop_after``. Entropy-coded data cannot contain a marker
    (every 0xFF there is followed by 0x00 or a restart marker), so markers are found by a byte search.
    """
    scans, i, n = 0, 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return scans  # not at a marker: a malformed stream (the decoder will say more)
        marker = data[i + 1]
        if marker == 0xFF:        # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:        # EOI
            return scans
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # parameterless markers
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:        # SOS: its header, then entropy-coded data up to the next marker
            scans += 1
            if stop_after is not None and scans > stop_after:
                return scans
            found = _NEXT_MARKER.search(data, i)
            if found is None:
                return scans
            i = found.start()
    return scans


_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def open_image(source: str | os.PathLike | bytes, what: str | None = None,
               max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               max_jpeg_scans: int | None = DEFAULT_MAX_JPEG_SCANS) -> Image.Image:
    """Open an image file or encoded bytes *without decoding it*, and check what the header tells.

    Refused here, before any pixel is decoded: a pixel count over ``max_image_pixels`` (a decompression bomb,
    e.g. a GIF declaring a huge screen), and a JPEG with more than ``max_jpeg_scans`` scans (each one a full
    decoding pass). Use :func:`image_size` for the upright size and :func:`decode_opened` to decode.
    """
    is_path = isinstance(source, (str, os.PathLike))
    if is_path:
        path = check_local_path(source)
        what = what or f"image file {path!r}"
        if os.path.isdir(path):
            raise ValueError(f"image path is a directory, not a file: {path!r}")
        opened: Any = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        what = what or "image bytes"
        if not len(source):
            raise ValueError(f"{what} is empty")
        opened = io.BytesIO(source)
    else:
        raise ValueError(f"cannot open an image from {type(source).__name__}; expected a path or bytes")
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
                        image = Image.open(opened)
                    finally:
                        Image.MAX_IMAGE_PIXELS = saved
            else:
                image = Image.open(opened)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{what} is too large (decompression bomb): {exc}. {RAISE_LIMIT_HINT}") from exc
    except Exception as exc:  # any error PIL raises while parsing a header means the input is bad
        kind = _format_by_signature(source)
        if kind is not None:  # e.g. PIL's "OSError: Truncated File Read" for a JPEG cut short in its header
            raise ValueError(f"cannot open {what}: it starts like a {kind} file but is truncated or not a valid "
                             f"{kind} ({type(exc).__name__}: {exc})") from exc
        if isinstance(exc, Image.UnidentifiedImageError):
            raise ValueError(f"cannot identify {what}: not an image or an unsupported format") from exc
        raise ValueError(f"cannot open {what}: {type(exc).__name__}: {exc}") from exc
    try:
        check_pixel_count(image.width, image.height, max_image_pixels, what)
        if image.format == "JPEG" and max_jpeg_scans is not None:
            if is_path:
                with open(path, "rb") as f:
                    data = f.read()
            else:
                data = bytes(source)
            scans = count_jpeg_scans(data, stop_after=max_jpeg_scans)
            if scans > max_jpeg_scans:
                raise ImageTooLarge(f"{what} is a JPEG with more than max_jpeg_scans={max_jpeg_scans} scans (each "
                                 "one a full decoding pass); refusing it before decoding")
    except BaseException:
        image.close()
        raise
    return image


#: File signatures (leading bytes) of the formats users pass most, to say what a file that fails to open claims
#: to be.
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _format_by_signature(source: str | os.PathLike | bytes) -> str | None:
    """The image format ``source``'s first bytes announce, or None."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                head = f.read(12)
        else:
            head = bytes(source[:12])
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for signature, kind in _SIGNATURES if head.startswith(signature)), None)


def open_checked(source: str | os.PathLike | bytes, limits: ImageLimits = ImageLimits(), what: str | None = None,
                 check_size: Callable[[int, int], Any] | None = None) -> tuple[Image.Image, Any]:
    """Open an image file or encoded bytes without decoding it and check all its header tells: the pixel count
    and JPEG scans against `limits`, then `check_size(height, width)` on the upright size (e.g. an aspect ratio
    the resize refuses). Returns the opened image (decode it with :func:`decode_opened`) and what `check_size`
    returned (None without one). The one way files and bytes are read, by the processor and the server alike."""
    image = open_image(source, what, limits.max_image_pixels, limits.max_jpeg_scans)
    if check_size is None:
        return image, None
    try:
        width, height = image_size(image)
        return image, check_size(height, width)
    except BaseException:
        image.close()
        raise


def image_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied (as :func:`decode_opened` will)."""
    if image.format == "PNG" and "exif" not in image.info:
        # Pillow looks for an eXIf chunk after the pixel data by decoding the whole PNG. Without one before the
        # pixels, the header size is used: an orientation only swaps the sides, which no header check depends on
        # (pixel count, aspect ratio and patch count are the same either way).
        return image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: decode_opened will refuse the image
        orientation = 1
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def decode_opened(image: Image.Image, what: str = "image",
                  max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image from :func:`open_image` the way transformers' ``load_image`` does for files, bytes and
    data URLs: the EXIF orientation applied (``ImageOps.exif_transpose``), then ``convert("RGB")`` (an alpha
    band is dropped, not blended: that is what ``load_image`` does). Every decoding error is a ValueError."""
    try:
        _force_decode(image, what)
        # Some decoders produce another size than the header declared (ICO, for one): check again.
        check_pixel_count(image.width, image.height, max_image_pixels, what)
        try:
            ImageOps.exif_transpose(image, in_place=True)
            return image if image.mode == "RGB" else image.convert("RGB")
        except MemoryError as exc:
            raise ImageTooLarge(f"{what} is too large to convert in the memory available") from exc
        except Exception as exc:  # e.g. corrupt EXIF data
            raise ValueError(f"{what} cannot be oriented or converted to RGB: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        image.close()
        raise


def load_image(source: str | os.PathLike | bytes, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               what: str | None = None, max_jpeg_scans: int | None = DEFAULT_MAX_JPEG_SCANS) -> Image.Image:
    """Open and fully decode an image file (or encoded bytes) into an upright RGB PIL image.

    Same result as transformers' ``load_image``: EXIF orientation applied, converted to RGB. The pixel-count and
    JPEG scan limits are checked from the header before decoding; a truncated or corrupt file fails here with a
    ``ValueError`` naming it, never later and never with another exception type.
    """
    image = open_image(source, what, max_image_pixels, max_jpeg_scans)
    if what is None:
        what = f"image file {os.fspath(source)!r}" if isinstance(source, (str, os.PathLike)) else "image bytes"
    return decode_opened(image, what, max_image_pixels)


def _force_decode(image: Image.Image, what: str) -> None:
    """Decode a lazily opened PIL image now, turning PIL's decode errors into ValueError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{what} is too large (decompression bomb): {exc}. {RAISE_LIMIT_HINT}") from exc
    except MemoryError as exc:
        raise ImageTooLarge(f"{what} is too large to decode in the memory available") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, RuntimeError, NotImplementedError, ... for bad data
        raise ValueError(f"{what} is corrupt or truncated and cannot be decoded: {type(exc).__name__}: {exc}") \
            from exc


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
                       do_convert_rgb: bool = True, blend: str = "pil") -> np.ndarray:
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

    ``blend="torchvision"`` blends integer four-channel arrays as transformers' torchvision backend does instead:
    in float32 (``v * float32(1/255)``, ``rgb * a + (1 - a)``), back to uint8 times 255.999, truncated
    (torchvision's ``to_dtype``).
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
        elif blend == "torchvision":
            x = array.astype(np.float32) * np.float32(1 / 255)
            alpha = x[..., 3:4]
            array = ((x[..., :3] * alpha + (1 - alpha)) * np.float32(255.999)).astype(np.uint8)
        else:
            alpha = array[..., 3:4] / 255
            array = np.round(alpha * array[..., :3] + (1 - alpha) * 255)
            array = array.astype(np.uint8)
    if is_float:
        return _float_to_uint8(array)
    return np.ascontiguousarray(array.astype(np.uint8, copy=False))


def to_rgb_uint8(image: Any, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, what: str = "image",
                 do_convert_rgb: bool = True, blend: str = "pil") -> np.ndarray:
    """Any accepted image input as a contiguous RGB uint8 (H, W, 3) numpy array.

    Accepted: PIL images of any mode, numpy arrays (see :func:`array_to_rgb_uint8`), torch tensors (CHW preferred,
    as in transformers; HW and HWC are inferred), file paths (``str`` or ``os.PathLike``) and encoded image bytes.
    Paths and bytes are loaded like transformers' ``load_image`` (:func:`load_image`: EXIF orientation applied,
    ``convert("RGB")``); PIL images are used as given (no EXIF rotation; transparency blended onto white).
    ``blend``: how four-channel arrays and tensors are blended onto white (:func:`array_to_rgb_uint8`).
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        # Files and encoded bytes load as in transformers' load_image (EXIF orientation, RGB); a PIL image passed
        # in is taken as it is.
        image = load_image(image, max_image_pixels, None if isinstance(image, (str, os.PathLike)) else what)
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
        return array_to_rgb_uint8(image, what=what, do_convert_rgb=do_convert_rgb, blend=blend)
    raise ValueError(
        f"{what} has unsupported type {type(image).__name__}; expected a PIL image, a numpy array, a torch tensor "
        "or a file path"
    )


def _is_torch_tensor(obj: Any) -> bool:
    # Looked up in sys.modules so that this module never imports torch itself: if torch is not imported yet,
    # the object cannot be a torch tensor.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)
