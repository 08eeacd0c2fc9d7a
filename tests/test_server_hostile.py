"""The embedding server under hostile input and load (issue 12), in-process and on 127.0.0.1 only.

One uvicorn server runs in a thread of the test process (the same protocol, limits and timeouts as
`glm4v-fast serve`) with the tiny checkpoint; the batcher tests need no server at all. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import gc
import io
import json
import socket
import threading
import time
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from glm4v_fast.serving.batcher import DynamicBatcher, EncodeFailed, Job  # noqa: E402

from _tiny import b64, free_port, png_bytes  # noqa: E402


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------------
# 1. nothing a request leaves behind outlives it
# ---------------------------------------------------------------------------------------------------------------
def _submit(batcher, loop, rows: int, value: float = 1.0):
    """Submit one job of `rows` patch rows; returns its future and a weak reference to its pixels."""
    pixel_values = torch.full((rows, 8), value)
    ref = weakref.ref(pixel_values)
    future = loop.create_future()
    batcher.reserve()
    batcher.submit(Job(pixel_values, torch.tensor([[1, rows // 4, 4]]), future, loop))
    return future, ref


def test_failed_batch_keeps_no_tensors_alive():
    """A forward that fails (here: out of memory) leaves neither its inputs nor its activations behind, without
    waiting for the garbage collector or for the next batch."""
    activations = []

    def encode(pixel_values, grid):
        hidden = pixel_values.repeat(64, 1)          # an activation the failing forward holds in its frame
        activations.append(weakref.ref(hidden))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    batcher = DynamicBatcher(encode, merge_unit=4, max_batch_tokens=1024, max_wait_s=0.2, max_queue=8)

    async def scenario():
        loop = asyncio.get_running_loop()
        submitted = [_submit(batcher, loop, 16, float(i)) for i in range(3)]  # one batch, then each alone
        results = await asyncio.wait_for(asyncio.gather(*(f for f, _ in submitted), return_exceptions=True), 10)
        return results, [ref for _, ref in submitted]

    gc.disable()  # reference cycles would otherwise be freed by luck of timing; the batch must not need them
    batcher.start()
    try:
        results, input_refs = asyncio.run(scenario())
        assert all(isinstance(r, EncodeFailed) and "out of memory" in str(r) for r in results), results
        assert len(activations) == 4  # the batched forward, then each request alone
        # Once the results are delivered the worker lets go of the batch: no cycle, no lingering local.
        wait_until(lambda: all(r() is None for r in input_refs + activations), what="the batch's tensors to be freed")
        assert all(r.__traceback__ is None for r in results)  # nothing of the forward rides along
    finally:
        gc.enable()
        assert batcher.join(timeout=10)


def test_last_batch_is_not_kept_until_the_next():
    batcher = DynamicBatcher(lambda pv, grid: pv.view(-1, 4, pv.shape[1]).mean(1), merge_unit=4,
                             max_batch_tokens=1024, max_wait_s=0.0, max_queue=8)

    async def scenario():
        loop = asyncio.get_running_loop()
        future, ref = _submit(batcher, loop, 8)
        result = await asyncio.wait_for(future, 10)
        return result, ref

    gc.disable()
    batcher.start()
    try:
        result, ref = asyncio.run(scenario())
        assert result[0].shape == (2, 8)
        wait_until(lambda: ref() is None, what="the served batch's pixels to be freed")
    finally:
        gc.enable()
        assert batcher.join(timeout=10)


# ---------------------------------------------------------------------------------------------------------------
# a live server in a thread of this process, on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------
class Live:
    def __init__(self, service, settings, tmp_path):
        from glm4v_fast.serving.server import build_server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service, self.settings = service, settings
        self.server = build_server(service, settings, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 60, "the server to start")
        assert self.server.started

    def post(self, body, timeout: float = 30.0, **kwargs):
        if isinstance(body, (bytes, str)):
            return httpx.post(self.url + "/v1/embeddings", content=body, timeout=timeout,
                              headers={"content-type": "application/json"}, **kwargs)
        return httpx.post(self.url + "/v1/embeddings", json=body, timeout=timeout, **kwargs)

    def health(self):
        return httpx.get(self.url + "/health", timeout=10)

    def metric(self, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(self.url + "/metrics", timeout=10).text
                   .splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    import glm4v_fast as gf
    from _tiny import save_tiny_checkpoint
    from glm4v_fast.serving import EmbeddingService, ServeSettings

    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=3)
    settings = ServeSettings(max_wait_ms=2, max_images_per_request=4, max_patches_per_request=600,
                             decode_workers=1, decode_timeout_s=1.5, overload_wait_s=0.3, max_connections=6,
                             header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_timeout_s=1.0,
                             cache_mb=0)  # every request reaches the model (the cache is tested in test_server_api)
    service = EmbeddingService(gf.VisionModel.from_pretrained(checkpoint), gf.VisionProcessor(), settings)
    server = Live(service, settings, tmp_path_factory.mktemp("live"))
    yield server
    server.stop()


@pytest.fixture
def decode_spy(live, monkeypatch):
    """Counts images decoded by the server (after their headers passed every check)."""
    from glm4v_fast.serving import app

    decoded = []
    real = app.decode_opened

    def spy(image, *args, **kwargs):
        decoded.append(image.size)
        return real(image, *args, **kwargs)

    monkeypatch.setattr(app, "decode_opened", spy)
    return decoded


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def assert_healthy(live) -> None:
    r = live.health()
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    assert 'status="500"' not in httpx.get(live.url + "/metrics", timeout=10).text


def test_failed_requests_leave_nothing_behind(live):
    """A refused request's body, parsed strings and decoded bytes are freed when it is answered: no reference
    cycle through a stored error's traceback may keep them until the garbage collector happens to run."""
    import tracemalloc

    body = json.dumps({"images": ["QUFB" * (1 << 20)] * 2}).encode()  # 8 MiB of base64 that is not an image
    assert live.post(body).status_code == 400
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        # The last request's connection may still be being torn down: compare after 2 and after 6 requests.
        for _ in range(2):
            assert live.post(body).status_code == 400
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(4):
            assert live.post(body).status_code == 400
        # The server thread may still be tearing down the last connection (slow on a loaded machine): give it
        # up to 2 s. A real leak keeps all four bodies (32 MiB) and never drops under the bound.
        for _ in range(20):
            grown = tracemalloc.get_traced_memory()[0] - before
            if grown < len(body) // 2:
                break
            time.sleep(0.1)
    finally:
        tracemalloc.stop()
        gc.enable()
    assert grown < len(body) // 2, f"{grown / 2**20:.1f} MiB more allocated after four more refused 8 MiB requests"


# ---------------------------------------------------------------------------------------------------------------
# 2. per-request budgets, before the work is done
# ---------------------------------------------------------------------------------------------------------------
def test_per_request_budgets_get_413_naming_the_limit(live, decode_spy):
    from test_imageio_hostile import huge_screen_gif

    tiny = b64(png_bytes(1, 1))
    error = error_of(live.post({"images": [tiny] * 5}), 413)
    assert "request has 5 images, more than --max-images-per-request 4" in error["message"]
    assert error["type"] == "request_too_large"
    error = error_of(live.post({"images": [tiny] * 5000}), 413)      # the 5,000 1x1 PNGs: refused before parsing
    assert "--max-images-per-request 4" in error["message"]
    # A 60-byte GIF declaring a 6000x6000 screen: 36 Mpx under --max-image-pixels, but its patches are over budget.
    error = error_of(live.post({"images": [b64(huge_screen_gif(6000, 6000))]}), 413)
    assert "--max-patches-per-request 600" in error["message"]
    # Three 1000x200 images: each fits, together they do not; refused before any of them is decoded.
    wide = b64(png_bytes(1000, 200))
    assert "--max-patches-per-request" in error_of(live.post({"images": [wide] * 3}), 413)["message"]
    assert decode_spy == []
    r = live.post({"images": [tiny] * 4})                              # at the limits: served
    assert r.status_code == 200 and len(r.json()["data"]) == 4
    assert len(decode_spy) == 4
    # A body of many tiny JSON values is refused before it is parsed.
    assert "JSON values" in error_of(live.post(b'{"images": [' + b"0," * 300_000 + b'0]}'), 413)["message"]
    assert_healthy(live)


# ---------------------------------------------------------------------------------------------------------------
# 3. costly images refused from their headers; a decode time budget; /health reports overload
# ---------------------------------------------------------------------------------------------------------------
def _jpeg_with_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) declares width x height: refusable from the header alone."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_costly_images_refused_before_decoding(live, decode_spy):
    from test_imageio_hostile import many_scan_jpeg

    from glm4v_fast.imageio import DEFAULT_MAX_JPEG_SCANS
    from glm4v_fast.serving import ServeSettings

    assert ServeSettings().max_jpeg_scans == DEFAULT_MAX_JPEG_SCANS  # one default for the server and the API

    error = error_of(live.post({"images": [b64(many_scan_jpeg(300))]}), 413)
    assert "max_jpeg_scans=100" in error["message"] and "--max-jpeg-scans" in error["message"]
    error = error_of(live.post({"images": [b64(_jpeg_with_size(65500, 320))]}), 400)   # 204:1
    assert "aspect ratio" in error["message"]
    assert decode_spy == []
    assert_healthy(live)


def test_decode_budget_and_overload_reported_by_health(live, monkeypatch):
    """One decode worker held by a slow request: the next request waits, /health turns 503 'overloaded', once
    --decode-timeout has passed the waiting request is answered 503 without being decoded, and the slow request
    is stopped (413) at its next check instead of going on to the model."""
    gate, started, prepared = threading.Event(), threading.Event(), []
    real = live.service.prepare

    def slow_prepare(body, budget=None):
        prepared.append(body)
        if len(prepared) == 1:
            started.set()
            assert gate.wait(30)
        return real(body, budget)

    monkeypatch.setattr(live.service, "prepare", slow_prepare)
    body = {"images": [b64(png_bytes(40, 40))]}
    with concurrent_posts(live, [body, body]) as results:
        assert started.wait(30)
        wait_until(lambda: live.health().status_code == 503, 30, "/health to report overload")
        health = live.health().json()
        assert health["status"] == "overloaded" and "--overload-wait" in health["overload"]
        assert health["decode_waiting"] == 1 and health["decoding"] == 1
        wait_until(lambda: len(results) == 1, 30, "the waiting request to time out")
        error = error_of(results[0], 503)
        assert error["type"] == "server_overloaded" and "--decode-timeout" in error["message"]
        gate.set()
    assert len(prepared) == 1                      # the timed-out request was never decoded
    # The slow one itself overran its budget while being decoded: refused at the next check, not encoded.
    error = error_of(results[1], 413)
    assert "--decode-timeout" in error["message"]
    wait_until(lambda: live.health().status_code == 200, 10, "/health to recover")
    assert_healthy(live)


class concurrent_posts:
    """POST bodies from threads; `results` fills in completion order."""

    def __init__(self, live, bodies):
        self.live, self.bodies, self.results = live, bodies, []

    def __enter__(self):
        def post(body):
            self.results.append(self.live.post(body))

        self.threads = [threading.Thread(target=post, args=(b,), daemon=True) for b in self.bodies]
        for t in self.threads:
            t.start()
            time.sleep(0.05)  # arrival order
        return self.results

    def __exit__(self, *exc):
        for t in self.threads:
            t.join(timeout=30)


# ---------------------------------------------------------------------------------------------------------------
# 4. connection timeouts and the connection cap
# ---------------------------------------------------------------------------------------------------------------
def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        chunk = sock.recv(65536)  # socket.timeout here means the server never closed the connection
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_slow_header_client_is_cut_off(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-")  # ... and nothing more
        reply = _read_until_closed(sock, timeout=10)
    assert reply.startswith(b"HTTP/1.1 408") and b"--header-timeout" in reply
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:  # silent from the start
        assert _read_until_closed(sock, timeout=10).startswith(b"HTTP/1.1 408")
    assert_healthy(live)


def test_slow_body_gets_408(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"images\": [")
        reply = _read_until_closed(sock, timeout=10)
    assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout" in reply


def test_connection_cap_refuses_cleanly(live):
    idle = [socket.create_connection(("127.0.0.1", live.port), timeout=10)
            for _ in range(live.settings.max_connections)]
    try:
        wait_until(lambda: len(live.server.server_state.connections) >= live.settings.max_connections, 10,
                   "the idle connections to be accepted")
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = _read_until_closed(sock, timeout=10)
        assert reply.startswith(b"HTTP/1.1 503") and b"--max-connections 6" in reply
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: len(live.server.server_state.connections) < live.settings.max_connections, 10,
               "the idle connections to close")
    assert_healthy(live)


# ---------------------------------------------------------------------------------------------------------------
# 5. bad input is a 4xx, never a 500
# ---------------------------------------------------------------------------------------------------------------
def test_big_integer_and_corrupt_formats_get_400(live):
    from test_imageio_hostile import _encode, _photo

    error_of(live.post(b'{"images": [' + b"7" * 5000 + b"]}"), 400)
    error_of(live.post(b'{"images": ["x"], "n": ' + b"9" * 5000 + b"}"), 400)
    blp = bytearray(_encode(Image.fromarray(_photo(8, 8)).convert("P"), "BLP", blp_version="BLP1"))
    blp[4:8] = (7).to_bytes(4, "little")       # Pillow: NotImplementedError
    assert "images[0]" in error_of(live.post({"images": [b64(bytes(blp))]}), 400)["message"]
    assert_healthy(live)


# ---------------------------------------------------------------------------------------------------------------
# 6. big responses are serialised in pieces, so the event loop keeps running
# ---------------------------------------------------------------------------------------------------------------
def test_render_serialises_in_small_pieces(live, monkeypatch):
    """One json.dumps (or tolist) over a whole embedding is one C call holding the GIL, and so stalling the event
    loop, for seconds (12k x 1536 floats: about 11 s). The response must be built from calls over bounded pieces."""
    from glm4v_fast.serving import app, embeddings_from_response

    biggest = [0]
    real_dumps = json.dumps

    def counting_dumps(value, *args, **kwargs):
        size = np.asarray(value, dtype=object).size if isinstance(value, list) else 1
        biggest[0] = max(biggest[0], size)
        return real_dumps(value, *args, **kwargs)

    class JsonSpy:
        dumps = staticmethod(counting_dumps)
        loads = staticmethod(json.loads)

    emb = torch.rand(1500, 1024)
    grid = torch.tensor([[1, 60, 100]])
    monkeypatch.setattr(app, "json", JsonSpy)
    for fmt in ("float", "base64"):
        out = json.loads(live.service.render([emb], grid, fmt))
        item = out["data"][0]
        assert item["shape"] == [1500, 1024] and item["grid_thw"] == [1, 60, 100] and item["index"] == 0
        assert out["usage"] == {"images": 1, "tokens": 1500} and out["object"] == "list"
        np.testing.assert_array_equal(embeddings_from_response(item), emb.numpy())
    assert 0 < biggest[0] <= 64 * 1024, f"one json.dumps call serialised {biggest[0]} floats"


# ---------------------------------------------------------------------------------------------------------------
# 7. EXIF orientation: the server loads encoded images like transformers' load_image
# ---------------------------------------------------------------------------------------------------------------
def test_exif_rotated_jpeg_gets_the_upright_grid(live):
    from test_imageio_hostile import _encode, _photo

    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = _photo(64, 176, seed=3)
    rotated = _encode(Image.fromarray(sideways), "JPEG", exif=exif.tobytes(), quality=95)
    plain = _encode(Image.fromarray(sideways), "JPEG", quality=95)
    r = live.post({"images": ["data:image/jpeg;base64," + b64(rotated), b64(plain)]})
    assert r.status_code == 200, r.text
    grids = [item["grid_thw"] for item in r.json()["data"]]
    assert grids == [[1, 12, 4], [1, 4, 12]]   # portrait as taken; the same pixels without the tag: landscape


# ---------------------------------------------------------------------------------------------------------------
# 8. work for clients that have gone is dropped
# ---------------------------------------------------------------------------------------------------------------
def test_queued_work_of_a_gone_client_is_dropped(live, monkeypatch):
    gate, busy, seen = threading.Event(), threading.Event(), []
    real = live.service.batcher.encode

    def gated_encode(pixel_values, grid):
        seen.append(int(pixel_values.shape[0]))
        busy.set()
        assert gate.wait(30)
        return real(pixel_values, grid)

    monkeypatch.setattr(live.service.batcher, "encode", gated_encode)
    first = png_bytes(56, 56, seed=1)
    gone = png_bytes(112, 112, seed=2)
    abandoned = live.metric("glm4v_abandoned_requests_total")
    with concurrent_posts(live, [{"images": [b64(first)]}]) as results:
        assert busy.wait(30)            # the model is busy with the first request
        body = json.dumps({"images": [b64(gone)] * 4}).encode()
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            wait_until(lambda: live.service.batcher.depth == 1, 10, "the request to be queued")
        # The client is gone: its queued job is dropped (and its reservation given back) while the model is busy.
        wait_until(lambda: live.metric("glm4v_abandoned_requests_total") > abandoned, 10, "the drop")
        assert live.service.batcher.depth == 0
        gate.set()
    assert results[0].status_code == 200
    # The abandoned request's patches never reached the model: one forward, of the first request alone.
    assert seen == [live.service.processor.get_number_of_image_patches(56, 56)]
    assert_healthy(live)
