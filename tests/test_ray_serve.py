"""The Ray Serve deployment on a local Ray instance (CPU), over HTTP on 127.0.0.1: the embedding server's API.

One Ray instance and one deployment serve every assertion (Ray's start-up is the slow part on 2 cores).
"""
from __future__ import annotations

import asyncio
import faulthandler
import io

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve")
pytest.importorskip("grpc")  # ray.serve imports without its extra's dependencies, then fails at serve.start
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

import glm4v_fast as gf  # noqa: E402
from glm4v_fast.serving import SAFETENSORS_MEDIA_TYPE, embeddings_from_response  # noqa: E402
from glm4v_fast.serving.client import EmbeddingClient  # noqa: E402

from _tiny import b64, free_port, png_bytes, rel_err, save_tiny_checkpoint  # noqa: E402

RAY_TIMEOUT_S = 240
KEY = "ray-serve-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIZES = [(60, 100), (200, 130), (33, 47), (150, 150)]


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory):
    import ray
    from ray import serve

    from glm4v_fast.integrations.ray_serve import encoder_app

    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=3)
    port = free_port()
    # A hung Ray start must not hang the suite: dump every thread's stack and exit after the bound.
    faulthandler.dump_traceback_later(RAY_TIMEOUT_S, exit=True)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = encoder_app(checkpoint, settings={"max_wait_ms": 50, "max_images_per_request": 8}, api_key=KEY)
        serve.run(app, name="glm4v", route_prefix="/glm4v")
        yield checkpoint, f"http://127.0.0.1:{port}/glm4v"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            faulthandler.cancel_dump_traceback_later()


def test_ray_serve_deployment_answers_like_the_server(serve_url):
    checkpoint, url = serve_url
    model, processor = gf.VisionModel.from_pretrained(checkpoint), gf.VisionProcessor()
    images = [png_bytes(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]

    def offline(data: bytes) -> np.ndarray:
        out = processor(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
        with torch.no_grad():
            return model(out["pixel_values"], out["image_grid_thw"]).numpy()

    async def post_all():
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=AUTH) as client:
            bodies = [{"images": [b64(images[i]), b64(images[(i + 1) % len(images)])],
                       "encoding_format": "base64" if i % 2 else "float"} for i in range(len(images))]
            return bodies, await asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies))

    # Concurrent requests, both JSON encodings: each gets its own images' embeddings.
    bodies, responses = asyncio.run(post_all())
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        payload = r.json()
        assert payload["usage"]["images"] == 2
        for k, item in enumerate(payload["data"]):
            expected = offline(images[(i + k) % len(images)])
            assert item["index"] == k and list(item["shape"]) == list(expected.shape)
            assert rel_err(embeddings_from_response(item), expected) <= 1e-5
    # The binary answers and the strict parsing are the server's own.
    from safetensors.torch import load

    r = httpx.post(url + "/v1/embeddings", json={"input": [b64(images[0])], "dtype": "bfloat16"},
                   headers={"accept": SAFETENSORS_MEDIA_TYPE, **AUTH}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == SAFETENSORS_MEDIA_TYPE
    tensors = load(r.content)
    assert tensors["embedding.0"].dtype == torch.bfloat16
    assert rel_err(tensors["embedding.0"].float(), offline(images[0])) <= 1e-2
    r = httpx.post(url + "/v1/embeddings", json={"images": [b64(images[0])], "encoding_fromat": "base64"},
                   headers=AUTH, timeout=60)
    assert r.status_code == 400 and "'encoding_fromat'" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/embeddings", json={"images": ["https://example.com/cat.png"]}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 400 and "looks like a URL" in r.json()["error"]["message"]
    # The other routes.
    health = httpx.get(url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert "glm4v_images_total" in httpx.get(url + "/metrics", timeout=30).text
    assert httpx.get(url + "/v1/embeddings", timeout=30).status_code == 405
    assert httpx.get(url + "/nowhere", timeout=30).status_code == 404
    # The key is required as on `glm4v-fast serve`, and the shipped client passes it.
    r = httpx.post(url + "/v1/embeddings", json={"images": [b64(images[0])]}, timeout=60)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    (embedding,) = EmbeddingClient(url, api_key=KEY).embed([images[1]])
    assert rel_err(embedding, offline(images[1])) <= 1e-5
    # A replica counts its requests and times them like the server (one replica here: all of them).
    metrics = httpx.get(url + "/metrics", timeout=30).text
    assert 'glm4v_requests_total{route="/v1/embeddings",status="200"} 6.0' in metrics, metrics
    assert 'glm4v_requests_total{route="/v1/embeddings",status="401"} 1.0' in metrics
    assert 'glm4v_requests_total{route="other",status="404"} 1.0' in metrics
    assert "glm4v_request_latency_seconds_count 8.0" in metrics       # the 400s too; not the 401 or the 405
