"""Videos → ``pixel_values_videos``, ``video_grid_thw`` and slice timestamps, as transformers'
``Glm4vVideoProcessor`` computes them (docs/reference.md §6).

Frame sampling, one ``smart_resize`` for the whole clip, the torchvision resize (transformers' video processor
always uses torchvision), its fused rescale + normalize, temporal pairing and patchify; decoding and sampling
are in :mod:`glm4v_fast.video`, the tensor transforms in :mod:`glm4v_fast.transforms`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..imageio import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_count
from ..transforms import normalize_fused, patchify, resize_uint8
from ..validation import boolean, positive_number
from ..video import frames_to_uint8, load_video, sample_frame_indices, slice_timestamps
from .arguments import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TORCH_RESAMPLE, PixelOptions
from .sizing import DEFAULT_VIDEO_SIZE, smart_resize


def as_video_list(videos: Any) -> list[Any]:
    """One video (a file, a (T, H, W, C) array, a list of frames) or a list of videos as a list of videos."""
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


class VideoProcessor(PixelOptions):
    """Videos → GLM-4V video inputs.

    Args:
        size: the whole-clip pixel budget ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``.
        min_pixels, max_pixels: override the two entries of ``size``.
        fps: frames per second sampled from videos; max_duration: longer clips get ``fps * max_duration`` frames.
        do_sample_frames: sample frames from videos (needs the source fps), as transformers does by default.
        resample, do_resize, do_rescale, rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb,
        patch_size, temporal_patch_size, merge_size: as in transformers' ``Glm4vVideoProcessor``.
        device: torch device the frames are processed on (None: the CPU).
        max_image_pixels: refuse videos whose frames have more pixels; None: no limit.
    """

    DEFAULT_SIZE, SIZE_NAME = DEFAULT_VIDEO_SIZE, "video_size"

    def __init__(self, size: Mapping[str, int] | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, fps: float = 2.0, max_duration: float = 300,
                 do_sample_frames: bool = True, resample: int | str = 3, do_resize: bool = True,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
                 do_convert_rgb: bool = True, patch_size: int = 14, temporal_patch_size: int = 2,
                 merge_size: int = 2, device: Any = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        super().__init__(size, min_pixels, max_pixels, resample, do_resize, do_rescale, rescale_factor,
                         do_normalize, image_mean, image_std, do_convert_rgb, patch_size, temporal_patch_size,
                         merge_size, max_image_pixels)
        self.fps = positive_number(fps, "fps")
        self.max_duration = positive_number(max_duration, "max_duration")
        self.do_sample_frames = boolean(do_sample_frames, "do_sample_frames")
        self.device = device

    def __call__(self, videos: Any, video_metadata: Any = None, do_sample_frames: bool | None = None,
                 names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
        """``(pixel_values_videos, video_grid_thw, video_timestamps)``; ``names``: how error messages name each
        video (default ``video 0``, ``video 1``, ..., files by path)."""
        sample = self.do_sample_frames if do_sample_frames is None else bool(do_sample_frames)
        items = as_video_list(videos)
        names = list(names) if names is not None else [None] * len(items)  # None: "video i", files by path
        if len(names) != len(items):
            raise ValueError(f"got {len(items)} videos but {len(names)} names")
        metadata = self._metadata_list(video_metadata, len(items))
        all_patches, grids, stamps = [], [], []
        for i, (video, meta) in enumerate(zip(items, metadata)):
            if meta is not None and not isinstance(meta, Mapping):
                raise ValueError(f"video_metadata[{i}] must be a dict, got {type(meta).__name__}")
            what = names[i] or f"video {i}"
            frames, fps, indices = self._frames(video, dict(meta or {}), sample, what, names[i])
            patches, grid = self._patches(frames, what)
            all_patches.append(patches)
            grids.append(list(grid))
            stamps.append(slice_timestamps(indices, fps, grid[0], self.temporal_patch_size))
        return torch.cat(all_patches, dim=0), torch.tensor(grids, dtype=torch.int64), stamps

    @staticmethod
    def _metadata_list(video_metadata: Any, count: int) -> list[Any]:
        if video_metadata is None:
            metadata = [None] * count
        elif isinstance(video_metadata, Mapping):
            metadata = [video_metadata]
        elif isinstance(video_metadata, (list, tuple)):
            metadata = list(video_metadata)
        else:
            raise ValueError(f"video_metadata must be a dict or a list of dicts, got {type(video_metadata).__name__}")
        if len(metadata) != count:
            raise ValueError(f"got {count} videos but {len(metadata)} video_metadata entries; "
                             "pass one entry per video")
        return metadata

    def _patches(self, frames: np.ndarray, what: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Resize, normalize and patchify RGB uint8 frames (T, H, W, 3)."""
        t, height, width = frames.shape[:3]
        if self.do_resize:
            # transformers' smart_resize raises for a single unsampled frame; it is padded to a pair anyway.
            h, w = smart_resize(max(t, self.temporal_patch_size), height, width,
                                temporal_factor=self.temporal_patch_size, factor=self.factor,
                                min_pixels=self.size["shortest_edge"], max_pixels=self.size["longest_edge"])
        elif height % self.factor or width % self.factor:
            raise ValueError(f"{what} is {height}x{width}; with do_resize=False both sides must be multiples of "
                             f"patch_size*merge_size={self.factor}")
        else:
            h, w = height, width
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(self.device or "cpu").contiguous()
        x = resize_uint8(x, h, w, self.resample if self.resample in TORCH_RESAMPLE else 3)
        x = normalize_fused(x, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                            self.image_std)
        return patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)

    def _frames(self, video: Any, meta: dict, sample: bool, what: str,
                file_name: str | None) -> tuple[np.ndarray, Any, list]:
        """Decoded (and, when asked, sampled) RGB uint8 frames, the source fps and the source index of each frame.
        ``file_name`` names a video file in decoding errors (None: its path)."""
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

    def to_dict(self) -> dict[str, Any]:
        """The options in transformers' ``video_preprocessor_config.json`` layout."""
        return {"video_processor_type": "Glm4vVideoProcessor", "fps": self.fps, "max_duration": self.max_duration,
                "do_sample_frames": self.do_sample_frames, **self.options_dict()}


__all__ = ["VideoProcessor", "as_video_list"]
