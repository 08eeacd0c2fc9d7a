"""A request's body -> what the model must encode, within the request's budget (runs in a decode worker thread).

Everything the headers tell is checked for every image before any image is decoded: pixel count, JPEG scans,
aspect ratio, and the request's total patch count. Decoded images are looked up in the embedding cache; the
misses and the videos are preprocessed into one block of pixel rows for the batcher. Videos are checked as they
are decoded (a container's frame size from its header, frames one by one), and their patches count towards the
same --max-patches-per-request.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..imageio import ImageLimits, ImageTooLarge, decode_opened, open_checked
from .cache import EmbeddingCache, image_key
from .protocol import ApiError, b64decode, parse_request, too_large
from .settings import ServeSettings


class Abandoned(Exception):
    """The client went away: stop working on its request."""


class RequestBudget:
    """What one request may still spend: a deadline for decoding, and a flag raised when its client is gone.
    It also carries what the headers asked that parsing must know (`binary`: a safetensors answer)."""

    def __init__(self, deadline: float, binary: bool = False):
        self.deadline, self.binary = deadline, binary
        self.files = 0  # images and video frames this request decodes (against --max-images-per-request)
        self.abandoned = threading.Event()

    def check(self, timeout_s: float) -> None:
        if self.abandoned.is_set():
            raise Abandoned()
        if time.monotonic() > self.deadline:
            raise too_large(f"decoding this request took longer than --decode-timeout {timeout_s:g} s")


@dataclass
class ImageSlot:
    """One image of a request, in request order: answered from the cache, a repeat of an earlier image of the
    same request, or encoded (and then stored in the cache under `cache_key`, when the cache is on)."""

    cached: tuple | None = None     # (embedding, grid row) from the cache
    same_as: int | None = None      # index of an earlier image with the same pixels
    cache_key: bytes | None = None

    @property
    def encoded(self) -> bool:
        return self.cached is None and self.same_as is None


@dataclass(eq=False)
class DecodedRequest:
    """A request after decoding. `pixel_values`/`grid` hold the rows of the encoded images (in request order)
    followed by the videos'; None when the cache answered every image and there is no video."""

    encoding_format: str
    dtype: str
    images: list[ImageSlot] = field(default_factory=list)
    video_timestamps: list = field(default_factory=list)
    pixel_values: torch.Tensor | None = None
    grid: torch.Tensor | None = None

    def answers(self, encoded, cache: EmbeddingCache) -> tuple[list, torch.Tensor, list]:
        """The model's outputs (one per row of `grid`) with the cached and repeated images, in request order:
        (image embeddings, image grid (K, 3), [(video embedding, grid row, timestamps)]). Freshly encoded images
        are stored in the cache."""
        rows = self.grid.tolist() if self.grid is not None else []
        fresh = iter(zip(encoded, rows))
        embeddings, grids = [], []
        for slot in self.images:
            if slot.cached is not None:
                emb, grid = slot.cached[0], list(slot.cached[1])
            elif slot.same_as is not None:
                emb, grid = embeddings[slot.same_as], grids[slot.same_as]
            else:
                emb, grid = next(fresh)
                if slot.cache_key is not None:
                    # A copy: the encoded rows are a view of the whole batch's output, which the cache must not keep.
                    cache.put(slot.cache_key, emb.clone(), grid)
            embeddings.append(emb)
            grids.append(grid)
        videos = [(emb, grid, stamps) for (emb, grid), stamps in zip(fresh, self.video_timestamps)]
        image_grid = torch.tensor(grids, dtype=torch.int64).reshape(len(grids), 3)
        return embeddings, image_grid, videos


def _image_error(exc: ValueError, settings: ServeSettings) -> ApiError:
    if isinstance(exc, ImageTooLarge):
        return too_large(f"{exc} (server limits: --max-image-pixels {settings.max_image_pixels}, "
                         f"--max-jpeg-scans {settings.max_jpeg_scans})")
    return ApiError(400, str(exc))


class RequestDecoder:
    """Parses, checks and decodes requests for one service: its processor, limits and embedding cache."""

    def __init__(self, processor, settings: ServeSettings, cache: EmbeddingCache, fingerprint: bytes):
        self.processor, self.settings, self.cache, self.fingerprint = processor, settings, cache, fingerprint
        self.limits = ImageLimits(settings.max_image_pixels, settings.max_jpeg_scans)

    def decode(self, body: bytes, budget: RequestBudget | None = None) -> DecodedRequest:
        """Body -> DecodedRequest (an ImageSlot per image in request order, pixel rows to encode); ApiError on
        bad input or a spent budget."""
        settings = self.settings
        budget = budget or RequestBudget(time.monotonic() + settings.decode_timeout_s)
        timeout = settings.decode_timeout_s
        request = parse_request(body, settings.max_images_per_request, budget.binary)
        del body
        items, request.images = request.images, None
        name = request.images_field
        decoded = DecodedRequest(request.encoding_format, request.dtype)
        # Images and video frames decoded so far or announced (a container counts once until it is probed).
        budget.files = len(items) + sum(1 if isinstance(v, str) else len(v["frames"]) for v in request.videos)
        opened = []
        try:
            patches = 0
            patch = self.processor.patch_size
            for i in range(len(items)):
                budget.check(timeout)
                what = f"{name}[{i}]"
                raw = b64decode(items[i], what)
                items[i] = None  # the base64 text is not needed any more
                try:
                    image, (resized_h, resized_w) = open_checked(raw, self.limits, what,
                                                                 check_size=self.processor.resized_size)
                except ValueError as exc:  # bad header, over a limit, or an aspect ratio smart_resize refuses
                    raise _image_error(exc, settings) from None
                opened.append(image)
                patches += (resized_h // patch) * (resized_w // patch)
                if patches > settings.max_patches_per_request:
                    raise too_large(f"request needs more than --max-patches-per-request "
                                    f"{settings.max_patches_per_request} patches (at least {patches} after "
                                    f"{name}[0..{i}])")
            images, decoded.images = self._look_up(opened, name, budget)
            pixel_values, grids = [], []
            if images:
                budget.check(timeout)
                try:
                    out = self.processor(images=images, return_tensors="pt")
                except ValueError as exc:
                    raise ApiError(400, str(exc)) from None
                finally:
                    del images
                pixel_values.append(out["pixel_values"])
                grids.append(out["image_grid_thw"])
                del out
            for j, video in enumerate(request.videos):
                budget.check(timeout)
                request.videos[j] = None
                out = self._video(video, f"videos[{j}]", budget)
                patches += int(out["video_grid_thw"].prod(-1).sum())
                if patches > settings.max_patches_per_request:
                    raise too_large(f"request needs more than --max-patches-per-request "
                                    f"{settings.max_patches_per_request} patches ({patches} after videos[0..{j}])")
                pixel_values.append(out["pixel_values_videos"])
                grids.append(out["video_grid_thw"])
                decoded.video_timestamps.append(out["video_timestamps"][0])
                del out
            budget.check(timeout)
        finally:
            for image in opened:
                if image is not None:
                    image.close()
        if pixel_values:
            decoded.pixel_values = torch.cat(pixel_values) if len(pixel_values) > 1 else pixel_values[0]
            decoded.grid = torch.cat(grids)
        return decoded

    def _look_up(self, opened: list, name: str, budget: RequestBudget) -> tuple[list, list[ImageSlot]]:
        """Decode the opened images one by one and look each up in the cache (and among the request's earlier
        images): (the decoded images that must be encoded, an ImageSlot per image in request order)."""
        images, slots = [], []
        first_of_key: dict[bytes, int] = {}
        for i in range(len(opened)):
            budget.check(self.settings.decode_timeout_s)
            image, opened[i] = opened[i], None
            try:
                image = decode_opened(image, f"{name}[{i}]", self.settings.max_image_pixels)
            except ValueError as exc:
                raise _image_error(exc, self.settings) from None
            if not self.cache.enabled:
                images.append(image)
                slots.append(ImageSlot())
                continue
            key = image_key(self.fingerprint, image)
            if key in first_of_key:        # the same pixels twice in one request: encoded once
                slots.append(ImageSlot(same_as=first_of_key[key]))
                image.close()
                continue
            first_of_key[key] = i
            hit = self.cache.get(key)
            if hit is not None:
                slots.append(ImageSlot(cached=hit))
                image.close()
            else:
                slots.append(ImageSlot(cache_key=key))
                images.append(image)
        return images, slots

    def _video(self, video, what: str, budget: RequestBudget) -> dict:
        """One video of a request -> the processor's output for it. A container file is decoded with PyAV from a
        private temporary file (glm4v_fast.video reads paths); frames are decoded like images, with their limits."""
        settings = self.settings
        try:
            if isinstance(video, str):
                raw = b64decode(video, what)
                with tempfile.TemporaryDirectory(prefix="glm4v-video-") as tmp:
                    path = os.path.join(tmp, "video")
                    with open(path, "wb") as f:
                        f.write(raw)
                    del raw
                    self._check_video_frames(path, what, budget)
                    return self.processor.video_inputs([path], names=[what])
            frames = []
            for i, text in enumerate(video["frames"]):
                budget.check(settings.decode_timeout_s)
                frame_what = f"{what}.frames[{i}]"
                image, _ = open_checked(b64decode(text, frame_what), self.limits, frame_what)
                image = decode_opened(image, frame_what, settings.max_image_pixels)
                frames.append(np.asarray(image))
                image.close()
                if frames[-1].shape != frames[0].shape:
                    raise ValueError(f"{frame_what} is {frames[-1].shape[1]}x{frames[-1].shape[0]}, but "
                                     f"{what}.frames[0] is {frames[0].shape[1]}x{frames[0].shape[0]}: the frames "
                                     "of a video have one size")
            return self.processor.video_inputs([np.stack(frames)], [{"fps": float(video["fps"])}], names=[what])
        except ImportError as exc:  # PyAV missing on the server
            raise ApiError(501, f"{what}: this server cannot decode video files ({exc}); send frames instead",
                           "not_implemented") from None
        except ValueError as exc:
            raise _image_error(exc, settings) from None

    def _check_video_frames(self, path: str, what: str, budget: RequestBudget) -> None:
        """Count the frames a video file will be sampled to, from its header (or its packets: no decoding), against
        --max-images-per-request, before any frame is decoded: each decoded frame is held in memory like an image.
        A file this cannot read is left to the decoder, which reports it."""
        try:
            import av
        except ImportError:
            return  # the decoder reports it
        from ..video import sample_frame_indices

        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate) if stream.average_rate else None
                total = int(stream.frames or 0) or sum(1 for packet in container.demux(stream) if packet.size)
        except Exception:  # not a video, no video stream, corrupt: the decoder says which
            return
        if not (fps and total):
            return
        frames = len(sample_frame_indices(total, fps, total / fps, self.processor.fps, self.processor.max_duration))
        budget.files += frames - 1
        limit = self.settings.max_images_per_request
        if budget.files > limit:
            raise too_large(f"{what} is sampled to {frames} frames: with the request's other images and frames "
                            f"that is {budget.files}, more than --max-images-per-request {limit}")
