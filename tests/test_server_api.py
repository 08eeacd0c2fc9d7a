"""The embedding server's request and response formats (issue 10), through real HTTP on 127.0.0.1.

One in-process server (the same protocol and limits as `glm4v-fast serve`) with the tiny checkpoint and a small
embedding cache serves every test here: strict requests, binary answers (base64 dtypes, safetensors), the cache,
and videos (a container file and a list of frames) against the offline pipeline.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

import glm4v_fast as gf  # noqa: E402
from glm4v_fast.serving import embeddings_from_response  # noqa: E402
from glm4v_fast.serving.app import SAFETENSORS_MEDIA_TYPE  # noqa: E402
from glm4v_fast.serving.cache import EmbeddingCache  # noqa: E402

from _tiny import b64, png_bytes, rel_err, save_tiny_checkpoint  # noqa: E402
from test_server_hostile import Live, error_of  # noqa: E402

# The cache holds CACHE_ENTRIES embeddings of a 56x56 image (out_hidden_size 48, float32): room for a few.
ROWS_56 = gf.VisionProcessor().get_number_of_image_patches(56, 56)
ENTRY_BYTES = ROWS_56 // 4 * 48 * 4
CACHE_ENTRIES = 4


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from glm4v_fast.serving import EmbeddingService, ServeSettings

    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=3)
    settings = ServeSettings(max_wait_ms=2, max_images_per_request=16, decode_workers=2,
                             cache_mb=CACHE_ENTRIES * ENTRY_BYTES / 2**20)
    model = gf.VisionModel.from_pretrained(checkpoint)
    service = EmbeddingService(model, gf.VisionProcessor(), settings)
    server = Live(service, settings, tmp_path_factory.mktemp("live"))
    server.pipeline = gf.GLM4VEmbeddingPipeline(model=model, processor=gf.VisionProcessor())
    yield server
    server.stop()


def offline(api, data: bytes) -> np.ndarray:
    return api.pipeline.extract_image_embeddings([Image.open(io.BytesIO(data))])[0].float().numpy()


# ---------------------------------------------------------------------------------------------------------------
# 1. strict requests
# ---------------------------------------------------------------------------------------------------------------
def test_strict_requests(api):
    image = b64(png_bytes(40, 60, seed=1))
    # A misspelt option is refused, naming it, instead of silently answering in the default format.
    for body, field in (({"images": [image], "encoding_fromat": "base64"}, "encoding_fromat"),
                        ({"images": [image], "extra": 1}, "extra"),
                        ({"videos": [{"frames": [image], "fps": 2, "rate": 1}]}, "rate")):
        assert f"unknown field {field!r}" in error_of(api.post(body), 400)["message"]
    # `input` is an alias of `images` (OpenAI style, with `model` accepted and ignored); both at once is refused.
    by_images = api.post({"images": [image]}).json()
    by_input = api.post({"input": [image], "model": "anything", "user": "u1"}).json()
    assert by_input["data"] == by_images["data"]
    assert api.post({"input": image}).json()["data"] == by_images["data"]  # a single string is one image
    assert "not both" in error_of(api.post({"images": [image], "input": [image]}), 400)["message"]
    # URLs and file paths are not fetched, and the error says so (not "invalid base64").
    for value, kind in (("http://169.254.169.254/latest/meta-data", "URL"), ("https://example.com/a.png", "URL"),
                        ("file:///etc/passwd", "URL"), ("s3://bucket/key.jpg", "URL"),
                        ("/etc/hosts.png", "file path"), ("./images/cat.jpg", "file path"),
                        ("cat.png", "file path"), ("~/photo.jpeg", "file path"), ("C:\\x\\y.png", "URL")):
        message = error_of(api.post({"images": [image, value]}), 400)["message"]
        assert message.startswith(f"images[1] looks like a {kind}") and "base64" in message, message
        assert "not valid base64" not in message
    message = error_of(api.post({"input": ["http://x/y.png"]}), 400)["message"]
    assert message.startswith("input[0] looks like a URL")
    # dtype needs a binary answer; unknown dtypes are refused.
    assert "base64" in error_of(api.post({"images": [image], "dtype": "float16"}), 400)["message"]
    assert "'dtype' must be one of" in error_of(api.post({"images": [image], "encoding_format": "base64",
                                                          "dtype": "int8"}), 400)["message"]


# ---------------------------------------------------------------------------------------------------------------
# 2. compact binary answers
# ---------------------------------------------------------------------------------------------------------------
def test_base64_dtypes_and_safetensors(api):
    from safetensors.torch import load

    # Larger than the whole cache: every request encodes this pair in one forward, so answers are bit-identical
    # (a mix of cached and fresh images packs differently, which changes float rounding).
    images = [png_bytes(280, 224, seed=11), png_bytes(224, 336, seed=12)]
    assert api.service.processor.get_number_of_image_patches(224, 280) * 48 > CACHE_ENTRIES * ENTRY_BYTES
    body = {"images": [b64(d) for d in images]}
    floats = api.post(body).json()
    reference = [torch.from_numpy(embeddings_from_response(item)) for item in floats["data"]]
    for data, ref in zip(images, reference):
        assert rel_err(ref, offline(api, data)) <= 1e-5
    for dtype, torch_dtype in (("float32", torch.float32), ("float16", torch.float16),
                               ("bfloat16", torch.bfloat16)):
        payload = api.post({**body, "encoding_format": "base64", "dtype": dtype}).json()
        for item, ref in zip(payload["data"], reference):
            assert item["dtype"] == dtype
            raw = base64.b64decode(item["embedding"])
            assert len(raw) == ref.numel() * torch_dtype.itemsize
            # Exactly the float32 values rounded to the dtype, little-endian (bfloat16: its bit pattern).
            expected = ref.to(torch_dtype).view(torch.int16 if torch_dtype != torch.float32 else torch.int32)
            got = np.frombuffer(raw, dtype="<i2" if torch_dtype != torch.float32 else "<i4").reshape(item["shape"])
            np.testing.assert_array_equal(got, expected.numpy())
            np.testing.assert_array_equal(embeddings_from_response(item), ref.to(torch_dtype).float().numpy())
    # safetensors when the Accept header asks for it; dtype applies, encoding_format is not needed.
    for dtype in ("float32", "bfloat16"):
        r = api.post({**body, "dtype": dtype}, headers={"accept": f"{SAFETENSORS_MEDIA_TYPE}, application/json"})
        assert r.status_code == 200 and r.headers["content-type"] == SAFETENSORS_MEDIA_TYPE
        tensors = load(r.content)
        assert sorted(tensors) == ["embedding.0", "embedding.1", "grid_thw"]
        assert tensors["grid_thw"].tolist() == [item["grid_thw"] for item in floats["data"]]
        for i, ref in enumerate(reference):
            assert tensors[f"embedding.{i}"].dtype == getattr(torch, dtype)
            np.testing.assert_array_equal(tensors[f"embedding.{i}"].float().numpy(),
                                          ref.to(getattr(torch, dtype)).float().numpy())
    # Errors stay JSON whatever the Accept header says.
    r = api.post({"images": ["@@"]}, headers={"accept": SAFETENSORS_MEDIA_TYPE})
    assert r.status_code == 400 and "images[0]" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------------------
# 3. the embedding cache
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# 5. videos
# ---------------------------------------------------------------------------------------------------------------
def _frames(t: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, height, width, 3)).astype(np.int16)
    return np.clip(base + 8 * np.arange(t)[:, None, None, None], 0, 255).astype(np.uint8)


def test_videos_equal_the_offline_pipeline(api, tmp_path):
    from test_video import _write_video

    clip = _frames(9, 64, 96, seed=5)
    path = tmp_path / "clip.mp4"
    _write_video(path, clip, fps=6, codec="mpeg4")
    frames = _frames(5, 50, 70, seed=6)
    frame_b64 = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "PNG")
        frame_b64.append(b64(buf.getvalue()))
    image = png_bytes(60, 40, seed=7)
    body = {"images": [b64(image)], "encoding_format": "base64",
            "videos": [b64(path.read_bytes()), {"frames": frame_b64, "fps": 4}]}
    r = api.post(body)
    assert r.status_code == 200, r.text
    payload = r.json()
    expected = [api.pipeline.extract_video_embeddings([str(path)], return_dict=True),
                api.pipeline.extract_video_embeddings([frames], video_metadata=[{"fps": 4}], return_dict=True)]
    assert len(payload["videos"]) == 2 and payload["usage"]["videos"] == 2
    for j, (item, ref) in enumerate(zip(payload["videos"], expected)):
        assert item["object"] == "video_embedding" and item["index"] == j
        assert item["grid_thw"] == ref["grid_thw"][0].tolist()
        assert item["timestamps"] == pytest.approx(list(ref["timestamps"][0]))
        assert rel_err(embeddings_from_response(item), ref["embeddings"][0]) <= 1e-5
    assert rel_err(embeddings_from_response(payload["data"][0]), offline(api, image)) <= 1e-5
    tokens = payload["data"][0]["shape"][0] + sum(v["shape"][0] for v in payload["videos"])
    assert payload["usage"]["tokens"] == tokens
    # The same over safetensors: video tensors, their grid, timestamps in the metadata.
    from safetensors import safe_open
    r = api.post({k: v for k, v in body.items() if k != "encoding_format"},
                 headers={"accept": SAFETENSORS_MEDIA_TYPE})
    (tmp_path / "answer.safetensors").write_bytes(r.content)
    with safe_open(str(tmp_path / "answer.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["video_timestamps"]) == [v["timestamps"] for v in payload["videos"]]
        assert f.get_tensor("video_grid_thw").tolist() == [v["grid_thw"] for v in payload["videos"]]
        assert rel_err(f.get_tensor("video_embedding.1"), expected[1]["embeddings"][0]) <= 1e-5
    # Bad videos get a 4xx naming them; the limits apply to frames as to images.
    cases = [({"videos": [b64(b"not a video at all")]}, 400, "videos[0]"),
             ({"videos": [{"frames": frame_b64}]}, 400, "videos[0].fps"),
             ({"videos": [{"frames": [frame_b64[0], b64(png_bytes(20, 20))], "fps": 2}]}, 400, "videos[0].frames[1]"),
             ({"videos": [{"frames": ["http://x/f.png"], "fps": 2}]}, 400, "videos[0].frames[0] looks like a URL"),
             ({"videos": [{"frames": frame_b64 * 4, "fps": 2}]}, 413, "--max-images-per-request"),
             ({"videos": "x"}, 400, "'videos' must be a list"),
             # 9 frames at 6 fps sample to 4 frames: with 13 images that is 17 decoded pictures, over 16
             ({"images": [b64(image)] * 13, "videos": [b64(path.read_bytes())]}, 413, "sampled to 4 frames")]
    for body, status, needle in cases:
        assert needle in error_of(api.post(body), status)["message"]
