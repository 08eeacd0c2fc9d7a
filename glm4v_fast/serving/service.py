"""EmbeddingService: the model, its decode pool and batcher, and the one route table every host dispatches through.

Request path (the event loop only awaits; CPU work runs in threads):
    read the body (capped, timed) -> admit (or 503) -> [decode pool] RequestDecoder.decode: parse, check every
    image's header against the request's budgets, decode, look each image up in the cache, preprocess the misses
    and the videos -> DynamicBatcher (model on its worker thread) -> [thread] render the answer.

Work that cannot pay off is dropped: a request whose client has gone is not decoded or encoded further, and one
that waited past --decode-timeout for a decoder is answered 503 without being decoded.

`EmbeddingService.dispatch` is the whole HTTP surface: the Starlette app (glm4v_fast.serving.app) and the Ray
Serve replicas hand it their requests, so routing, error rendering and the request metrics are the same on both.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from .auth import ApiKeyCheck
from .batcher import DynamicBatcher, EncodeFailed, Job, QueueFull, ShuttingDown
from .cache import EmbeddingCache, settings_fingerprint
from .decoding import Abandoned, DecodedRequest, RequestBudget, RequestDecoder
from .metrics import ServerMetrics
from .protocol import SAFETENSORS_MEDIA_TYPE, ApiError, wants_safetensors
from .rendering import render_json, render_safetensors
from .settings import ServeSettings

logger = logging.getLogger("glm4v_fast.serving")


@dataclass(frozen=True)
class Endpoint:
    """One route: its method, the service method answering it, whether it counts towards the request latency
    and in-flight metrics (the embedding work does; probes do not), and whether it needs the API key."""

    method: str
    handler: str
    timed: bool = False
    protected: bool = False


#: The server's routes, for every host (Starlette, Ray Serve).
ROUTES = {
    "/v1/embeddings": Endpoint("POST", "embeddings", timed=True, protected=True),
    "/health": Endpoint("GET", "health_response"),
    "/metrics": Endpoint("GET", "metrics_response"),
}


def route_path(scope: dict) -> str:
    """The request's path within the app: without the host's mount prefix (Ray Serve's route_prefix, handed
    over as root_path) and without a trailing slash."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


class EmbeddingService:
    """Holds the model, the processor, the decode pool and the batcher; `dispatch` answers every route."""

    def __init__(self, model, processor, settings: ServeSettings | None = None, model_name: str = "glm4v-vision",
                 metrics: ServerMetrics | None = None):
        self.settings = settings = settings or ServeSettings()
        settings.validate()
        self.model, self.processor, self.model_name = model, processor, model_name
        self.metrics = metrics or ServerMetrics()
        self.cache = EmbeddingCache(settings.cache_bytes, self.metrics)
        # What besides the pixels decides an embedding: the processor's settings and the model's.
        fingerprint = settings_fingerprint(processor.to_dict(), model_name, str(model.dtype),
                                           model.config.out_hidden_size)
        self.decoder = RequestDecoder(processor, settings, self.cache, fingerprint)
        self.api_key = ApiKeyCheck(settings.api_key)
        self.draining = False
        self.batcher = DynamicBatcher(self._encode, model.config.merge_unit, settings.max_batch_tokens,
                                      settings.max_wait_ms / 1000.0, settings.max_queue, self.metrics)
        self._decode_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._waiting_lock = threading.Lock()
        self._waiting: dict[int, float] = {}   # requests waiting for a decode worker: id -> since when
        self._decoding = 0                     # requests a decode worker is busy with

    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, grid_thw)

    # -------------------------------------------------------------- lifecycle
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

    @property
    def running(self) -> bool:
        """Whether the batcher's worker thread is alive (a host's health check restarts a replica without it)."""
        return self.batcher.running

    # -------------------------------------------------------------- routing
    async def dispatch(self, request: Request) -> Response:
        """Answer one HTTP request to any route: errors as JSON, every response counted by route and status."""
        path = route_path(request.scope)
        endpoint = ROUTES.get(path)
        status = 500
        try:
            response = await self._answer(request, path, endpoint)
            status = response.status_code
            return response
        finally:
            self.metrics.requests.labels(path if endpoint is not None else "other", str(status)).inc()

    async def _answer(self, request: Request, path: str, endpoint: Endpoint | None) -> Response:
        try:
            if endpoint is None:
                raise ApiError(404, "Not Found", "not_found")
            allowed = (endpoint.method, "HEAD") if endpoint.method == "GET" else (endpoint.method,)
            if request.method not in allowed:
                raise ApiError(405, "Method Not Allowed", "method_not_allowed", {"Allow": ", ".join(allowed)})
            if endpoint.protected:
                self.api_key.check(request.headers.get("authorization"))
            handler = getattr(self, endpoint.handler)
            if not endpoint.timed:
                return await handler(request)
            started = time.monotonic()
            self.metrics.in_flight.inc()
            try:
                return await handler(request)
            except ApiError as exc:
                return exc.response()
            finally:
                self.metrics.in_flight.dec()
                self.metrics.request_seconds.observe(time.monotonic() - started)
        except ApiError as exc:
            return exc.response()
        except Exception as exc:  # a bug or a device failure, never bad input
            logger.exception("internal error on %s", path, exc_info=exc)
            return ApiError(500, f"internal error: {type(exc).__name__}", "internal_error").response()

    # -------------------------------------------------------------- probes
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

    async def health_response(self, request: Request | None = None) -> JSONResponse:
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

    async def metrics_response(self, request: Request | None = None) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # -------------------------------------------------------------- embeddings
    def prepare(self, body: bytes, budget: RequestBudget | None = None) -> DecodedRequest:
        """Body -> DecodedRequest (runs in a decode worker thread); ApiError on bad input."""
        return self.decoder.decode(body, budget)

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
        budget = RequestBudget(time.monotonic() + settings.decode_timeout_s, binary)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        watcher.add_done_callback(lambda _: budget.abandoned.set() if not watcher.cancelled() else None)
        job = None
        try:
            try:
                decoded = await self._decode(body, budget)
            except Abandoned:
                self.metrics.abandoned.inc()
                raise ApiError(499, "client disconnected", "client_disconnected") from None
            del body
            if decoded.pixel_values is not None:  # else every image came from the cache: the model is not needed
                loop = asyncio.get_running_loop()
                job = Job(decoded.pixel_values, decoded.grid, loop.create_future(), loop)
                decoded.pixel_values = None  # the job owns the pixels now; nothing else may keep them while it waits
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
        embeddings, grid, videos = decoded.answers(encoded, self.cache)
        self.metrics.images.inc(len(embeddings))
        self.metrics.videos.inc(len(videos))
        if binary:
            content = await run_in_threadpool(render_safetensors, self.model_name, embeddings, grid, decoded.dtype,
                                              videos)
            return Response(content, media_type=SAFETENSORS_MEDIA_TYPE)
        content = await run_in_threadpool(render_json, self.model_name, embeddings, grid, decoded.encoding_format,
                                          decoded.dtype, videos)
        return Response(content, media_type="application/json")

    async def _decode(self, body: bytes, budget: RequestBudget) -> DecodedRequest:
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
