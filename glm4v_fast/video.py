"""Video preprocessing for GLM-4V: frame sampling, decoding, and the torch resize / normalize / patchify path.

Mirrors transformers' ``Glm4vVideoProcessor`` (which needs torchvision) with torch alone:

* :func:`sample_frame_indices` is ``Glm4vVideoProcessor.sample_frames`` (transformers 5.x: at least one frame).
* :func:`resize_uint8` is ``torchvision.transforms.v2.functional.resize`` for uint8 images with bicubic
  interpolation and antialiasing: on CPU torchvision hands the uint8 tensor straight to
  ``torch.nn.functional.interpolate`` (torch has a native uint8 kernel there); on other devices it converts to
  float32, interpolates, clamps to [0, 255], rounds and converts back. Both branches are reproduced.
* :func:`normalize_fused` is transformers' fused rescale + normalize: ``(x - mean/rescale) / (std/rescale)`` in
  float32.
* :func:`patchify` pairs frames (the last frame repeated when the count is odd) and lays patches out in the
  spatial-merge order of docs/reference.md §6.3.

PyAV is optional (``pip install glm4v-fast[video]``) and imported only when a file is decoded.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: transformers' ``Glm4vVideoProcessor`` sampling defaults (docs/reference.md §6.1).
DEFAULT_VIDEO_FPS = 2.0
DEFAULT_MAX_DURATION = 300
#: What transformers' ``Glm4vProcessor`` assumes for timestamps when a video's fps is unknown.
FALLBACK_TIMESTAMP_FPS = 24.0

# torch interpolate modes for the PIL resample codes a torch-path resize supports.
_TORCH_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


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
    if isinstance(total_num_frames, bool) or not isinstance(total_num_frames, (int, np.integer)):
        raise ValueError(f"total_num_frames must be an int, got {total_num_frames!r}")
    if total_num_frames <= 0:
        raise ValueError(f"the video has no frames (total_num_frames={total_num_frames})")
    if fps is None:
        raise ValueError("frame sampling needs the source video's fps; pass video_metadata={'fps': ...} "
                         "or disable sampling with do_sample_frames=False")
    if not _positive_finite(fps):
        raise ValueError(f"video fps must be a positive number, got {fps!r}")
    if not _positive_finite(target_fps):
        raise ValueError(f"target fps must be a positive number, got {target_fps!r}")
    if duration is not None and (not math.isfinite(duration) or duration < 0):
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


def _positive_finite(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def load_video(path: str | os.PathLike, target_fps: float | None = DEFAULT_VIDEO_FPS,
               max_duration: float = DEFAULT_MAX_DURATION, do_sample_frames: bool = True,
               metadata: dict | None = None, max_image_pixels: int | None = -1) -> tuple[np.ndarray, dict]:
    """Decode a video file with PyAV into RGB uint8 frames (T, H, W, 3) and its metadata.

    The metadata comes from the container as in transformers' ``read_video_pyav``: ``fps`` is the stream's
    average rate, ``total_num_frames`` the stream's frame count (counted by decoding when the container does not
    store it, e.g. WebM), ``duration = total_num_frames / fps``. Keys given in ``metadata`` override these.
    With ``do_sample_frames`` only the frames picked by :func:`sample_frame_indices` are kept.

    Decoding cost is bounded before it is paid: the stream's frame size is checked against ``max_image_pixels``
    (default: :data:`glm4v_fast.imageio.DEFAULT_MAX_IMAGE_PIXELS`; None: no limit) from the header, and when the
    container does not store its frame count, the frames are counted from the packets (no decoding) so that only
    the sampled frames are ever held in memory.

    Returns:
        ``(frames, metadata)``; ``metadata`` has ``fps``, ``duration``, ``total_num_frames`` and
        ``frames_indices`` (the source index of each returned frame).
    """
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("decoding video files needs PyAV: pip install glm4v-fast[video]") from exc
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path!r}")
    try:
        container = av.open(path)
    except Exception as exc:  # PyAV raises its own error classes (av.error.*), all subclasses of Exception
        raise ValueError(f"cannot open video file {path!r}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ValueError(f"video file {path!r} has no video stream")
        stream = container.streams.video[0]
        from .imageio import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_count

        limit = DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels == -1 else max_image_pixels
        if stream.codec_context.width and stream.codec_context.height:
            check_pixel_count(stream.codec_context.width, stream.codec_context.height, limit,
                              f"video file {path!r} frames")
        fps = float(stream.average_rate) if stream.average_rate else None
        total = int(stream.frames or 0)
        if not total and do_sample_frames and not (metadata or {}).get("total_num_frames"):
            # The container does not say (WebM): count packets instead of decoding and keeping every frame.
            try:
                total = sum(1 for packet in container.demux(stream) if packet.size)
            except Exception as exc:
                raise ValueError(f"cannot read video file {path!r}: {exc}") from exc
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
            raise ValueError(f"cannot decode video file {path!r}: {exc}") from exc

    if not info["total_num_frames"]:
        info["total_num_frames"] = decoded
    total = info["total_num_frames"]
    if decoded == 0 or total == 0:
        raise ValueError(f"video file {path!r} has no frames")
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


def resize_uint8(images: torch.Tensor, height: int, width: int, resample: int = 3,
                 native: bool | None = None) -> torch.Tensor:
    """Resize uint8 images (N, C, H, W) like torchvision's v2 ``resize`` with ``antialias=True``.

    Same size returns the input. On CPU, bicubic goes through torch's native uint8 kernel (as torchvision does
    there); elsewhere the images are converted to float32, interpolated, clamped to [0, 255] (bicubic overshoots),
    rounded and converted back to uint8. ``resample`` is a PIL code: 0 nearest, 2 bilinear, 3 bicubic.
    ``native`` forces one of the two branches (None: torchvision's choice for the tensor's device). The two
    differ by a few uint8 levels at most on natural images (more on pixel noise, where bicubic overshoot is
    clipped at a different stage).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"resize_uint8 expects a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    if resample not in _TORCH_MODES:
        raise ValueError(f"the torch resize supports resample 0 (nearest), 2 (bilinear), 3 (bicubic); got {resample}")
    if tuple(images.shape[-2:]) == (height, width):
        return images
    mode = _TORCH_MODES[resample]
    smooth = mode in ("bilinear", "bicubic")
    kwargs = {"align_corners": False, "antialias": True} if smooth else {}
    if native is None:
        native = mode == "nearest-exact" or (images.device.type == "cpu" and (
            mode == "bicubic" or (mode == "bilinear" and "AVX2" in torch.backends.cpu.get_cpu_capability())))
    if native:
        return torch.nn.functional.interpolate(images, size=(height, width), mode=mode, **kwargs)
    out = torch.nn.functional.interpolate(images.float(), size=(height, width), mode=mode, **kwargs)
    if mode == "bicubic":
        out = out.clamp_(0, 255)
    return out.round_().to(torch.uint8)


def normalize_fused(images: torch.Tensor, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                    mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """transformers' torchvision-backend rescale + normalize of uint8 images (..., C, H, W) → float32.

    With both steps on, it is one normalize with mean and std divided by ``rescale_factor`` (computed in float32
    as ``tensor(mean) * (1 / rescale_factor)``), i.e. ``(x - 255 mean) / (255 std)`` for the default factor.
    """
    x = images.to(torch.float32)
    if do_normalize:
        mean_t = torch.tensor(list(mean), dtype=torch.float32, device=x.device)
        std_t = torch.tensor(list(std), dtype=torch.float32, device=x.device)
        if do_rescale:
            mean_t = mean_t * (1.0 / rescale_factor)
            std_t = std_t * (1.0 / rescale_factor)
        return x.sub_(mean_t[:, None, None]).div_(std_t[:, None, None])
    if do_rescale:
        return x * rescale_factor
    return x


def patchify(frames: torch.Tensor, patch_size: int = 14, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flatten frames (T, C, H, W) into patches (gt*gh*gw, C*tp*p*p) in GLM-4V order (docs/reference.md §6.3).

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame. Rows run over temporal
    slices, then 2x2 merge blocks in raster order, then the 4 patches inside a block; each row is
    (C, tp, p, p) flattened. Returns the patches and ``(gt, gh, gw)``.
    """
    t, c, h, w = frames.shape
    if h % (patch_size * merge_size) or w % (patch_size * merge_size):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size*merge_size="
                         f"{patch_size * merge_size}")
    if pad := -t % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    # (gt, tp, C, bh, mh, ph, bw, mw, pw) -> (gt, bh, bw, mh, mw, C, tp, ph, pw)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


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
