"""The Starlette app: POST /v1/embeddings, GET /health, GET /metrics.

Request path (the event loop only awaits; CPU work runs in threads):
    read the body (capped, timed) -> admit (or 503) -> [decode pool] parse JSON strictly, check every image's
    header against the per-request budgets, decode, look each image up in the embedding cache, preprocess the
    misses and the videos -> DynamicBatcher (model on its worker thread) -> [thread] serialise the response
    (JSON in small pieces, or a safetensors body when the Accept header asks for one).

Work that cannot pay off is dropped: a request whose client has gone is not decoded or encoded further, and one
that waited past --decode-timeout for a decoder is answered 503 without being decoded.

Every client mistake becomes a 4xx with a JSON body `{"error": {"message", "type"}}`; a 500 means a bug or a
device failure, never bad input.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..imageio import ImageTooLarge, decode_opened, image_size, open_image
from .cache import EmbeddingCache, image_key, settings_fingerprint
from .batcher import DynamicBatcher, EncodeFailed, Job, QueueFull, ShuttingDown
from .metrics import ServerMetrics
from .settings import ServeSettings

logger = logging.getLogger("glm4v_fast.serving")

ENCODING_FORMATS = ("float", "base64")
_WHITESPACE = b" \t\r\n"
# Serialising is done in pieces of about this many floats, so that no single C call (which holds the GIL, and so
# stalls the event loop) runs long: a whole 12k x 1536 embedding in one json.dumps takes seconds.
_FLOATS_PER_PIECE = 1 << 15


class ApiError(Exception):
    """A client-visible error: HTTP status, OpenAI-style error type, message, extra headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type}}, status_code=self.status,
                            headers=self.headers)


class _Abandoned(Exception):
    """The client went away: stop working on its request."""


def _too_large(message: str) -> ApiError:
    return ApiError(413, message, "request_too_large")


# ---------------------------------------------------------------------------------------------------------------
# The request: parsing and validation (runs in a decode worker thread)
# ---------------------------------------------------------------------------------------------------------------
#: Every field a request may carry; any other is refused with 400 naming it (a misspelt option must not be ignored).
#: `model` and `user` are accepted (and ignored) because OpenAI clients always send them.
REQUEST_FIELDS = ("images", "input", "videos", "encoding_format", "dtype", "model", "user")
#: dtypes of binary answers (base64 and safetensors): little-endian raw values; bfloat16 as its 16-bit pattern.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The Accept value that asks for a safetensors body instead of JSON.
SAFETENSORS_MEDIA_TYPE = "application/vnd.safetensors"
_VIDEO_FIELDS = ("frames", "fps")
# A URL scheme ("http:", "file:", "s3:", "C:" of a Windows path): base64 never contains ":".
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}:")


@dataclass
class EmbeddingRequest:
    """A parsed /v1/embeddings body. `videos` items are base64 container files (str) or {"frames", "fps"}."""

    images: list
    videos: list = field(default_factory=list)
    encoding_format: str = "float"
    dtype: str = "float32"
    images_field: str = "images"   # or "input": error messages name the field the client used


def _no_fetching(what: str, kind: str) -> ApiError:
    return ApiError(400, f"{what} looks like a {kind}; the server fetches and reads nothing (that would let "
                         "clients reach its network and files): send the file's bytes as base64 or as a "
                         "data:<mime>;base64,<data> URL")


def _b64decode(text: str, what: str) -> bytes:
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{what} is a data: URL without ';base64,' data")
    elif _SCHEME.match(text):
        raise _no_fetching(what, f"URL ({text[:48]!r})")
    try:
        data = text.encode("ascii")
        # validate=True rejects stray characters instead of silently skipping them. Line breaks (MIME-style
        # base64) are legitimate: dropped first with one C pass (splitting on them would build a string per piece).
        raw = base64.b64decode(data.translate(None, _WHITESPACE), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        # "cat.png", "./x/y.jpg", "~/a", "C:\\a.png": '.', '~' and '\\' are not base64 characters.
        if len(text) < 4096 and (text.startswith("~") or "\\" in text or re.search(r"\.[A-Za-z0-9]{1,5}$", text)):
            raise _no_fetching(what, f"file path ({text[:48]!r})") from None
        if isinstance(exc, UnicodeEncodeError):
            raise ApiError(400, f"{what} is not valid base64: it has non-ASCII characters") from None
        raise ApiError(400, f"{what} is not valid base64: {exc}") from None
    if not raw:
        raise ApiError(400, f"{what} is empty")
    return raw


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _parse_videos(videos) -> tuple[list, int]:
    """Validate `videos`; returns them and how many encoded files (containers and frames) they carry."""
    if not isinstance(videos, list):
        raise ApiError(400, f"'videos' must be a list, got {type(videos).__name__}")
    files = 0
    for j, video in enumerate(videos):
        what = f"videos[{j}]"
        if isinstance(video, str):
            files += 1
            continue
        if not isinstance(video, dict):
            raise ApiError(400, f"{what} must be a base64 video file or an object {{\"frames\": [base64 images], "
                                f"\"fps\": N}}, got {type(video).__name__}")
        unknown = [k for k in video if k not in _VIDEO_FIELDS]
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r} in {what}; a video object has {list(_VIDEO_FIELDS)}")
        frames = video.get("frames")
        if not isinstance(frames, list) or not frames:
            raise ApiError(400, f"{what}.frames must be a non-empty list of base64 images")
        for i, frame in enumerate(frames):
            if not isinstance(frame, str):
                raise ApiError(400, f"{what}.frames[{i}] must be a base64 string or a data: URL, "
                                    f"got {type(frame).__name__}")
        if not _positive_number(video.get("fps")):
            raise ApiError(400, f"{what}.fps must be a positive number (the frames' rate, used to sample them at "
                                f"the processor's rate and to time the answer), got {video.get('fps')!r}")
        files += len(frames)
    return videos, files


def parse_request(body: bytes, max_images: int = 64, binary: bool = False) -> EmbeddingRequest:
    """The JSON body -> EmbeddingRequest, or ApiError 400/413. `binary`: the answer will be a safetensors body."""
    # A valid request has a handful of JSON values per image; a body of millions of tiny values (`[0,0,0,...]`)
    # would cost seconds and gigabytes to parse. Commas and brackets bound the value count; counting them is cheap.
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > 4 * max_images + 256:
        raise _too_large(f"request body has about {values} JSON values; a request carries at most "
                         f"--max-images-per-request {max_images} images and a few fields")
    try:
        payload = json.loads(body)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, and integer literals over Python's digit limit
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(payload).__name__}")
    unknown = [k for k in payload if k not in REQUEST_FIELDS]
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; a request may have {list(REQUEST_FIELDS)}")
    if "images" in payload and "input" in payload:
        raise ApiError(400, "give 'images' or its alias 'input', not both")
    key = "input" if "input" in payload else "images"
    videos, video_files = _parse_videos(payload.get("videos", []))
    if key not in payload and not videos:
        raise ApiError(400, "missing field 'images' (a list of base64 strings or data: URLs; alias 'input') "
                            "or 'videos'")
    images = payload.get(key, [])
    if key == "input" and isinstance(images, str):
        images = [images]  # OpenAI's `input` may be a single item
    if not isinstance(images, list):
        raise ApiError(400, f"{key!r} must be a list of base64 strings, got {type(images).__name__}")
    if not images and not videos:
        raise ApiError(400, f"{key!r} is empty")
    if len(images) + video_files > max_images:
        videos_part = f" and {video_files} video files or frames" if videos else ""
        raise _too_large(f"request has {len(images)} images{videos_part}, more than --max-images-per-request "
                         f"{max_images}")
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise ApiError(400, f"{key}[{i}] must be a base64 string or a data: URL, got {type(item).__name__}")
    fmt = payload.get("encoding_format", "float")
    if fmt not in ENCODING_FORMATS:
        raise ApiError(400, f"'encoding_format' must be one of {ENCODING_FORMATS}, got {fmt!r}")
    dtype = payload.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ApiError(400, f"'dtype' must be one of {tuple(DTYPES)}, got {dtype!r}")
    if dtype != "float32" and fmt == "float" and not binary:
        raise ApiError(400, f"'dtype' {dtype!r} needs \"encoding_format\": \"base64\" (or Accept: "
                            f"{SAFETENSORS_MEDIA_TYPE}); JSON numbers are float32 values")
    return EmbeddingRequest(images, videos, fmt, dtype, key)


def _image_error(exc: ValueError, settings: ServeSettings) -> ApiError:
    if isinstance(exc, ImageTooLarge):
        return _too_large(f"{exc} (server limits: --max-image-pixels {settings.max_image_pixels}, "
                          f"--max-jpeg-scans {settings.max_jpeg_scans})")
    return ApiError(400, str(exc))


class _RequestBudget:
    """What one request may still spend: a deadline for decoding, and a flag raised when its client is gone.
    It also carries what the headers asked that parsing must know (`binary`: a safetensors answer)."""

    def __init__(self, deadline: float, binary: bool = False):
        self.deadline, self.binary = deadline, binary
        self.files = 0  # images and video frames this request decodes (against --max-images-per-request)
        self.abandoned = threading.Event()

    def check(self, timeout_s: float) -> None:
        if self.abandoned.is_set():
            raise _Abandoned()
        if time.monotonic() > self.deadline:
            raise _too_large(f"decoding this request took longer than --decode-timeout {timeout_s:g} s")


@dataclass(eq=False)
class Prepared:
    """A request after decoding: what the model must encode, what the cache already had.

    `pixel_values`/`grid` hold the rows of the images in `encode` (request indices, in order) followed by the
    videos'; `cached[i]` is an (embedding, grid) from the cache; `same_as[i]` an earlier index of identical pixels;
    `keys[i]` the cache key under which a freshly encoded image is stored.
    """

    encoding_format: str
    dtype: str
    num_images: int
    encode: list = field(default_factory=list)
    cached: dict = field(default_factory=dict)
    same_as: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    videos: int = 0
    timestamps: list = field(default_factory=list)
    pixel_values: torch.Tensor | None = None
    grid: torch.Tensor | None = None


def wants_safetensors(accept: str) -> bool:
    """True when an Accept header asks for the safetensors answer (JSON stays the default)."""
    return any(part.split(";")[0].strip().lower() == SAFETENSORS_MEDIA_TYPE for part in accept.split(","))


def _raw_bytes(emb: torch.Tensor, dtype: str) -> bytes:
    """Little-endian raw values of `emb` in `dtype` (bfloat16: its 16-bit pattern, round-to-nearest-even)."""
    if dtype == "float32":
        return emb.numpy().astype("<f4", copy=False).tobytes()
    if dtype == "float16":
        return emb.numpy().astype("<f2").tobytes()
    return emb.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2", copy=False).tobytes()


# ---------------------------------------------------------------------------------------------------------------
# The service: model + processor + batcher
# ---------------------------------------------------------------------------------------------------------------
class EmbeddingService:
    """Holds the model, the processor, the decode pool and the batcher; the app's routes call it."""

    def __init__(self, model, processor, settings: ServeSettings | None = None, model_name: str = "glm4v-vision",
                 metrics: ServerMetrics | None = None):
        self.settings = settings = settings or ServeSettings()
        settings.validate()
        self.model, self.processor, self.model_name = model, processor, model_name
        self.metrics = metrics or ServerMetrics()
        self.cache = EmbeddingCache(settings.cache_bytes, self.metrics)
        # What besides the pixels decides an embedding: the processor's settings and the model's.
        self._fingerprint = settings_fingerprint(processor.to_dict(), model_name, str(model.dtype),
                                                 model.config.out_hidden_size)
        self.draining = False
        self.batcher = DynamicBatcher(self._encode, model.config.merge_unit, settings.max_batch_tokens,
                                      settings.max_wait_ms / 1000.0, settings.max_queue, self.metrics)
        self._decode_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._waiting_lock = threading.Lock()
        self._waiting: dict[int, float] = {}   # requests waiting for a decode worker: id -> since when
        self._decoding = 0                     # requests a decode worker is busy with

    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, grid_thw)

    def start(self) -> None:
        if self._decode_pool is None:
            self._decode_pool = concurrent.futures.ThreadPoolExecutor(self.settings.decode_threads,
                                                                      thread_name_prefix="glm4v-decode")
        self.batcher.start()

    def start_draining(self) -> None:
        """New requests get 503 from now on; admitted ones still complete."""
        self.draining = True

    def stop(self) -> bool:
        self.draining = True
        drained = self.batcher.join(self.settings.drain_timeout_s)
        if not drained:
            logger.error("requests were still being encoded after %.0f s of draining",
                         self.settings.drain_timeout_s)
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
        return drained

    # -------------------------------------------------------------- load
    def load(self) -> dict:
        """Where requests are: waiting for a decoder, being decoded, admitted in all (decoding or queued)."""
        now = time.monotonic()
        with self._waiting_lock:
            oldest = min(self._waiting.values(), default=now)
            waiting = len(self._waiting)
        return {"admitted": self.batcher.depth, "decode_waiting": waiting, "decoding": self._decoding,
                "oldest_decode_wait_s": round(now - oldest, 3)}

    def overloaded(self, load: dict) -> str | None:
        """Why the server should not be sent more work now (None when it can take it)."""
        if load["admitted"] >= self.settings.max_queue:
            return f"{load['admitted']} requests admitted (--max-queue {self.settings.max_queue})"
        if load["oldest_decode_wait_s"] > self.settings.overload_wait_s:
            return (f"a request has waited {load['oldest_decode_wait_s']:.1f} s for a decoder "
                    f"(--overload-wait {self.settings.overload_wait_s:g} s)")
        return None

    def health_response(self) -> JSONResponse:
        """200 when the server takes work; 503 while draining or overloaded (a load balancer should wait)."""
        model = self.model
        load = self.load()
        overload = self.overloaded(load)
        status = "draining" if self.draining else "overloaded" if overload else "ok"
        body = {"status": status, "model": self.model_name, "device": str(model.device),
                "dtype": str(model.dtype).removeprefix("torch."), "out_hidden_size": model.config.out_hidden_size,
                "queue_depth": load["admitted"], **load}
        if overload:
            body["overload"] = overload
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    def metrics_response(self) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def handle(self, request: Request) -> Response:
        """One request to any route, errors rendered as JSON: for hosts that hand over Starlette requests
        without running the app (Ray Serve)."""
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/v1/embeddings": ("POST", self.embeddings), "/health": ("GET", None), "/metrics": ("GET", None)}
        if path not in routes:
            return ApiError(404, "Not Found", "not_found").response()
        if method != routes[path][0]:
            return ApiError(405, "Method Not Allowed", "method_not_allowed").response()
        if path == "/health":
            return self.health_response()
        if path == "/metrics":
            return self.metrics_response()
        try:
            return await self.embeddings(request)
        except ApiError as exc:
            return exc.response()

    # -------------------------------------------------------------- request work
    def prepare(self, body: bytes, budget: _RequestBudget | None = None) -> Prepared:
        """Body -> Prepared (pixels of what must be encoded, cached embeddings, grids); ApiError on bad input.
        Runs in a thread.

        Everything the headers tell is checked for every image before any image is decoded: pixel count, JPEG
        scans, aspect ratio, and the request's total patch count. Videos are checked as they are decoded (a
        container's frame size from its header, frames one by one), and their patches count towards the same
        --max-patches-per-request.
        """
        settings = self.settings
        budget = budget or _RequestBudget(time.monotonic() + settings.decode_timeout_s)
        timeout = settings.decode_timeout_s
        request = parse_request(body, settings.max_images_per_request, budget.binary)
        del body
        items, request.images = request.images, None
        name = request.images_field
        prep = Prepared(request.encoding_format, request.dtype, len(items))
        # Images and video frames decoded so far or announced (a container counts once until it is probed).
        budget.files = len(items) + sum(1 if isinstance(v, str) else len(v["frames"]) for v in request.videos)
        opened = []
        try:
            patches = 0
            patch = self.processor.patch_size
            for i in range(len(items)):
                budget.check(timeout)
                what = f"{name}[{i}]"
                raw = _b64decode(items[i], what)
                items[i] = None  # the base64 text is not needed any more
                try:
                    opened.append(open_image(raw, what, settings.max_image_pixels, settings.max_jpeg_scans))
                    width, height = image_size(opened[-1])
                    resized_h, resized_w = self.processor.resized_size(height, width)
                except ValueError as exc:  # bad header, over a limit, or an aspect ratio smart_resize refuses
                    raise _image_error(exc, settings) from None
                patches += (resized_h // patch) * (resized_w // patch)
                if patches > settings.max_patches_per_request:
                    raise _too_large(f"request needs more than --max-patches-per-request "
                                     f"{settings.max_patches_per_request} patches (at least {patches} after "
                                     f"{name}[0..{i}])")
            images = []
            first_of_key: dict[bytes, int] = {}
            for i in range(len(opened)):
                budget.check(timeout)
                image, opened[i] = opened[i], None
                try:
                    image = decode_opened(image, f"{name}[{i}]", settings.max_image_pixels)
                except ValueError as exc:
                    raise _image_error(exc, settings) from None
                if not self.cache.enabled:
                    images.append(image)
                    prep.encode.append(i)
                    continue
                key = image_key(self._fingerprint, image)
                if key in first_of_key:        # the same pixels twice in one request: encoded once
                    prep.same_as[i] = first_of_key[key]
                    image.close()
                    continue
                first_of_key[key] = i
                hit = self.cache.get(key)
                if hit is not None:
                    prep.cached[i] = hit
                    image.close()
                else:
                    prep.keys[i] = key
                    images.append(image)
                    prep.encode.append(i)
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
                out = self._prepare_video(video, f"videos[{j}]", budget)
                patches += int(out["video_grid_thw"].prod(-1).sum())
                if patches > settings.max_patches_per_request:
                    raise _too_large(f"request needs more than --max-patches-per-request "
                                     f"{settings.max_patches_per_request} patches ({patches} after videos[0..{j}])")
                pixel_values.append(out["pixel_values_videos"])
                grids.append(out["video_grid_thw"])
                prep.timestamps.append(out["video_timestamps"][0])
                prep.videos += 1
                del out
            budget.check(timeout)
        finally:
            for image in opened:
                if image is not None:
                    image.close()
        if pixel_values:
            prep.pixel_values = torch.cat(pixel_values) if len(pixel_values) > 1 else pixel_values[0]
            prep.grid = torch.cat(grids)
        return prep

    def _prepare_video(self, video, what: str, budget: _RequestBudget) -> dict:
        """One video of a request -> the processor's output for it. A container file is decoded with PyAV from a
        private temporary file (glm4v_fast.video reads paths); frames are decoded like images, with their limits."""
        settings = self.settings
        try:
            if isinstance(video, str):
                raw = _b64decode(video, what)
                with tempfile.TemporaryDirectory(prefix="glm4v-video-") as tmp:
                    path = os.path.join(tmp, "video")
                    with open(path, "wb") as f:
                        f.write(raw)
                    del raw
                    self._check_video_frames(path, what, budget)
                    try:
                        return self.processor(videos=[path], return_tensors="pt")
                    except ValueError as exc:  # messages name the temporary file: name the request's field
                        message = str(exc).replace(f"video file {path!r}", what).replace(path, what)
                        raise type(exc)(message.replace("video 0", what)) from None
            frames = []
            for i, text in enumerate(video["frames"]):
                budget.check(settings.decode_timeout_s)
                frame_what = f"{what}.frames[{i}]"
                image = open_image(_b64decode(text, frame_what), frame_what, settings.max_image_pixels,
                                   settings.max_jpeg_scans)
                image = decode_opened(image, frame_what, settings.max_image_pixels)
                frames.append(np.asarray(image))
                image.close()
                if frames[-1].shape != frames[0].shape:
                    raise ValueError(f"{frame_what} is {frames[-1].shape[1]}x{frames[-1].shape[0]}, but "
                                     f"{what}.frames[0] is {frames[0].shape[1]}x{frames[0].shape[0]}: the frames "
                                     "of a video have one size")
            try:
                return self.processor(videos=[np.stack(frames)], video_metadata=[{"fps": float(video["fps"])}],
                                      return_tensors="pt")
            except ValueError as exc:
                raise ValueError(str(exc).replace("video 0", what)) from None
        except ImportError as exc:  # PyAV missing on the server
            raise ApiError(501, f"{what}: this server cannot decode video files ({exc}); send frames instead",
                           "not_implemented") from None
        except ValueError as exc:
            raise _image_error(exc, settings) from None

    def _check_video_frames(self, path: str, what: str, budget: _RequestBudget) -> None:
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
            raise _too_large(f"{what} is sampled to {frames} frames: with the request's other images and frames "
                             f"that is {budget.files}, more than --max-images-per-request {limit}")

    def _assemble(self, prep: Prepared, encoded) -> tuple[list, torch.Tensor, list]:
        """Cached and freshly encoded embeddings in request order (storing the new ones in the cache):
        (image embeddings, image grid (K, 3), [(video embedding, grid row, timestamps)])."""
        fresh = dict(zip(prep.encode, encoded[:len(prep.encode)]))
        grid_rows = dict(zip(prep.encode, prep.grid[:len(prep.encode)].tolist())) if prep.encode else {}
        for i, key in prep.keys.items():
            # A copy: the encoded rows are a view of the whole batch's output, which the cache must not keep.
            self.cache.put(key, fresh[i].clone(), grid_rows[i])
        for i, (emb, grid) in prep.cached.items():
            fresh[i], grid_rows[i] = emb, list(grid)
        for i, first in prep.same_as.items():
            fresh[i], grid_rows[i] = fresh[first], grid_rows[first]
        n = prep.num_images
        embeddings = [fresh[i] for i in range(n)]
        image_grid = torch.tensor([grid_rows[i] for i in range(n)], dtype=torch.int64).reshape(n, 3)
        video_grids = prep.grid[len(prep.encode):].tolist() if prep.videos else []
        videos = list(zip(encoded[len(prep.encode):], video_grids, prep.timestamps))
        return embeddings, image_grid, videos

    def render(self, embeddings, grid_thw: torch.Tensor, fmt: str, dtype: str = "float32",
               videos: list | None = None) -> bytes:
        """The response JSON, built in small pieces: each C-level step is short, so the thread running this does
        not hold the GIL (and stall the event loop) for long, however big the response."""
        pieces = [b'{"object":"list","model":', json.dumps(self.model_name).encode(), b',"data":[']

        def item(head: dict, emb: torch.Tensor) -> None:
            if fmt == "base64":
                head["dtype"] = dtype
            pieces.append(json.dumps(head, separators=(",", ":"))[:-1].encode() + b',"embedding":')
            if fmt == "base64":
                pieces.extend(_base64_pieces(_raw_bytes(emb, dtype)))
            else:
                pieces.extend(_float_pieces(emb.numpy()))
            pieces.append(b"}")

        for i, emb in enumerate(embeddings):
            if i:
                pieces.append(b",")
            item({"object": "embedding", "index": i, "grid_thw": grid_thw[i].tolist(), "shape": list(emb.shape)},
                 emb)
        pieces.append(b"]")
        if videos:
            pieces.append(b',"videos":[')
            for j, (emb, grid, stamps) in enumerate(videos):
                if j:
                    pieces.append(b",")
                item({"object": "video_embedding", "index": j, "grid_thw": list(grid), "timestamps": list(stamps),
                      "shape": list(emb.shape)}, emb)
            pieces.append(b"]")
        tokens = int(sum(e.shape[0] for e in embeddings) + sum(v[0].shape[0] for v in videos or ()))
        usage = {"images": len(embeddings), "tokens": tokens}
        if videos:
            usage["videos"] = len(videos)
        pieces.append(b',"usage":' + json.dumps(usage, separators=(",", ":")).encode() + b"}")
        return b"".join(pieces)

    def render_safetensors(self, embeddings, grid_thw: torch.Tensor, dtype: str = "float32",
                           videos: list | None = None) -> bytes:
        """The answer as a safetensors file: `embedding.{i}` (tokens, D) per image in `dtype`, `grid_thw` (K, 3)
        int64; for videos `video_embedding.{j}`, `video_grid_thw` (V, 3) and the timestamps in the metadata."""
        from safetensors.torch import save

        tensors = {f"embedding.{i}": emb.to(DTYPES[dtype]).contiguous() for i, emb in enumerate(embeddings)}
        tensors["grid_thw"] = grid_thw.to(torch.int64).contiguous()
        metadata = {"model": self.model_name, "images": str(len(embeddings)), "dtype": dtype}
        if videos:
            for j, (emb, _, _) in enumerate(videos):
                tensors[f"video_embedding.{j}"] = emb.to(DTYPES[dtype]).contiguous()
            tensors["video_grid_thw"] = torch.tensor([list(g) for _, g, _ in videos], dtype=torch.int64)
            metadata["videos"] = str(len(videos))
            metadata["video_timestamps"] = json.dumps([list(t) for _, _, t in videos])
        return save(tensors, metadata)

    async def embeddings(self, request: Request) -> Response:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_shutting_down", {"Connection": "close"})
        settings = self.settings
        binary = wants_safetensors(request.headers.get("accept", ""))
        try:
            body = await asyncio.wait_for(_read_body(request, settings.max_body_bytes), settings.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within --body-timeout {settings.body_timeout_s:g} s",
                           "request_timeout", {"Connection": "close"}) from None
        try:
            self.batcher.reserve()
        except QueueFull as exc:
            raise ApiError(503, f"server overloaded: {exc}; retry later", "server_overloaded",
                           {"Retry-After": "1"}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", "server_shutting_down",
                           {"Connection": "close"}) from None
        budget = _RequestBudget(time.monotonic() + settings.decode_timeout_s, binary)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        watcher.add_done_callback(lambda _: budget.abandoned.set() if not watcher.cancelled() else None)
        job = None
        try:
            try:
                prep = await self._decode(body, budget)
            except _Abandoned:
                self.metrics.abandoned.inc()
                raise ApiError(499, "client disconnected", "client_disconnected") from None
            del body
            if prep.pixel_values is not None:  # else every image came from the cache: the model is not needed
                loop = asyncio.get_running_loop()
                job = Job(prep.pixel_values, prep.grid, loop.create_future(), loop)
                prep.pixel_values = None  # the job owns the pixels now; nothing else may keep them while it waits
                self.batcher.submit(job)
        finally:
            if job is None:
                watcher.cancel()
                self.batcher.release()
        encoded = ()
        if job is not None:
            try:
                # Wait for the result or for the client to leave, whichever comes first.
                await asyncio.wait([job.future, watcher], return_when=asyncio.FIRST_COMPLETED)
                if not job.future.done():
                    self.batcher.abandon(job)  # dropped if still queued; a running batch just discards its result
                    self.metrics.abandoned.inc()
                    raise ApiError(499, "client disconnected", "client_disconnected")
                encoded = job.future.result()
            except EncodeFailed as exc:
                raise ApiError(500, f"encoding failed: {exc}", "internal_error") from None
            finally:
                watcher.cancel()
            job = None
        embeddings, grid, videos = self._assemble(prep, encoded)
        self.metrics.images.inc(len(embeddings))
        self.metrics.videos.inc(len(videos))
        if binary:
            content = await run_in_threadpool(self.render_safetensors, embeddings, grid, prep.dtype, videos)
            return Response(content, media_type=SAFETENSORS_MEDIA_TYPE)
        content = await run_in_threadpool(self.render, embeddings, grid, prep.encoding_format, prep.dtype, videos)
        return Response(content, media_type="application/json")

    async def _decode(self, body: bytes, budget: _RequestBudget):
        """Run prepare() on the decode pool, giving up (503) if no decoder is free before the budget ends."""
        key = id(budget)
        with self._waiting_lock:
            self._waiting[key] = time.monotonic()

        def work(body):
            with self._waiting_lock:
                self._waiting.pop(key, None)
                self._decoding += 1
            try:
                return self.prepare(body, budget)
            finally:
                with self._waiting_lock:
                    self._decoding -= 1

        future = self._decode_pool.submit(work, body)
        del body  # the pool's work item holds it, and lets go once done
        error = done = None
        waited = asyncio.wrap_future(future)
        try:
            remaining = budget.deadline - time.monotonic()
            done, _ = await asyncio.wait([waited], timeout=max(remaining, 0))
            if not done and future.cancel():
                raise ApiError(503, f"server overloaded: no decoder was free within --decode-timeout "
                                    f"{self.settings.decode_timeout_s:g} s; retry later", "server_overloaded",
                               {"Retry-After": "1"})
            return await waited  # started in time: prepare() enforces the budget itself
        except BaseException as exc:
            # The error's traceback (and that of the decoder error it was raised from, its __context__) runs
            # through prepare()'s frames, which hold the parsed body and decoded images, and through this frame,
            # whose futures hold the error: a cycle that keeps all of it until the garbage collector happens to
            # run. Re-raise it bare, with this frame's references dropped.
            error = exc.with_traceback(None)
            error.__context__ = error.__cause__ = None
        finally:
            future = waited = done = None
            with self._waiting_lock:
                self._waiting.pop(key, None)
        try:
            raise error
        finally:
            error = None


def _float_pieces(array: np.ndarray):
    """`array` (2-D) as JSON nested lists, in pieces of about _FLOATS_PER_PIECE floats."""
    rows = max(1, _FLOATS_PER_PIECE // max(1, array.shape[-1]))
    yield b"["
    for start in range(0, array.shape[0], rows):
        if start:
            yield b","
        yield json.dumps(array[start:start + rows].tolist(), separators=(",", ":"))[1:-1].encode()
    yield b"]"


def _base64_pieces(raw: bytes):
    step = 3 * _FLOATS_PER_PIECE  # a multiple of 3 bytes: the pieces' base64 concatenate to the whole's
    yield b'"'
    for start in range(0, len(raw), step):
        yield base64.b64encode(raw[start:start + step])
    yield b'"'


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone (call once the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise ApiError(413, f"request body of {size} bytes exceeds --max-body-mb ({limit} bytes)",
                           "request_too_large", {"Connection": "close"})
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"request body exceeds --max-body-mb ({limit} bytes)", "request_too_large",
                               {"Connection": "close"})
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client disconnected before sending the whole body", "client_disconnected") from None
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------
_ROUTES = ("/v1/embeddings", "/health", "/metrics")


class _CountRequests:
    """ASGI middleware: counts every HTTP response by route and status (including 404s and 500s)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        status = {"code": 500}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()


def create_app(service: EmbeddingService) -> Starlette:
    """The ASGI app for `service`. Its lifespan starts the batcher and, at shutdown, drains it."""
    metrics = service.metrics

    async def embeddings(request: Request) -> Response:
        started = time.monotonic()
        metrics.in_flight.inc()
        try:
            return await service.embeddings(request)
        except ApiError as exc:
            return exc.response()
        finally:
            metrics.in_flight.dec()
            metrics.request_seconds.observe(time.monotonic() - started)

    async def health(request: Request) -> Response:
        return service.health_response()

    async def metrics_route(request: Request) -> Response:
        return service.metrics_response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return ApiError(exc.status_code, str(exc.detail), kind, dict(exc.headers or {})).response()

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("internal error on %s", request.url.path, exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}", "internal_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            # uvicorn has already waited for open requests; this finishes whatever they left in the queue.
            await run_in_threadpool(service.stop)

    app = Starlette(
        routes=[Route("/v1/embeddings", embeddings, methods=["POST"]), Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics_route, methods=["GET"])],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_CountRequests, metrics=metrics)
    return app


def embeddings_from_response(item: dict) -> np.ndarray:
    """Client helper: one `data` (or `videos`) entry of a JSON response as a (tokens, D) float32 array, any
    encoding and dtype."""
    value = item["embedding"]
    if isinstance(value, str):
        raw = base64.b64decode(value)
        dtype = item.get("dtype", "float32")
        if dtype == "bfloat16":  # the upper half of a float32
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype={"float32": "<f4", "float16": "<f2"}[dtype]).astype(np.float32)
        return array.reshape(item["shape"])
    return np.asarray(value, dtype=np.float32).reshape(item["shape"])
