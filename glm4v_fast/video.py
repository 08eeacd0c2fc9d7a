"""Video input for GLM-4V: frame sampling, decoding, in-memory frames and slice timestamps.

Mirrors transformers' ``Glm4vVideoProcessor`` (which needs torchvision) with torch alone:

* :func:`sample_frame_indices` is ``Glm4vVideoProcessor.sample_frames`` (transformers 5.x: at least one frame).
* the resize, rescale + normalize and patchify that videos share with images are in :mod:`glm4v_fast.transforms`
  (re-exported here).

PyAV is optional (``pip install glm4v-fast[video]``) and imported only when a file is decoded.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .imageio import check_local_path
from .transforms import normalize_fused, patchify, resize_uint8
from .validation import is_int, is_number, is_positive_number

#: transformers' ``Glm4vVideoProcessor`` sampling defaults (docs/reference.md §6.1).
DEFAULT_VIDEO_FPS = 2.0
DEFAULT_MAX_DURATION = 300
#: What transformers' ``Glm4vProcessor`` assumes for timestamps when a video's fps is unknown.
FALLBACK_TIMESTAMP_FPS = 24.0



def sample_frame_indices(total_num_frames: int, fps: float, duration: float | None = None,
                         target_fps: float = DEFAULT_VIDEO_FPS,
                         max_duration: float = DEFAULT_MAX_DURATION) -> list[int]:
    """Indices of the frames GLM-4V samples from a clip (docs/reference.md §6.2).

    Args:
        total_num_frames: frames in the source clip.
        fps: the source frame rate (required).
        duration: the clip length in seconds; when missing or 0, ``round((total - 1) / fps) + 1``.
        target_fps: frames per second to sample (the processor's ``fps``, 2 by default).
        max_duration: clips longer than this are sampled with ``int(max_duration * target_fps)`` evenly spread
            timestamps instead.

    Returns:
        Sorted-by-time indices, duplicates removed (first occurrence kept), padded to an even count by repeating
        the last index, as transformers 5.x does (at least one frame is sampled, so at least two are returned).
    """
    if not is_int(total_num_frames):
        raise ValueError(f"total_num_frames must be an integer, got {total_num_frames!r}")
    if total_num_frames <= 0:
        raise ValueError(f"the video has no frames (total_num_frames={total_num_frames})")
    if fps is None:
        raise ValueError("frame sampling needs the source video's fps; pass video_metadata={'fps': ...} "
                         "or disable sampling with do_sample_frames=False")
    if not is_positive_number(fps):
        raise ValueError(f"video fps must be a positive number, got {fps!r}")
    if not is_positive_number(target_fps):
        raise ValueError(f"target fps must be a positive number, got {target_fps!r}")
    if duration is not None and (not is_number(duration) or duration < 0):
        raise ValueError(f"video duration must be a non-negative number of seconds, got {duration!r}")

    last = int(total_num_frames) - 1
    duration = duration or round(last / fps) + 1
    if duration <= max_duration:
        count = max(int(math.floor(duration * target_fps)), 1)
        indices = [min(last, int(math.ceil(i * fps / target_fps))) for i in range(count)]
    else:
        count = int(max_duration * target_fps)
        if count >= total_num_frames:
            indices = list(range(total_num_frames))
        else:
            seconds = np.linspace(0, duration, count, endpoint=True)
            indices = [min(last, int(math.ceil(t * fps))) for t in seconds]

    unique = list(dict.fromkeys(indices))  # dedupe, keeping the first occurrence's order
    if len(unique) % 2:
        unique.append(unique[-1])
    return unique


def load_video(path: str | os.PathLike, target_fps: float | None = DEFAULT_VIDEO_FPS,
               max_duration: float = DEFAULT_MAX_DURATION, do_sample_frames: bool = True,
               metadata: dict | None = None, max_image_pixels: int | None = -1,
               what: str | None = None) -> tuple[np.ndarray, dict]:
    """Decode a video file with PyAV into RGB uint8 frames (T, H, W, 3) and its metadata.

    The metadata comes from the container as in transformers' ``read_video_pyav``: ``fps`` is the stream's
    average rate, ``total_num_frames`` the stream's frame count (counted by decoding when the container does not
    store it, e.g. WebM), ``duration = total_num_frames / fps``. Keys given in ``metadata`` override these.
    With ``do_sample_frames`` only the frames picked by :func:`sample_frame_indices` are kept.

    Decoding cost is bounded before it is paid: the stream's frame size is checked against ``max_image_pixels``
    (default: :data:`glm4v_fast.imageio.DEFAULT_MAX_IMAGE_PIXELS`; None: no limit) from the header, and when the
    container does not store its frame count, the frames are counted from the packets (no decoding) so that only
    the sampled frames are ever held in memory.

    ``what`` names the video in error messages (default: ``video file '<path>'``).

    Returns:
        ``(frames, metadata)``; ``metadata`` has ``fps``, ``duration``, ``total_num_frames`` and
        ``frames_indices`` (the source index of each returned frame).
    """
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("decoding video files needs PyAV: pip install glm4v-fast[video]") from exc
    path = check_local_path(path, "video")
    what = what or f"video file {path!r}"
    try:
        container = av.open(path)
    except Exception as exc:  # PyAV raises its own error classes (av.error.*), all subclasses of Exception
        raise ValueError(f"cannot open {what}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ValueError(f"{what} has no video stream")
        stream = container.streams.video[0]
        from .imageio import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_count

        limit = DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels == -1 else max_image_pixels
        if stream.codec_context.width and stream.codec_context.height:
            check_pixel_count(stream.codec_context.width, stream.codec_context.height, limit,
                              f"{what} frames")
        fps = float(stream.average_rate) if stream.average_rate else None
        total = int(stream.frames or 0)
        if not total and do_sample_frames and not (metadata or {}).get("total_num_frames"):
            # The container does not say (WebM): count packets instead of decoding and keeping every frame.
            try:
                total = sum(1 for packet in container.demux(stream) if packet.size)
            except Exception as exc:
                raise ValueError(f"cannot read {what}: {exc}") from exc
            container.seek(0)
        info = {"fps": fps, "total_num_frames": total or None}
        info.update({k: v for k, v in (metadata or {}).items() if v is not None})
        total, fps = info["total_num_frames"], info["fps"]

        wanted: list[int] | None = None
        if do_sample_frames and total:
            duration = info.get("duration") or (total / fps if fps else None)
            wanted = sample_frame_indices(total, fps, duration, target_fps, max_duration)
        try:
            frames, decoded = _decode(container, stream, None if wanted is None else set(wanted))
        except Exception as exc:
            raise ValueError(f"cannot decode {what}: {exc}") from exc

    if not info["total_num_frames"]:
        info["total_num_frames"] = decoded
    total = info["total_num_frames"]
    if decoded == 0 or total == 0:
        raise ValueError(f"{what} has no frames")
    if not info.get("duration"):
        info["duration"] = total / fps if fps else None
    if do_sample_frames and wanted is None:
        # The frame count was only known after decoding everything; sample from the decoded frames now.
        wanted = sample_frame_indices(total, fps, info["duration"], target_fps, max_duration)
    if wanted is None:
        indices = sorted(frames)
    else:
        # A container may hold fewer frames than its header says; clamp to what was really decoded.
        indices = [min(i, max(frames)) for i in wanted]
    info["frames_indices"] = indices
    return np.stack([frames[i] for i in indices]), info


def _decode(container: Any, stream: Any, wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames in order, keeping those in ``wanted`` (all when None); returns (frames, count decoded)."""
    frames: dict[int, np.ndarray] = {}
    last_needed = max(wanted) if wanted else None
    count = 0
    for i, frame in enumerate(container.decode(stream)):
        count = i + 1
        if wanted is None or i in wanted:
            frames[i] = frame.to_ndarray(format="rgb24")
        if last_needed is not None and i >= last_needed:
            break
    return frames, count


def frames_to_uint8(video: Any, what: str = "video", max_image_pixels: int | None = None,
                    do_convert_rgb: bool = True) -> np.ndarray:
    """An in-memory video as RGB uint8 frames (T, H, W, 3).

    Accepts a numpy array or torch tensor (T, H, W, C) with C in 1, 3, 4 (or (T, C, H, W)), uint8 or float in
    [0, 1], or a sequence of frames (PIL images, numpy arrays or tensors, all of one size). Frames are converted
    exactly like images (:func:`glm4v_fast.imageio.to_rgb_uint8`), so 4-channel frames are blended onto white.
    """
    from .imageio import DEFAULT_MAX_IMAGE_PIXELS, array_to_rgb_uint8, check_pixel_count, to_rgb_uint8

    limit = DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"{what} array must have 4 dimensions (T, H, W, C), got shape {tuple(video.shape)}")
        if video.shape[0] == 0:
            raise ValueError(f"{what} has no frames")
        # (T, C, H, W) when the second axis looks like channels and the last does not.
        if video.shape[1] in (1, 3, 4) and video.shape[-1] not in (1, 3, 4):
            video = np.moveaxis(video, 1, -1)
        frames = list(video)
    elif isinstance(video, Sequence) and not isinstance(video, (str, bytes)):
        frames = list(video)
        if not frames:
            raise ValueError(f"{what} has no frames")
    else:
        raise ValueError(f"{what} has unsupported type {type(video).__name__}; expected a (T, H, W, C) array, "
                         "a list of frames or a file path")
    out = []
    for i, frame in enumerate(frames):
        if isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[-1] in (1, 3, 4):
            # Frames of an array video are channels-last by construction; do not let a 3- or 4-pixel-tall
            # frame be mistaken for channels-first.
            if frame.size:
                check_pixel_count(frame.shape[1], frame.shape[0], limit, f"{what} frame {i}")
            out.append(array_to_rgb_uint8(frame, channels_first=False, what=f"{what} frame {i}",
                                          do_convert_rgb=do_convert_rgb))
        else:
            out.append(to_rgb_uint8(frame, limit, what=f"{what} frame {i}", do_convert_rgb=do_convert_rgb))
    shapes = {f.shape for f in out}
    if len(shapes) != 1:
        raise ValueError(f"{what} frames differ in size: {sorted(shapes)}")
    return np.stack(out)


def slice_timestamps(frames_indices: Sequence[int], fps: float | None, grid_t: int,
                     temporal_patch_size: int = 2) -> list[float]:
    """Seconds of the first frame of each temporal slice (docs/reference.md §6.4).

    ``frames_indices / fps`` taken every ``temporal_patch_size``, padded with the last value (or 0) or truncated to
    ``grid_t`` entries, as transformers' ``Glm4vProcessor`` builds the video prompt. An unknown fps falls back to
    24 like there.
    """
    rate = fps if fps else FALLBACK_TIMESTAMP_FPS
    stamps = [float(i) / rate for i in list(frames_indices)[::temporal_patch_size]][:grid_t]
    while len(stamps) < grid_t:
        stamps.append(stamps[-1] if stamps else 0.0)
    return stamps


__all__ = ["sample_frame_indices", "load_video", "frames_to_uint8", "slice_timestamps", "resize_uint8",
           "normalize_fused", "patchify", "DEFAULT_VIDEO_FPS", "DEFAULT_MAX_DURATION"]
