"""Per-request budgets, costly images, the decode time budget, connection timeouts and the connection cap: what a
hostile or overloaded client meets, in-process on 127.0.0.1. Every wait is bounded.
"""
from __future__ import annotations

import gc
import io
import json
import socket
import threading
import time

import pytest

# The serve extra (starlette, uvicorn, prometheus-client): skipped without it.
pytest.importorskip("uvicorn")
pytest.importorskip("glm4v_fast.serving.app")

from PIL import Image  # noqa: E402

from _serving import assert_healthy, concurrent_posts, error_of, live_fixture, wait_until  # noqa: E402
from _tiny import b64, png_bytes  # noqa: E402

LIMITS = dict(max_wait_ms=2, max_images_per_request=4, max_patches_per_request=600, decode_workers=1,
              decode_timeout_s=1.5, overload_wait_s=0.3, max_connections=6, header_timeout_s=1.0,
              body_timeout_s=1.0, keep_alive_timeout_s=1.0,
              cache_mb=0)  # every request reaches the model (the cache is tested in test_serving_cache)


live = live_fixture(**LIMITS)


@pytest.fixture
def decode_spy(monkeypatch):
    """Sizes of the images the server decodes (after their headers passed every check): PIL's load, seen from the
    server's decode workers."""
    decoded = []
    real = Image.Image.load

    def spy(image):
        if threading.current_thread().name.startswith("glm4v-decode") and not hasattr(image, "decoded_by_test"):
            image.decoded_by_test = True   # load() runs again on a loaded image: count each image once
            decoded.append(image.size)
        return real(image)

    monkeypatch.setattr(Image.Image, "load", spy)
    return decoded


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
