"""The Starlette app: POST /v1/embeddings, GET /health, GET /metrics.

Request path (the event loop only awaits; CPU work runs in threads):
    read the body (capped) -> admit (or 503) -> [thread] parse JSON, base64-decode, open and check each image,
    preprocess -> DynamicBatcher (model on its worker thread) -> [thread] serialise the response.

Every client mistake becomes a 4xx with a JSON body `{"error": {"message", "type"}}`; a 500 means a bug or a
device failure, never bad input.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import struct
import time
import warnings
import zlib

import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batcher import DynamicBatcher, EncodeFailed, Job, QueueFull, ShuttingDown
from .metrics import ServerMetrics
from .settings import ServeSettings

logger = logging.getLogger("glm4v_fast.serving")

ENCODING_FORMATS = ("float", "base64")
# What PIL raises for data it cannot parse or decode (truncated streams, bad headers, corrupt chunks).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, MemoryError,
                  struct.error, zlib.error)


class ApiError(Exception):
    """A client-visible error: HTTP status, OpenAI-style error type, message, extra headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type}}, status_code=self.status,
                            headers=self.headers)


# ---------------------------------------------------------------------------------------------------------------
# Input decoding (runs in a worker thread)
# ---------------------------------------------------------------------------------------------------------------
def _b64decode(text: str, what: str) -> bytes:
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{what} is a data: URL without ';base64,' data")
    # validate=True rejects stray characters instead of silently skipping them. Line breaks (MIME-style
    # base64) are legitimate, so whitespace is dropped first (only when present: the scan is cheap, the copy not).
    if any(c in text for c in " \t\r\n"):
        text = "".join(text.split())
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{what} is not valid base64: {exc}") from None
    if not raw:
        raise ApiError(400, f"{what} is empty")
    return raw


def decode_image(raw: bytes, what: str, max_image_pixels: int) -> Image.Image:
    """Open and fully decode one encoded image, refusing oversized ones from the header, before decoding."""
    try:
        with warnings.catch_warnings():
            # Our max_image_pixels replaces PIL's warning; PIL's own hard limit still raises (-> 413 below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > max_image_pixels:
                raise ApiError(413, f"{what} has {width}x{height} = {width * height} pixels, more than "
                                    f"--max-image-pixels {max_image_pixels}", "request_too_large")
            image.load()
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"{what} is too large: {exc}", "request_too_large") from None
    except Image.UnidentifiedImageError:
        raise ApiError(400, f"{what} is not an image in a format this server can decode") from None
    except _DECODE_ERRORS as exc:
        raise ApiError(400, f"{what} is corrupt or truncated: {exc}") from None
    if width <= 0 or height <= 0:
        raise ApiError(400, f"{what} is empty ({width}x{height})")
    return image


def parse_request(body: bytes) -> tuple[list[str], str]:
    """The JSON body -> (base64 image strings, encoding_format), or ApiError 400."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(payload).__name__}")
    if "images" not in payload:
        raise ApiError(400, "missing field 'images' (a list of base64 strings or data: URLs)")
    images = payload["images"]
    if not isinstance(images, list):
        raise ApiError(400, f"'images' must be a list of base64 strings, got {type(images).__name__}")
    if not images:
        raise ApiError(400, "'images' is empty")
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise ApiError(400, f"images[{i}] must be a base64 string or a data: URL, got {type(item).__name__}")
    fmt = payload.get("encoding_format", "float")
    if fmt not in ENCODING_FORMATS:
        raise ApiError(400, f"'encoding_format' must be one of {ENCODING_FORMATS}, got {fmt!r}")
    return images, fmt


# ---------------------------------------------------------------------------------------------------------------
# The service: model + processor + batcher
# ---------------------------------------------------------------------------------------------------------------
class EmbeddingService:
    """Holds the model, the processor and the batcher; the app's routes call it."""

    def __init__(self, model, processor, settings: ServeSettings | None = None, model_name: str = "glm4v-vision",
                 metrics: ServerMetrics | None = None):
        self.settings = settings = settings or ServeSettings()
        settings.validate()
        self.model, self.processor, self.model_name = model, processor, model_name
        self.metrics = metrics or ServerMetrics()
        self.draining = False
        self.batcher = DynamicBatcher(self._encode, model.config.merge_unit, settings.max_batch_tokens,
                                      settings.max_wait_ms / 1000.0, settings.max_queue, self.metrics)

    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, grid_thw)

    def start(self) -> None:
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
        return drained

    # -------------------------------------------------------------- request work
    def prepare(self, body: bytes) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Body -> (pixel_values, image_grid_thw, encoding_format); ApiError on bad input. Runs in a thread."""
        items, fmt = parse_request(body)
        limit = self.settings.max_image_pixels
        images = [decode_image(_b64decode(item, f"images[{i}]"), f"images[{i}]", limit)
                  for i, item in enumerate(items)]
        try:
            out = self.processor(images=images, return_tensors="pt")
        except ValueError as exc:  # e.g. an extreme aspect ratio smart_resize refuses
            raise ApiError(400, str(exc)) from None
        return out["pixel_values"], out["image_grid_thw"], fmt

    def render(self, embeddings, grid_thw: torch.Tensor, fmt: str) -> bytes:
        """The response JSON. Runs in a thread: serialising big float lists would stall the event loop."""
        data = []
        for i, emb in enumerate(embeddings):
            if fmt == "base64":
                value = base64.b64encode(emb.numpy().astype("<f4", copy=False).tobytes()).decode("ascii")
            else:
                value = emb.tolist()
            data.append({"object": "embedding", "index": i, "grid_thw": grid_thw[i].tolist(),
                         "shape": list(emb.shape), "embedding": value})
        usage = {"images": len(data), "tokens": int(sum(e.shape[0] for e in embeddings))}
        return json.dumps({"object": "list", "model": self.model_name, "data": data, "usage": usage},
                          separators=(",", ":")).encode()

    async def embeddings(self, request: Request) -> Response:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_shutting_down", {"Connection": "close"})
        body = await _read_body(request, self.settings.max_body_bytes)
        try:
            self.batcher.reserve()
        except QueueFull as exc:
            raise ApiError(503, f"server overloaded: {exc}; retry later", "server_overloaded",
                           {"Retry-After": "1"}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", "server_shutting_down",
                           {"Connection": "close"}) from None
        submitted = False
        try:
            pixel_values, grid, fmt = await run_in_threadpool(self.prepare, body)
            del body
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self.batcher.submit(Job(pixel_values, grid, future, loop))
            del pixel_values  # the job owns the pixels now; this frame must not keep them while it waits
            submitted = True
        finally:
            if not submitted:
                self.batcher.release()
        try:
            embeddings = await future
        except EncodeFailed as exc:
            raise ApiError(500, f"encoding failed: {exc}", "internal_error") from None
        self.metrics.images.inc(len(embeddings))
        content = await run_in_threadpool(self.render, embeddings, grid, fmt)
        return Response(content, media_type="application/json")


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
        model = service.model
        body = {"status": "draining" if service.draining else "ok", "model": service.model_name,
                "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
                "out_hidden_size": model.config.out_hidden_size, "queue_depth": service.batcher.depth}
        return JSONResponse(body, status_code=503 if service.draining else 200)

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

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
    """Client helper: one `data` entry of a response as a (tokens, D) float32 array, either encoding."""
    value = item["embedding"]
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").reshape(item["shape"])
    return np.asarray(value, dtype=np.float32).reshape(item["shape"])
