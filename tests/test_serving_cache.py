"""The embedding cache: an LRU bounded in bytes, and repeated images answered from it through real HTTP."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

# The serve extra (starlette, uvicorn, prometheus-client): skipped without it.
pytest.importorskip("uvicorn")
pytest.importorskip("glm4v_fast.serving.app")

from PIL import Image  # noqa: E402

import glm4v_fast as gf  # noqa: E402
from glm4v_fast.serving import embeddings_from_response  # noqa: E402
from glm4v_fast.serving.cache import EmbeddingCache  # noqa: E402

from _serving import live_fixture  # noqa: E402
from _tiny import b64, png_bytes, rel_err  # noqa: E402

# The cache holds CACHE_ENTRIES embeddings of a 56x56 image (out_hidden_size 48, float32): room for a few.
ROWS_56 = gf.VisionProcessor().get_number_of_image_patches(56, 56)
ENTRY_BYTES = ROWS_56 // 4 * 48 * 4
CACHE_ENTRIES = 4


api = live_fixture(max_wait_ms=2, max_images_per_request=16, decode_workers=2,
                   cache_mb=CACHE_ENTRIES * ENTRY_BYTES / 2**20)


def offline(api, data: bytes) -> np.ndarray:
    return api.pipeline.extract_image_embeddings([Image.open(io.BytesIO(data))])[0].float().numpy()


def test_cache_by_bytes_in_process():
    cache = EmbeddingCache(max_bytes=3 * 400)
    tensors = {k: torch.full((10, 10), float(k)) for k in range(5)}  # 400 bytes each
    for k in range(3):
        cache.put(bytes([k]), tensors[k], (1, 2, 20))
    assert cache.bytes == 1200 and len(cache) == 3
    assert cache.get(bytes([0]))[0] is tensors[0]  # 0 becomes the most recently used
    cache.put(bytes([3]), tensors[3], (1, 2, 20))   # evicts 1, the least recently used
    assert cache.get(bytes([1])) is None and cache.get(bytes([0])) is not None and cache.evictions == 1
    cache.put(b"big", torch.zeros(40, 10), (1, 4, 40))  # larger than the whole budget: not stored
    assert cache.get(b"big") is None and cache.bytes == 1200
    assert (cache.hits, cache.misses) == (2, 2)
    off = EmbeddingCache(0)
    off.put(b"x", tensors[0], (1, 2, 20))
    assert off.get(b"x") is None and len(off) == 0


def test_repeated_images_come_from_the_cache(api, monkeypatch):
    encoded_rows = []
    real = api.service.batcher.encode

    def counting(pixel_values, grid):
        encoded_rows.append(int(pixel_values.shape[0]))
        return real(pixel_values, grid)

    monkeypatch.setattr(api.service.batcher, "encode", counting)
    images = [png_bytes(56, 56, seed=100 + i) for i in range(CACHE_ENTRIES + 1)]
    hits, misses = api.metric("glm4v_cache_hits_total"), api.metric("glm4v_cache_misses_total")
    first = api.post({"images": [b64(images[0]), b64(images[1]), b64(images[0])]}).json()  # a repeat inside
    assert encoded_rows == [2 * ROWS_56]  # two distinct images, the repeat encoded once
    assert first["data"][0]["embedding"] == first["data"][2]["embedding"]
    # The same pixels again, sent another way (a data: URL; a PNG compressed at another level).
    again = io.BytesIO()
    Image.open(io.BytesIO(images[1])).save(again, "PNG", compress_level=9)
    second = api.post({"images": ["data:image/png;base64," + b64(images[0]), b64(again.getvalue())]}).json()
    assert encoded_rows == [2 * ROWS_56]  # answered without the model
    assert [d["embedding"] for d in second["data"]] == [d["embedding"] for d in first["data"][:2]]
    assert [d["grid_thw"] for d in second["data"]] == [d["grid_thw"] for d in first["data"][:2]]
    assert rel_err(embeddings_from_response(second["data"][1]), offline(api, images[1])) <= 1e-5
    assert api.metric("glm4v_cache_hits_total") - hits == 2
    assert api.metric("glm4v_cache_misses_total") - misses == 2
    # Eviction by bytes: the cache holds CACHE_ENTRIES such embeddings; more push out the least recently used.
    for data in images[2:]:
        api.post({"images": [b64(data)]})
    assert api.metric("glm4v_cache_bytes") == CACHE_ENTRIES * ENTRY_BYTES
    assert api.metric("glm4v_cache_evictions_total") >= 1
    rows_before = len(encoded_rows)
    again = api.post({"images": [b64(images[0])]}).json()["data"][0]  # evicted: encoded again
    assert len(encoded_rows) == rows_before + 1
    # (alone now, not packed with images[1]: the same values up to float rounding)
    assert rel_err(embeddings_from_response(again), embeddings_from_response(first["data"][0])) <= 1e-5
    assert api.post({"images": [b64(images[0])]}).json()["data"][0] == again  # and cached again
    assert len(encoded_rows) == rows_before + 1
