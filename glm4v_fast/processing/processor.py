"""``VisionProcessor``: images and videos → GLM-4V vision inputs, composing the image and the video processor as
transformers' ``Glm4vProcessor`` composes ``Glm4vImageProcessor`` and ``Glm4vVideoProcessor``."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..imageio import DEFAULT_MAX_IMAGE_PIXELS
from .config import BACKEND_KEY, options_from_dicts, read_configs, write_configs
from .image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from .video import VideoProcessor


def _image_option(name: str) -> property:
    return property(lambda self: getattr(self.image_processor, name), doc=f"The image processor's ``{name}``.")


def _video_option(name: str) -> property:
    return property(lambda self: getattr(self.video_processor, name), doc=f"The video processor's ``{name}``.")


class VisionProcessor:
    """Images and videos → GLM-4V vision inputs, equal to transformers' GLM-4V processors.

    Args:
        size: image pixel budget ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``.
        min_pixels, max_pixels: override the two entries of ``size``.
        resample: PIL resampling code or name (bicubic).
        do_resize, do_rescale, rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb,
        patch_size, temporal_patch_size, merge_size: as in transformers' ``Glm4vImageProcessor``.
        video_size, video_min_pixels, video_max_pixels: the whole-clip pixel budget for videos.
        fps: frames per second sampled from videos; max_duration: longer clips get ``fps * max_duration`` frames.
        do_sample_frames: sample frames from videos (needs the source fps), as transformers does by default.
        backend: the image backend, named as in transformers: ``"torchvision"`` (default, as transformers' default
            ``Glm4vImageProcessor``, which vLLM and SGLang run; alias ``"torch"``; needs no torchvision) or
            ``"pil"`` (``Glm4vImageProcessorPil``). Each equals its transformers processor bit for bit. Videos
            always follow transformers' (torchvision) video processor.
        device: torch device for the torchvision backend and videos (None: the CPU).
        max_image_pixels: refuse images (and video frames) with more pixels (decompression bombs); None: no limit.
        num_workers: threads loading and resizing images in parallel (default: up to 8, one per CPU).
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
        shared = dict(resample=resample, do_resize=do_resize, do_rescale=do_rescale, rescale_factor=rescale_factor,
                      do_normalize=do_normalize, image_mean=image_mean, image_std=image_std,
                      do_convert_rgb=do_convert_rgb, patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                      merge_size=merge_size, device=device, max_image_pixels=max_image_pixels)
        self.image_processor = ImageProcessor(size=size, min_pixels=min_pixels, max_pixels=max_pixels,
                                              backend=backend, num_workers=num_workers, **shared)
        self.video_processor = VideoProcessor(size=video_size, min_pixels=video_min_pixels,
                                              max_pixels=video_max_pixels, fps=fps, max_duration=max_duration,
                                              do_sample_frames=do_sample_frames, **shared)

    size = _image_option("size")
    min_pixels = _image_option("min_pixels")
    max_pixels = _image_option("max_pixels")
    resample = _image_option("resample")
    do_resize = _image_option("do_resize")
    do_rescale = _image_option("do_rescale")
    rescale_factor = _image_option("rescale_factor")
    do_normalize = _image_option("do_normalize")
    image_mean = _image_option("image_mean")
    image_std = _image_option("image_std")
    do_convert_rgb = _image_option("do_convert_rgb")
    patch_size = _image_option("patch_size")
    temporal_patch_size = _image_option("temporal_patch_size")
    merge_size = _image_option("merge_size")
    backend = _image_option("backend")
    device = _image_option("device")
    max_image_pixels = _image_option("max_image_pixels")
    num_workers = _image_option("num_workers")
    max_image_patches = _image_option("max_image_patches")
    video_size = _video_option("size")
    fps = _video_option("fps")
    max_duration = _video_option("max_duration")
    do_sample_frames = _video_option("do_sample_frames")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        return self.image_processor.resized_size(height, width)

    def get_number_of_image_patches(self, height: int, width: int,
                                    images_kwargs: Mapping[str, Any] | None = None) -> int:
        """Patches (rows of ``pixel_values``) for an image of ``height`` x ``width``; merged tokens are a
        ``merge_size**2`` fraction of this. ``images_kwargs`` may override patch_size, merge_size and size,
        as in transformers."""
        return self.image_processor.get_number_of_image_patches(height, width, images_kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # construction from / to transformers-style JSON

    @classmethod
    def from_dict(cls, image_config: Mapping[str, Any], video_config: Mapping[str, Any] | None = None,
                  **kwargs: Any) -> VisionProcessor:
        """Build from transformers-style dicts (``preprocessor_config.json`` and optionally
        ``video_preprocessor_config.json`` contents). Unknown keys are ignored; ``kwargs`` override. Without a
        recorded backend, the torchvision backend (transformers' default)."""
        options = options_from_dicts(image_config, video_config)
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
        image_config, video_config = read_configs(path)
        return cls.from_dict(image_config, video_config, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The image options in transformers' ``preprocessor_config.json`` layout, plus the backend."""
        return {**self.image_processor.to_dict(), BACKEND_KEY: self.backend}

    def video_to_dict(self) -> dict[str, Any]:
        """The video options in transformers' ``video_preprocessor_config.json`` layout."""
        return self.video_processor.to_dict()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``preprocessor_config.json`` and ``video_preprocessor_config.json`` into ``directory``."""
        write_configs(directory, self.to_dict(), self.video_to_dict())

    def __repr__(self) -> str:
        return (f"VisionProcessor(size={self.size}, video_size={self.video_size}, backend={self.backend!r}, "
                f"device={self.device!r}, fps={self.fps}, patch_size={self.patch_size}, "
                f"merge_size={self.merge_size}, temporal_patch_size={self.temporal_patch_size})")

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
        pixel_values, grid = self.image_processor(images, first_index, names)
        return _convert({"pixel_values": pixel_values, "image_grid_thw": grid}, return_tensors)

    def video_inputs(self, videos: Any, video_metadata: Any = None, do_sample_frames: bool | None = None,
                     return_tensors: str | None = "pt", names: Sequence[str] | None = None) -> dict[str, Any]:
        """``pixel_values_videos``, ``video_grid_thw`` and ``video_timestamps``, as ``__call__(videos=...)``.
        ``names``: how error messages name each video (default ``video 0``, ``video 1``, ...)."""
        pixel_values, grid, stamps = self.video_processor(videos, video_metadata, do_sample_frames, names)
        return _convert({"pixel_values_videos": pixel_values, "video_grid_thw": grid,
                         "video_timestamps": stamps}, return_tensors)


def _convert(out: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
    """Arrays as torch tensors (``"pt"``) or numpy arrays; timestamps stay lists."""
    for key, value in out.items():
        if key == "video_timestamps":
            continue
        if return_tensors == "pt" and isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(value)
        elif return_tensors != "pt" and isinstance(value, torch.Tensor):
            out[key] = value.cpu().numpy()
    return out


__all__ = ["VisionProcessor"]
