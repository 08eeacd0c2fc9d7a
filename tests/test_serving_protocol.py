"""The /v1/embeddings protocol through real HTTP on 127.0.0.1: strict requests, the answer formats (JSON float
and base64 dtypes, safetensors), videos, images loaded like transformers' load_image, and malformed input as 400s.

One in-process server (the same protocol and limits as `glm4v-fast serve`) with the tiny checkpoint serves them.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

# The serve extra (starlette, uvicorn, prometheus-client): skipped without it.
pytest.importorskip("uvicorn")
pytest.importorskip("glm4v_fast.serving.app")

from PIL import Image  # noqa: E402

from glm4v_fast.serving import SAFETENSORS_MEDIA_TYPE, embeddings_from_response  # noqa: E402

from _serving import assert_healthy, error_of, live_fixture  # noqa: E402
from _tiny import b64, png_bytes, rel_err  # noqa: E402
from test_imageio_hostile import _encode, _photo  # noqa: E402


api = live_fixture(max_wait_ms=2, max_images_per_request=16, decode_workers=2, cache_mb=0)


def offline(api, data: bytes) -> np.ndarray:
    return api.pipeline.extract_image_embeddings([Image.open(io.BytesIO(data))])[0].float().numpy()


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


def test_base64_dtypes_and_safetensors(api):
    from safetensors.torch import load

    # The cache is off here: every request encodes this pair in one forward, so answers are bit-identical
    # (a mix of cached and fresh images packs differently, which changes float rounding).
    images = [png_bytes(280, 224, seed=11), png_bytes(224, 336, seed=12)]
    assert not api.service.cache.enabled
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


def test_exif_rotated_jpeg_gets_the_upright_grid(api):
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = _photo(64, 176, seed=3)
    rotated = _encode(Image.fromarray(sideways), "JPEG", exif=exif.tobytes(), quality=95)
    plain = _encode(Image.fromarray(sideways), "JPEG", quality=95)
    r = api.post({"images": ["data:image/jpeg;base64," + b64(rotated), b64(plain)]})
    assert r.status_code == 200, r.text
    grids = [item["grid_thw"] for item in r.json()["data"]]
    assert grids == [[1, 12, 4], [1, 4, 12]]   # portrait as taken; the same pixels without the tag: landscape


def test_big_integer_and_corrupt_formats_get_400(api):
    error_of(api.post(b'{"images": [' + b"7" * 5000 + b"]}"), 400)
    error_of(api.post(b'{"images": ["x"], "n": ' + b"9" * 5000 + b"}"), 400)
    blp = bytearray(_encode(Image.fromarray(_photo(8, 8)).convert("P"), "BLP", blp_version="BLP1"))
    blp[4:8] = (7).to_bytes(4, "little")       # Pillow: NotImplementedError
    assert "images[0]" in error_of(api.post({"images": [b64(bytes(blp))]}), 400)["message"]
    assert_healthy(api)


def test_render_serialises_in_small_pieces():
    """One json.dumps (or tolist) over a whole embedding is one C call holding the GIL, and so stalling the event
    loop, for seconds (12k x 1536 floats: about 11 s). The answer must be built from calls over bounded pieces:
    each piece json_pieces yields is the output of one such call."""
    from glm4v_fast.serving.rendering import json_pieces, render_json

    emb = torch.rand(1500, 1024)
    grid = torch.tensor([[1, 60, 100]])
    for fmt in ("float", "base64"):
        pieces = list(json_pieces("glm4v-vision", [emb], grid, fmt))
        assert b"".join(pieces) == render_json("glm4v-vision", [emb], grid, fmt)
        out = json.loads(b"".join(pieces))
        item = out["data"][0]
        assert item["shape"] == [1500, 1024] and item["grid_thw"] == [1, 60, 100] and item["index"] == 0
        assert out["usage"] == {"images": 1, "tokens": 1500} and out["object"] == "list"
        np.testing.assert_array_equal(embeddings_from_response(item), emb.numpy())
        if fmt == "float":
            biggest = max(piece.count(b",") + 1 for piece in pieces)        # floats serialised by one call
        else:
            biggest = max(len(piece) for piece in pieces) * 3 // 4 // 4  # float32 values base64-encoded by one call
        assert 0 < biggest <= 64 * 1024, f"one call serialised {biggest} floats"


def test_one_route_table_for_every_host(api):
    """Ray Serve hands a replica's service Starlette requests under the route prefix (as root_path), without the
    app: the same routes, errors and request metrics as through uvicorn."""
    import asyncio

    from starlette.requests import Request

    def call(method: str, path: str, body: bytes = b"", headers: tuple = ()):
        scope = {"type": "http", "method": method, "path": "/glm4v" + path, "root_path": "/glm4v",
                 "query_string": b"", "headers": [(b"content-type", b"application/json"), *headers]}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)    # the client stays connected

        async def run():
            return await api.service.dispatch(Request(scope, receive))

        return asyncio.run(run())

    served = api.metric('glm4v_requests_total{route="/v1/embeddings",status="200"}')
    timed = api.metric("glm4v_request_latency_seconds_count")
    other = api.metric('glm4v_requests_total{route="other",status="404"}')
    image = b64(png_bytes(40, 60, seed=1))
    r = call("POST", "/v1/embeddings", json.dumps({"images": [image]}).encode())
    assert r.status_code == 200 and json.loads(r.body)["data"] == api.post({"images": [image]}).json()["data"]
    assert call("GET", "/health/").status_code == 200
    r = call("GET", "/v1/embeddings")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert json.loads(call("GET", "/nowhere").body)["error"]["type"] == "not_found"
    assert api.metric('glm4v_requests_total{route="/v1/embeddings",status="200"}') - served == 2  # + the HTTP one
    assert api.metric("glm4v_request_latency_seconds_count") - timed == 2
    assert api.metric('glm4v_requests_total{route="other",status="404"}') - other == 1
    assert api.metric("glm4v_requests_in_flight") == 0
