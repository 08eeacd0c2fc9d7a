"""The server as `python -m glm4v_fast.serving` runs it, in a subprocess on a loopback port with a tiny checkpoint.

Covers: results equal the offline encoder under concurrent batching (both encodings), every kind of bad input gets
its 4xx and never a 500, overload gets 503 + Retry-After, disconnecting clients do no harm, a 1000-request soak
keeps memory flat, and shutdown drains: admitted requests complete, later ones are refused, the process exits 0.
"""
from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import time

import numpy as np
import pytest
import torch

# The serve extra (starlette, uvicorn, prometheus-client): skipped without it.
pytest.importorskip("uvicorn")
pytest.importorskip("glm4v_fast.serving.app")

from PIL import Image  # noqa: E402

import glm4v_fast as gf  # noqa: E402

from _serving import CONNECTION_ERRORS, Server, check_response, httpx, post_many  # noqa: E402
from _tiny import TINY, b64, png_bytes, save_tiny_checkpoint  # noqa: E402

# (width, height): upscaled to the processor's minimum, landscape, portrait, odd sizes; all resize differently.
SIZES = [(60, 100), (200, 130), (33, 47), (150, 150), (90, 300), (320, 64)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), seed=3)


@pytest.fixture(scope="module")
def offline(checkpoint):
    """Encode one image alone, the way a user would without the server."""
    model = gf.VisionModel.from_pretrained(checkpoint)
    processor = gf.VisionProcessor()
    cache = {}

    def encode(data: bytes) -> np.ndarray:
        if data not in cache:
            out = processor(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
            with torch.no_grad():
                cache[data] = model(out["pixel_values"], out["image_grid_thw"]).numpy()
        return cache[data]

    return encode


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    srv = Server(checkpoint, tmp_path_factory.mktemp("log") / "server.log", "--max-wait-ms", "20",
                 "--max-body-mb", "1", "--max-image-pixels", "1000000",
                 "--cache-mb", "0")  # every request reaches the model (the cache is tested in test_serving_cache)
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server(checkpoint, tmp_path):
    """A server of the test's own; options passed via `fresh_server(*options)`."""
    started = []

    def start(*options):
        srv = Server(checkpoint, tmp_path / f"server{len(started)}.log", *options)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def test_concurrent_requests_equal_offline_encoding(server, offline):
    images = [png_bytes(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    requests = []
    for i in range(18):  # 1 to 3 images per request, mixed sizes, both encodings
        picked = [images[(i + k) % len(images)] for k in range(1 + i % 3)]
        fmt = "base64" if i % 2 else "float"
        encoded = [b64(d) if k % 2 else "data:image/png;base64," + b64(d) for k, d in enumerate(picked)]
        requests.append((picked, {"images": encoded, "encoding_format": fmt}))
    batches_before = server.metric("glm4v_batch_size_requests_count")
    responses = asyncio.run(post_many(server.url, [body for _, body in requests], concurrency=18))
    for (picked, body), response in zip(requests, responses):
        assert not isinstance(response, Exception), response
        check_response(response, picked, offline)
        kind = type(response.json()["data"][0]["embedding"])
        assert kind is (str if body["encoding_format"] == "base64" else list)
    # Requests really were packed together (fewer forwards than requests).
    assert server.metric("glm4v_batch_size_requests_count") - batches_before < len(requests)


def _bad_requests():
    good = b64(png_bytes(40, 40, seed=0))
    png = png_bytes(64, 64, seed=1)
    huge = io.BytesIO()
    Image.new("RGB", (2000, 1000), (255, 0, 0)).save(huge, "PNG")  # 2 Mpx, a few KiB compressed
    j = json.dumps
    return [
        ("malformed json", b'{"images": [', 400),
        ("not utf-8", b"\xff\xfe\x00", 400),
        ("not an object", b'["x"]', 400),
        ("missing images", j({"encoding_format": "float"}).encode(), 400),
        ("images not a list", j({"images": good}).encode(), 400),
        ("empty images", j({"images": []}).encode(), 400),
        ("image not a string", j({"images": [123]}).encode(), 400),
        ("image is null", j({"images": [None]}).encode(), 400),
        ("bad base64", j({"images": ["@@not base64@@"]}).encode(), 400),
        ("bad padding", j({"images": [good[:-3]]}).encode(), 400),
        ("data url without base64", j({"images": ["data:image/png," + good]}).encode(), 400),
        ("empty image", j({"images": [""]}).encode(), 400),
        ("not an image", j({"images": [b64(b"hello world, not a picture")]}).encode(), 400),
        ("truncated png", j({"images": [b64(png[: len(png) // 2])]}).encode(), 400),
        ("bad encoding_format", j({"images": [good], "encoding_format": "int8"}).encode(), 400),
        ("encoding_format wrong type", j({"images": [good], "encoding_format": 1}).encode(), 400),
        ("image over --max-image-pixels", j({"images": [b64(huge.getvalue())]}).encode(), 413),
        ("body over --max-body-mb", j({"images": ["A" * (1200 * 1024)]}).encode(), 413),
    ]


@pytest.mark.parametrize("name,body,status", _bad_requests(), ids=[r[0] for r in _bad_requests()])
def test_bad_input_gets_its_4xx(server, name, body, status):
    r = httpx.post(server.url + "/v1/embeddings", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)


def test_routes_errors_and_metrics(server, offline):
    assert httpx.get(server.url + "/v1/embeddings", timeout=10).status_code == 405
    r = httpx.get(server.url + "/no/such/route", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    # A chunked body (no Content-Length) over the limit is cut off while streaming.
    r = httpx.post(server.url + "/v1/embeddings", content=iter([b"x" * 65536] * 20), timeout=10)
    assert r.status_code == 413
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["out_hidden_size"] == TINY["out_hidden_size"]
    # After all the bad input above, the server still encodes, and it never answered 500.
    data = png_bytes(70, 50, seed=9)
    check_response(httpx.post(server.url + "/v1/embeddings", json={"images": [b64(data)]}, timeout=30), [data],
                   offline)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("glm4v_requests_total", "glm4v_batch_size_images_bucket", "glm4v_batch_size_tokens_bucket",
                 "glm4v_queue_depth", "glm4v_request_latency_seconds_bucket", "glm4v_batch_latency_seconds_bucket"):
        assert name in text
    assert 'status="500"' not in text
    assert server.metric('glm4v_requests_total{route="/v1/embeddings",status="400"}') >= 1


def test_disconnecting_clients_do_not_break_the_server(server, offline):
    data = png_bytes(120, 80, seed=5)
    body = json.dumps({"images": [b64(data)]}).encode()
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    for payload in (head + body[: len(body) // 2],    # gone in the middle of the body
                    head + body,                      # gone before the response
                    b"GARBAGE \x00\x01\r\n\r\n"):     # not HTTP at all
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(payload)
    check_response(httpx.post(server.url + "/v1/embeddings", content=body, timeout=30), [data], offline)
    deadline = time.monotonic() + 10  # the abandoned requests finish (or are dropped) and free their slots
    while httpx.get(server.url + "/health", timeout=5).json()["queue_depth"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert 'status="500"' not in httpx.get(server.url + "/metrics", timeout=10).text


def test_flood_past_max_queue_gets_503_never_500(fresh_server, offline):
    srv = fresh_server("--max-queue", "2", "--max-wait-ms", "100")
    data = png_bytes(64, 64, seed=11)
    responses = asyncio.run(post_many(srv.url, [{"images": [b64(data)]}] * 40, concurrency=40))
    statuses = [r.status_code for r in responses if not isinstance(r, Exception)]
    assert len(statuses) == 40, [r for r in responses if isinstance(r, Exception)]
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_overloaded"
        else:
            check_response(r, [data], offline)
    assert httpx.get(srv.url + "/health", timeout=5).status_code == 200


def test_soak_keeps_memory_flat(server, offline):
    images = [png_bytes(w, h, seed=100 + i) for i, (w, h) in enumerate([(30, 30), (56, 40), (40, 72)])]
    bodies = [{"images": [b64(images[i % 3])], "encoding_format": "base64"} for i in range(1000)]
    asyncio.run(post_many(server.url, bodies[:100], concurrency=8))  # warm up allocator and caches
    rss_before = server.rss_kb()
    started = time.monotonic()
    responses = asyncio.run(post_many(server.url, bodies, concurrency=8))
    elapsed = time.monotonic() - started
    rss_after = server.rss_kb()
    assert all(not isinstance(r, Exception) and r.status_code == 200 for r in responses)
    for i in (0, 1, 2, 999):
        check_response(responses[i], [images[i % 3]], offline)
    assert elapsed < 60, f"1000 requests took {elapsed:.1f} s"
    assert rss_after - rss_before < 64 * 1024, f"RSS grew from {rss_before} kB to {rss_after} kB"


def test_sigterm_drains_admitted_requests(fresh_server, offline):
    # Requests wait up to 3 s for batch-mates, so they are certainly admitted and queued when SIGTERM comes.
    srv = fresh_server("--max-wait-ms", "3000", "--max-batch-tokens", "1000000", "--log-level", "info")
    images = [png_bytes(w, h, seed=200 + i) for i, (w, h) in enumerate(SIZES)]

    async def scenario():
        first = asyncio.ensure_future(post_many(srv.url, [{"images": [b64(d)]} for d in images], len(images)))
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(base_url=srv.url, timeout=5) as client:
            while (await client.get("/health")).json()["queue_depth"] < len(images):
                assert time.monotonic() < deadline, "requests were not admitted"
                await asyncio.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        late = await post_many(srv.url, [{"images": [b64(images[0])]}] * 4, concurrency=4, timeout=10)
        # What the log promises: the port is closed while the admitted requests are still being finished.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
        return await first, late

    accepted, late = asyncio.run(scenario())
    for response, data in zip(accepted, images):
        assert not isinstance(response, Exception), response
        check_response(response, [data], offline)
    for response in late:
        assert isinstance(response, CONNECTION_ERRORS) or response.status_code == 503, response
    assert srv.proc.wait(timeout=30) == 0, srv.output()
    log = srv.output()
    assert (f"SIGTERM received: draining: new connections are refused and idle ones closed, requests still "
            f"arriving get 503, the {len(images)} admitted are finished") in log, log
    assert "drained and stopped" in log


def test_draining_refuses_new_requests(checkpoint, offline):
    from starlette.testclient import TestClient

    from glm4v_fast.serving import EmbeddingService, ServeSettings, create_app

    service = EmbeddingService(gf.VisionModel.from_pretrained(checkpoint), gf.VisionProcessor(),
                               ServeSettings(max_wait_ms=0))
    data = png_bytes(50, 50, seed=7)
    with TestClient(create_app(service)) as client:
        check_response(client.post("/v1/embeddings", json={"images": [b64(data)]}), [data], offline)
        service.start_draining()
        r = client.post("/v1/embeddings", json={"images": [b64(data)]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_shutting_down"
        assert client.get("/health").json()["status"] == "draining"
    assert not service.batcher._thread.is_alive()  # the lifespan shutdown stopped the worker
