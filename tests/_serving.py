"""Helpers of the server tests: the server as a subprocess or in a thread of the test process, on 127.0.0.1."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

# The server stack (the `serve` extra): a test module importing these helpers is skipped without it.
for _module in ("starlette", "uvicorn", "prometheus_client"):
    pytest.importorskip(_module)
httpx = pytest.importorskip("httpx")

from glm4v_fast.serving import embeddings_from_response  # noqa: E402

from _tiny import free_port, rel_err  # noqa: E402

START_TIMEOUT = 90
CONNECTION_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
                     httpx.ConnectTimeout)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Server:
    """`python -m glm4v_fast.serving` in a subprocess; always killed by stop()."""

    def __init__(self, checkpoint, log_path, *options: str, env: dict | None = None, verify=True):
        self.port = free_port()
        self.url = f"{'https' if '--ssl-certfile' in options else 'http'}://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "glm4v_fast.serving", "--checkpoint", str(checkpoint), "--port",
               str(self.port), "--log-level", "warning", *options]
        # One intra-op thread keeps the tiny model's latency predictable on a 2-core machine shared with clients.
        env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2, verify=verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not become healthy in {START_TIMEOUT} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def metric(self, name: str) -> float:
        """Sum of a metric's samples in /metrics (all label values)."""
        total = 0.0
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


class Live:
    """build_server's uvicorn in a thread of the test process; `server_options` (TLS files) go to build_server."""

    def __init__(self, service, settings, tmp_path, **server_options):
        from glm4v_fast.serving.server import build_server

        self.port = free_port()
        scheme = "https" if server_options.get("ssl_certfile") else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.service, self.settings = service, settings
        self.server = build_server(service, settings, "127.0.0.1", self.port, log_level="warning", **server_options)
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


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def assert_healthy(live) -> None:
    r = live.health()
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    assert 'status="500"' not in httpx.get(live.url + "/metrics", timeout=10).text


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


async def post_many(url: str, bodies: list[dict], concurrency: int, timeout: float = 30.0):
    """POST every body to /v1/embeddings with at most `concurrency` in flight; responses or exceptions."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one(body):
            async with sem:
                try:
                    return await client.post("/v1/embeddings", json=body)
                except httpx.HTTPError as exc:
                    return exc

        return await asyncio.gather(*(one(b) for b in bodies))


def check_response(response, images: list[bytes], offline) -> None:
    assert response.status_code == 200, response.text
    payload = response.json()
    assert len(payload["data"]) == len(images)
    tokens = 0
    for i, (item, data) in enumerate(zip(payload["data"], images)):
        assert item["index"] == i
        got, expected = embeddings_from_response(item), offline(data)
        assert got.shape == expected.shape and list(item["shape"]) == list(expected.shape)
        assert np.prod(item["grid_thw"]) == expected.shape[0] * 4
        assert rel_err(got, expected) <= 1e-5
        tokens += expected.shape[0]
    assert payload["usage"] == {"images": len(images), "tokens": tokens}


def live_server(tmp_path_factory, seed: int = 3, server_options: dict | None = None, **settings) -> Live:
    """A Live server on the tiny checkpoint with these ServeSettings; `.pipeline` encodes offline with its model."""
    import glm4v_fast as gf
    from _tiny import save_tiny_checkpoint
    from glm4v_fast.serving import EmbeddingService, ServeSettings

    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=seed)
    settings = ServeSettings(**settings)
    model = gf.VisionModel.from_pretrained(checkpoint)
    server = Live(EmbeddingService(model, gf.VisionProcessor(), settings), settings, tmp_path_factory.mktemp("live"),
                  **(server_options or {}))
    server.pipeline = gf.GLM4VEmbeddingPipeline(model=model, processor=gf.VisionProcessor())
    return server


def live_fixture(**settings):
    """A module-scoped fixture of a live_server with these settings, stopped after the module's tests."""
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        server = live_server(tmp_path_factory, **settings)
        yield server
        server.stop()

    return fixture
