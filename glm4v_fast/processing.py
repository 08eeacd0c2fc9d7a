"""GLM-4V image and video preprocessing: ``smart_resize`` and ``VisionProcessor``.

``VisionProcessor`` reproduces transformers' ``Glm4vImageProcessorPil`` (images) and ``Glm4vVideoProcessor``
(videos) without importing transformers or torchvision:

* images, ``backend="pil"`` (default): RGB uint8 → ``PIL.Image.resize`` (bicubic) → rescale → normalize →
  patchify (docs/reference.md §5.3). The output equals transformers' PIL processor bit for bit: every output value is a
  function of one uint8 pixel value and its channel, so rescale + normalize is a 3 x 256 lookup table computed with
  transformers' exact float64/float32 arithmetic, applied while gathering pixels into patch order. Several images
  are resized in parallel threads (PIL releases the GIL while resizing).
* images, ``backend="torch"``: the torchvision-like path of transformers' default ``Glm4vImageProcessor``
  (antialiased bicubic in torch, fused normalize), on any torch device. Against the PIL backend the pixel values
  differ slightly, because PIL and torch resample differently. Measured on CPU (torch 2.13, Pillow) in normalized
  units, where one uint8 level is about 0.015: on the benchmark's synthetic photos plus the demo images, mean
  absolute difference 7e-4, 99th percentile 0.015 (one level), maximum 0.24 (about 16 levels, on a hard colour
  edge); on pure pixel noise the mean is 5.6e-3. ``tests/test_processing.py`` bounds the mean and 99th percentile.
* videos: frame sampling, one ``smart_resize`` for the whole clip, the torchvision-like resize, fused normalize,
  temporal pairing and patchify (docs/reference.md §6), see :mod:`glm4v_fast.video`; the torch transforms
  both share are in :mod:`glm4v_fast.transforms`.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from .imageio import (DEFAULT_MAX_IMAGE_PIXELS, ImageLimits, check_pixel_count, decode_opened, open_checked,
                      to_rgb_uint8)
from .transforms import normalize_fused, patchify, resize_uint8
from .validation import boolean, is_int, positive_int, positive_number
from .video import frames_to_uint8, load_video, sample_frame_indices, slice_timestamps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: ``Glm4vImageProcessor`` class defaults: total-pixel budgets, not edge lengths (docs/reference.md §5.1).
DEFAULT_IMAGE_SIZE = {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 15000}
#: ``Glm4vVideoProcessor`` defaults: a whole-clip budget (docs/reference.md §6.1).
DEFAULT_VIDEO_SIZE = {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 2 * 30000}

IMAGE_CONFIG_NAME = "preprocessor_config.json"
VIDEO_CONFIG_NAME = "video_preprocessor_config.json"
_PROCESSOR_CONFIG_NAME = "processor_config.json"  # transformers 5 may nest both configs in this file

_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


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


def _value_table(do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: Sequence[float],
                 std: Sequence[float]) -> np.ndarray:
    """float32 (3, 256): the output value for each channel and uint8 input value.

    Uses transformers' PIL-backend arithmetic: rescale as ``float64(v) * factor`` cast to float32, then
    ``(x - float32(mean)) / float32(std)`` in float32 (or float32(v) when not rescaled).
    """
    values = np.arange(256, dtype=np.uint8)
    x = (values.astype(np.float64) * rescale_factor).astype(np.float32) if do_rescale else values
    if do_normalize:
        x = x.astype(np.float32)
        table = (x[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    else:
        table = np.broadcast_to(x.astype(np.float32), (3, 256))
    return np.ascontiguousarray(table, dtype=np.float32)


def _patchify_table(rgb: np.ndarray, table: np.ndarray, patch_size: int, merge_size: int,
                    temporal_patch_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) → float32 patches (gh*gw, 3*tp*p*p) in spatial-merge order, values from ``table``.

    The uint8 pixels are first gathered into patch order (cheap: one byte each), then looked up per channel and
    written into every temporal copy of the single frame. ``out``, when given, is the
    (gh*gw, 3*tp*p*p) float32 block to fill (a slice of the batch output, which saves a concatenation).
    """
    h, w, c = rgb.shape
    p, m = patch_size, merge_size
    gh, gw = h // p, w // p
    n = gh * gw
    # (bh, mh, ph, bw, mw, pw, C) -> (bh, bw, mh, mw, C, ph, pw)
    order = rgb.reshape(gh // m, m, p, gw // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
    order = np.ascontiguousarray(order).reshape(n, c, p * p)
    if out is None:
        out = np.empty((n, c * temporal_patch_size * p * p), dtype=np.float32)
    view = out.reshape(n, c, temporal_patch_size, p * p)
    for ch in range(c):
        values = table[ch].take(order[:, ch])  # one gather per channel; the temporal copies are plain copies
        for t in range(temporal_patch_size):
            view[:, ch, t] = values
    return out


def _check_size_dict(size: Any, name: str) -> dict[str, int]:
    if not isinstance(size, Mapping) or "shortest_edge" not in size or "longest_edge" not in size:
        raise ValueError(f"{name} must be a dict with 'shortest_edge' and 'longest_edge' (pixel budgets), got {size!r}")
    lo = positive_int(size["shortest_edge"], f"{name}['shortest_edge']")
    hi = positive_int(size["longest_edge"], f"{name}['longest_edge']")
    if lo > hi:
        raise ValueError(f"{name}: shortest_edge={lo} is larger than longest_edge={hi}")
    return {"shortest_edge": int(lo), "longest_edge": int(hi)}


def _three_floats(value: Any, name: str, positive: bool) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or 3 numbers, got {value!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
        raise ValueError(f"{name} must be 3 finite{' positive' if positive else ''} numbers, got {value!r}")
    return values  # type: ignore[return-value]


def _resample_code(value: Any) -> int:
    if isinstance(value, str) and value.lower() in _RESAMPLE_NAMES:
        return _RESAMPLE_NAMES[value.lower()]
    if is_int(value) and 0 <= int(value) <= 5:
        return int(value)
    raise ValueError(f"resample must be a PIL resampling code 0-5 or one of {sorted(_RESAMPLE_NAMES)}, got {value!r}")


def _describe_image(image: Any, index: int) -> str:
    """How error messages name an input: its position, and its path when it is a file."""
    if isinstance(image, (str, os.PathLike)):
        return f"image {index} ({os.fspath(image)!r})"
    return f"image {index}"


def _is_image_like(obj: Any) -> bool:
    return isinstance(obj, (Image.Image, str, os.PathLike, bytes, bytearray)) or (
        isinstance(obj, (np.ndarray, torch.Tensor)) and obj.ndim in (2, 3))


class VisionProcessor:
    """Images and videos → GLM-4V vision inputs, matching transformers' GLM-4V processors.

    Args:
        size: image pixel budget ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``.
        min_pixels, max_pixels: override the two entries of ``size``.
        resample: PIL resampling code or name (bicubic).
        do_resize, do_rescale, rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb,
        patch_size, temporal_patch_size, merge_size: as in transformers' ``Glm4vImageProcessor``.
        video_size, video_min_pixels, video_max_pixels: the whole-clip pixel budget for videos.
        fps: frames per second sampled from videos; max_duration: longer clips get ``fps * max_duration`` frames.
        do_sample_frames: sample frames from videos (needs the source fps), as transformers does by default.
        backend: ``"pil"`` (exact transformers PIL output) or ``"torch"`` (torchvision-like resize on ``device``).
            Defaults to ``"torch"`` when a device is given, else ``"pil"``. Videos always use the torch path.
        device: torch device for the torch path (images with ``backend="torch"``, and videos).
        max_image_pixels: refuse images (and video frames) with more pixels (decompression bombs); None: no limit.
        num_workers: threads resizing images in parallel (default: up to 8, one per CPU).
    """

    model_input_names = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")

    def __init__(self, size: Mapping[str, int] | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, resample: int | str = 3, do_resize: bool = True,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
                 do_convert_rgb: bool = True, patch_size: int = 14, temporal_patch_size: int = 2,
                 merge_size: int = 2, video_size: Mapping[str, int] | None = None,
                 video_min_pixels: int | None = None, video_max_pixels: int | None = None, fps: float = 2.0,
                 max_duration: float = 300, do_sample_frames: bool = True, backend: str | None = None,
                 device: Any = None, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 num_workers: int | None = None):
        size = dict(_check_size_dict(size if size is not None else DEFAULT_IMAGE_SIZE, "size"))
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        self.size = _check_size_dict(size, "size")
        video_size = dict(_check_size_dict(video_size if video_size is not None else DEFAULT_VIDEO_SIZE,
                                           "video_size"))
        if video_min_pixels is not None:
            video_size["shortest_edge"] = video_min_pixels
        if video_max_pixels is not None:
            video_size["longest_edge"] = video_max_pixels
        self.video_size = _check_size_dict(video_size, "video_size")
        self.resample = _resample_code(resample)
        self.do_resize, self.do_rescale = boolean(do_resize, "do_resize"), boolean(do_rescale, "do_rescale")
        self.do_normalize = boolean(do_normalize, "do_normalize")
        self.do_convert_rgb = boolean(do_convert_rgb, "do_convert_rgb")
        self.do_sample_frames = boolean(do_sample_frames, "do_sample_frames")
        self.rescale_factor = positive_number(rescale_factor, "rescale_factor")
        self.image_mean = _three_floats(image_mean, "image_mean", positive=False)
        self.image_std = _three_floats(image_std, "image_std", positive=True)
        self.patch_size = positive_int(patch_size, "patch_size")
        self.temporal_patch_size = positive_int(temporal_patch_size, "temporal_patch_size")
        self.merge_size = positive_int(merge_size, "merge_size")
        self.fps = positive_number(fps, "fps")
        self.max_duration = positive_number(max_duration, "max_duration")
        if backend is None:
            backend = "torch" if device is not None else "pil"
        if backend not in ("pil", "torch"):
            raise ValueError(f"backend must be 'pil' or 'torch', got {backend!r}")
        if backend == "pil" and device is not None and str(device) != "cpu":
            raise ValueError(f"device={device!r} needs backend='torch'; the PIL backend runs on the CPU")
        self.backend = backend
        self.device = device
        if backend == "torch" and self.resample not in (0, 2, 3):
            raise ValueError(f"backend='torch' supports resample 0, 2 or 3 (nearest, bilinear, bicubic), "
                             f"got {self.resample}")
        if max_image_pixels is not None:
            max_image_pixels = positive_int(max_image_pixels, "max_image_pixels")
        self.max_image_pixels = max_image_pixels
        self.num_workers = positive_int(num_workers, "num_workers") if num_workers is not None else \
            max(1, min(8, os.cpu_count() or 1))
        self._table = _value_table(self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                                   self.image_std)

    # ----------------------------------------------------------------------------------------------------------
    # construction from / to HF-style JSON

    @property
    def min_pixels(self) -> int:
        return self.size["shortest_edge"]

    @property
    def max_pixels(self) -> int:
        return self.size["longest_edge"]

    @classmethod
    def from_dict(cls, image_config: Mapping[str, Any], video_config: Mapping[str, Any] | None = None,
                  **kwargs: Any) -> VisionProcessor:
        """Build from transformers-style dicts (``preprocessor_config.json`` and optionally
        ``video_preprocessor_config.json`` contents). Unknown keys are ignored; ``kwargs`` override."""
        if not isinstance(image_config, Mapping):
            raise ValueError(f"image processor config must be a JSON object, got {type(image_config).__name__}")
        keys = ("size", "min_pixels", "max_pixels", "resample", "do_resize", "do_rescale", "rescale_factor",
                "do_normalize", "image_mean", "image_std", "do_convert_rgb", "patch_size", "temporal_patch_size",
                "merge_size")
        options = {k: image_config[k] for k in keys if image_config.get(k) is not None}
        if video_config is not None:
            if not isinstance(video_config, Mapping):
                raise ValueError(f"video processor config must be a JSON object, got {type(video_config).__name__}")
            for src, dst in (("size", "video_size"), ("min_pixels", "video_min_pixels"),
                             ("max_pixels", "video_max_pixels"), ("fps", "fps"), ("max_duration", "max_duration"),
                             ("do_sample_frames", "do_sample_frames")):
                if video_config.get(src) is not None:
                    options[dst] = video_config[src]
        options.update(kwargs)
        return cls(**options)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> VisionProcessor:
        """Read ``preprocessor_config.json`` (and ``video_preprocessor_config.json`` when present) from a directory,
        or a ``preprocessor_config.json`` file path. A transformers 5 ``processor_config.json`` holding nested
        ``image_processor`` / ``video_processor`` entries is read when the first is absent.

        Raises:
            FileNotFoundError: no such directory or no processor config in it.
            ValueError: invalid JSON or invalid values.
        """
        path = os.fspath(path)
        if os.path.isfile(path):
            directory, image_file = os.path.dirname(path), path
        elif os.path.isdir(path):
            directory, image_file = path, os.path.join(path, IMAGE_CONFIG_NAME)
        else:
            raise FileNotFoundError(f"no such processor directory or file: {path!r}")
        video_file = os.path.join(directory, VIDEO_CONFIG_NAME)
        video_config = _read_json(video_file) if os.path.isfile(video_file) else None
        if os.path.isfile(image_file):
            image_config = _read_json(image_file)
        elif os.path.isfile(os.path.join(directory, _PROCESSOR_CONFIG_NAME)):
            nested = _read_json(os.path.join(directory, _PROCESSOR_CONFIG_NAME))
            if not isinstance(nested, Mapping) or not isinstance(nested.get("image_processor"), Mapping):
                raise FileNotFoundError(f"{directory!r} has no {IMAGE_CONFIG_NAME} and its "
                                        f"{_PROCESSOR_CONFIG_NAME} has no image_processor entry")
            image_config = nested["image_processor"]
            if video_config is None and isinstance(nested.get("video_processor"), Mapping):
                video_config = nested["video_processor"]
        else:
            raise FileNotFoundError(f"{IMAGE_CONFIG_NAME} not found in {directory!r}")
        return cls.from_dict(image_config, video_config, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The image options in transformers' ``preprocessor_config.json`` layout."""
        return {
            "image_processor_type": "Glm4vImageProcessor",
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

    def video_to_dict(self) -> dict[str, Any]:
        """The video options in transformers' ``video_preprocessor_config.json`` layout."""
        config = self.to_dict()
        del config["image_processor_type"]
        config.update({"video_processor_type": "Glm4vVideoProcessor", "size": dict(self.video_size),
                       "fps": self.fps, "max_duration": self.max_duration,
                       "do_sample_frames": self.do_sample_frames})
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``preprocessor_config.json`` and ``video_preprocessor_config.json`` into ``directory``."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        for name, config in ((IMAGE_CONFIG_NAME, self.to_dict()), (VIDEO_CONFIG_NAME, self.video_to_dict())):
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")

    def __repr__(self) -> str:
        return (f"VisionProcessor(size={self.size}, video_size={self.video_size}, backend={self.backend!r}, "
                f"device={self.device!r}, fps={self.fps}, patch_size={self.patch_size}, "
                f"merge_size={self.merge_size}, temporal_patch_size={self.temporal_patch_size})")

    # ----------------------------------------------------------------------------------------------------------
    # sizes

    @property
    def _factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        if not self.do_resize:
            return height, width
        return smart_resize(self.temporal_patch_size, height, width, temporal_factor=self.temporal_patch_size,
                            factor=self._factor, min_pixels=self.size["shortest_edge"],
                            max_pixels=self.size["longest_edge"])

    @property
    def max_image_patches(self) -> int:
        """The most patches (rows of ``pixel_values``) one image resizes to: the pixel budget ``longest_edge``
        holds ``temporal_patch_size`` copies of the frame, ``patch_size**2`` pixels per patch."""
        return self.size["longest_edge"] // (self.temporal_patch_size * self.patch_size ** 2)

    def get_number_of_image_patches(self, height: int, width: int,
                                    images_kwargs: Mapping[str, Any] | None = None) -> int:
        """Patches (rows of ``pixel_values``) for an image of ``height`` x ``width``; merged tokens are a
        ``merge_size**2`` fraction of this. ``images_kwargs`` may override patch_size, merge_size and size,
        as in transformers."""
        images_kwargs = dict(images_kwargs or {})
        patch_size = images_kwargs.get("patch_size", self.patch_size)
        merge_size = images_kwargs.get("merge_size", self.merge_size)
        size = _check_size_dict(images_kwargs.get("size", self.size), "size")
        h, w = smart_resize(self.temporal_patch_size, height, width, temporal_factor=self.temporal_patch_size,
                            factor=patch_size * merge_size, min_pixels=size["shortest_edge"],
                            max_pixels=size["longest_edge"])
        return (h // patch_size) * (w // patch_size)

    # ----------------------------------------------------------------------------------------------------------
    # processing

    def __call__(self, images: Any = None, videos: Any = None, video_metadata: Any = None,
                 return_tensors: str | None = "pt", do_sample_frames: bool | None = None) -> dict[str, Any]:
        """Preprocess images and/or videos.

        Args:
            images: one image or a list of images (PIL image, numpy HW/HWC/CHW array, torch CHW tensor, path);
                a 4-D array or tensor is a batch of images.
            videos: one video or a list of videos: a (T, H, W, C) array or tensor, a list of frames, or a file path.
            video_metadata: a dict ``{"fps", "duration", "total_num_frames"}`` or one per video. For files the
                container's values are used and the dict's entries override them. An in-memory video (array,
                tensor or list of frames) is sampled at ``self.fps`` only if its ``"fps"`` is given here; with
                ``do_sample_frames=False`` every frame is used and no metadata is needed.
            return_tensors: ``"pt"`` (torch tensors), ``"np"`` or None (numpy).
            do_sample_frames: override the instance setting for this call.

        Returns:
            dict with ``pixel_values`` float32 (N, C*tp*p*p) and ``image_grid_thw`` int64 (K, 3) for images, and
            ``pixel_values_videos``, ``video_grid_thw`` and ``video_timestamps`` (per video, the time in seconds of
            the first frame of each temporal slice) for videos.
        """
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        if images is None and videos is None:
            raise ValueError("pass images and/or videos")
        out: dict[str, Any] = {}
        if images is not None:
            out.update(self.image_inputs(images, return_tensors=return_tensors))
        if videos is not None:
            out.update(self.video_inputs(videos, video_metadata, do_sample_frames, return_tensors))
        return out

    def preprocess(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Alias of ``__call__`` (transformers' name)."""
        return self(*args, **kwargs)

    def image_inputs(self, images: Any, first_index: int = 0, return_tensors: str | None = "pt",
                     names: Sequence[str] | None = None) -> dict[str, Any]:
        """``pixel_values`` and ``image_grid_thw`` of images, as ``__call__(images=...)``; error messages number
        them from ``first_index`` (a caller encoding a long list in batches passes the batch's position), or
        call them by ``names`` when given (one per image)."""
        pixel_values, grid = self._process_images(self._as_image_list(images), first_index, names)
        return self._convert({"pixel_values": pixel_values, "image_grid_thw": grid}, return_tensors)

    def video_inputs(self, videos: Any, video_metadata: Any = None, do_sample_frames: bool | None = None,
                     return_tensors: str | None = "pt", names: Sequence[str] | None = None) -> dict[str, Any]:
        """``pixel_values_videos``, ``video_grid_thw`` and ``video_timestamps``, as ``__call__(videos=...)``.
        ``names``: how error messages name each video (default ``video 0``, ``video 1``, ...)."""
        sample = self.do_sample_frames if do_sample_frames is None else bool(do_sample_frames)
        pixel_values, grid, stamps = self._process_videos(videos, video_metadata, sample, names)
        return self._convert({"pixel_values_videos": pixel_values, "video_grid_thw": grid,
                              "video_timestamps": stamps}, return_tensors)

    def _convert(self, out: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
        for key, value in out.items():
            if key == "video_timestamps":
                continue
            if return_tensors == "pt" and isinstance(value, np.ndarray):
                out[key] = torch.from_numpy(value)
            elif return_tensors != "pt" and isinstance(value, torch.Tensor):
                out[key] = value.cpu().numpy()
        return out

    @staticmethod
    def _as_image_list(images: Any) -> list[Any]:
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError("images is an empty batch")
            return list(images)
        if _is_image_like(images) or isinstance(images, (np.ndarray, torch.Tensor)):
            return [images]  # arrays of other ranks are refused with a message about their dimensions
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is an empty list")
            return list(images)
        raise ValueError(f"images has unsupported type {type(images).__name__}; expected an image or a list of images")

    def _process_images(self, images: list[Any], first_index: int = 0,
                        names: Sequence[str] | None = None) -> tuple[Any, Any]:
        if names is None:
            names = [_describe_image(image, first_index + i) for i, image in enumerate(images)]
        elif len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        if self.backend == "torch":
            results = [self._torch_image(image, name) for image, name in zip(images, names)]
            pixel_values = torch.cat([r[0] for r in results], dim=0)
            grid = torch.tensor([r[1] for r in results], dtype=torch.int64)
            return pixel_values, grid
        # Pass 1 (cheap): decode/convert and work out every output size, so that pass 2 can write each image's
        # patches straight into its rows of one preallocated batch array instead of concatenating afterwards.
        rgbs = self._map(self._load_rgb, images, names)
        sizes = [self._target_size(rgb.shape[0], rgb.shape[1], name) for rgb, name in zip(rgbs, names)]
        counts = [(h // self.patch_size) * (w // self.patch_size) for h, w in sizes]
        dim = 3 * self.temporal_patch_size * self.patch_size ** 2
        pixel_values = np.empty((sum(counts), dim), dtype=np.float32)
        offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        blocks = [pixel_values[offsets[i]:offsets[i + 1]] for i in range(len(rgbs))]
        self._map(self._pil_image, rgbs, sizes, blocks)
        grid = np.array([[1, h // self.patch_size, w // self.patch_size] for h, w in sizes], dtype=np.int64)
        return pixel_values, grid.reshape(-1, 3)

    def _map(self, fn: Any, *columns: list) -> list:
        """``map`` over images, in threads when there are several (PIL and numpy release the GIL in bulk work)."""
        count = len(columns[0])
        if count > 1 and self.num_workers > 1:
            with ThreadPoolExecutor(min(self.num_workers, count)) as pool:
                return list(pool.map(fn, *columns))
        return [fn(*row) for row in zip(*columns)]

    def _load_rgb(self, image: Any, what: str) -> np.ndarray:
        if isinstance(image, (str, os.PathLike, bytes, bytearray)):
            # A file's size is in its header: refuse an aspect ratio over 200 before decoding (a 65500x320
            # progressive JPEG of 93 KB takes seconds to decode only to be refused afterwards).
            name = f"image file {os.fspath(image)!r}" if isinstance(image, (str, os.PathLike)) else what
            opened, _ = open_checked(image, ImageLimits(self.max_image_pixels), name,
                                     check_size=lambda height, width: self._target_size(height, width, what))
            image = decode_opened(opened, name, self.max_image_pixels)
        return to_rgb_uint8(image, self.max_image_pixels, what=what, do_convert_rgb=self.do_convert_rgb)

    def _target_size(self, height: int, width: int, what: str) -> tuple[int, int]:
        try:
            h, w = self.resized_size(height, width)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if h % self._factor or w % self._factor:
            raise ValueError(f"{what} is {height}x{width}; with do_resize=False both sides must be multiples of "
                             f"patch_size*merge_size={self._factor}")
        return h, w

    def _pil_image(self, rgb: np.ndarray, size: tuple[int, int], out: np.ndarray) -> None:
        """Resize one RGB uint8 image with PIL and write its patches into ``out``."""
        h, w = size
        if (h, w) != rgb.shape[:2]:
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), resample=self.resample))
        _patchify_table(rgb, self._table, self.patch_size, self.merge_size, self.temporal_patch_size, out)

    def _torch_image(self, image: Any, what: str) -> tuple[Any, list[int]]:
        rgb = self._load_rgb(image, what)
        height, width = rgb.shape[:2]
        h, w = self._target_size(height, width, what)
        if not rgb.flags.writeable:  # arrays viewing PIL memory are read-only; torch wants writable memory
            rgb = rgb.copy()
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(self.device or "cpu").contiguous()
        x = resize_uint8(x, h, w, self.resample)
        x = normalize_fused(x, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                            self.image_std)
        # One frame; patchify repeats it to fill the temporal patch, like transformers' image path.
        patches, (_, gh, gw) = patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)
        return patches, [1, gh, gw]

    # ----------------------------------------------------------------------------------------------------------
    # videos

    @staticmethod
    def _as_video_list(videos: Any) -> list[Any]:
        if isinstance(videos, (str, os.PathLike, np.ndarray, torch.Tensor)):
            return [videos]
        if isinstance(videos, (list, tuple)):
            if not videos:
                raise ValueError("videos is an empty list")
            # A flat list of frames is one video; otherwise each entry is a video.
            if all(isinstance(v, Image.Image) or (isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim in (2, 3))
                   for v in videos):
                return [list(videos)]
            return list(videos)
        raise ValueError(f"videos has unsupported type {type(videos).__name__}; expected a (T, H, W, C) array, a "
                         "list of frames, a file path, or a list of these")

    def _process_videos(self, videos: Any, video_metadata: Any, sample: bool,
                        names: Sequence[str] | None = None) -> tuple[Any, Any, list]:
        items = self._as_video_list(videos)
        names = list(names) if names is not None else [None] * len(items)  # None: "video i", files by path
        if len(names) != len(items):
            raise ValueError(f"got {len(items)} videos but {len(names)} names")
        if video_metadata is None:
            metadata = [None] * len(items)
        elif isinstance(video_metadata, Mapping):
            metadata = [video_metadata]
        elif isinstance(video_metadata, (list, tuple)):
            metadata = list(video_metadata)
        else:
            raise ValueError(f"video_metadata must be a dict or a list of dicts, got {type(video_metadata).__name__}")
        if len(metadata) != len(items):
            raise ValueError(f"got {len(items)} videos but {len(metadata)} video_metadata entries; "
                             "pass one entry per video")
        device = self.device or "cpu"
        all_patches, grids, stamps = [], [], []
        for i, (video, meta) in enumerate(zip(items, metadata)):
            if meta is not None and not isinstance(meta, Mapping):
                raise ValueError(f"video_metadata[{i}] must be a dict, got {type(meta).__name__}")
            what = names[i] or f"video {i}"
            frames, fps, indices = self._video_frames(video, dict(meta or {}), sample, what, names[i])
            t, height, width = frames.shape[:3]
            # transformers' smart_resize raises for a single unsampled frame; it is padded to a pair below anyway.
            if self.do_resize:
                h, w = smart_resize(max(t, self.temporal_patch_size), height, width,
                                    temporal_factor=self.temporal_patch_size, factor=self._factor,
                                    min_pixels=self.video_size["shortest_edge"],
                                    max_pixels=self.video_size["longest_edge"])
            else:
                h, w = self._target_size(height, width, what)
            x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(device).contiguous()
            x = resize_uint8(x, h, w, self.resample if self.resample in (0, 2, 3) else 3)
            x = normalize_fused(x, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                                self.image_std)
            patches, grid = patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)
            all_patches.append(patches)
            grids.append(list(grid))
            stamps.append(slice_timestamps(indices, fps, grid[0], self.temporal_patch_size))
        return torch.cat(all_patches, dim=0), torch.tensor(grids, dtype=torch.int64), stamps

    def _video_frames(self, video: Any, meta: dict, sample: bool, what: str,
                      file_name: str | None) -> tuple[np.ndarray, Any, list]:
        """Decoded (and, when asked, sampled) RGB uint8 frames, the source fps and the source index of each frame.
        `file_name` names a video file in decoding errors (None: its path)."""
        if isinstance(video, (str, os.PathLike)):
            frames, info = load_video(video, self.fps, self.max_duration, sample, meta, self.max_image_pixels,
                                      what=file_name)
            if frames.shape[-1] != 3:
                raise ValueError(f"{what}: decoded frames have {frames.shape[-1]} channels, expected 3")
            check_pixel_count(frames.shape[2], frames.shape[1], self.max_image_pixels, f"{what} frames")
            return frames, info["fps"], info["frames_indices"]
        frames = frames_to_uint8(video, what, self.max_image_pixels, self.do_convert_rgb)
        fps = meta.get("fps")
        if not sample:
            return frames, fps, list(range(len(frames)))
        if fps is None:
            raise ValueError(f"{what}: frame sampling needs the source fps of an in-memory video; pass "
                             "video_metadata={'fps': ...} (one dict per video), or do_sample_frames=False to "
                             "use every frame as given")
        total = meta.get("total_num_frames") or len(frames)
        indices = sample_frame_indices(int(total), fps, meta.get("duration"), self.fps, self.max_duration)
        if max(indices) >= len(frames):
            raise ValueError(f"{what}: video_metadata says {total} frames but the video has {len(frames)}")
        return frames[indices], fps, indices



def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path!r} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path!r} is not UTF-8 text: {exc}") from exc


__all__ = ["VisionProcessor", "smart_resize", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "DEFAULT_IMAGE_SIZE",
           "DEFAULT_VIDEO_SIZE"]
