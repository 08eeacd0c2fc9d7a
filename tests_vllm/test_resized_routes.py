"""Photos that need resizing, through every route into vLLM: the pixel route's tokens every time.

vLLM preprocesses with transformers' default image processor (the torchvision one); glm4v-fast's default backend
equals it bit for bit, so embeddings computed outside the engine (glm4v-fast's pipeline, `glm4v-fast encode`,
`glm4v-fast serve`) and handed to vLLM (as embeddings, or through either EC connector) give the tokens the engine
gives from the pixels. The photos are JPEG-compressed natural-looking pictures with odd sides (200x300, 301x199,
...), which the checkpoint's processor limits shrink to a few dozen patches, so every one is resampled.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from _inputs import TWO_IMAGES_PROMPT, VIDEO_PROMPT, greedy
from _servers import free_port, wait_healthy
from conftest import make_llm, visual_of

SIZES = [(300, 200), (199, 301)]          # (width, height) of the two photos of the prompt
VIDEO_SIZE = (149, 211)                   # (width, height) of the video's frames


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Shading, soft and sharp edges, texture, noise, then a JPEG round trip: what a camera picture has."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    sky = np.stack([110 + 90 * np.cos(3 * yy + seed), 130 + 70 * yy, 210 - 100 * yy + 30 * xx], -1)
    image = Image.fromarray(sky.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * (width, height)
        box = [x0, y0, x0 + rng.uniform(0.1, 0.6) * width, y0 + rng.uniform(0.1, 0.6) * height]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    array = np.asarray(image).astype(np.float64) + rng.normal(0, 5, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Image.Image]:
    """The two photos, as decoded from JPEG files (what the server and `encode` will read)."""
    folder = tmp_path_factory.mktemp("photos")
    images = []
    for i, (w, h) in enumerate(SIZES):
        path = folder / f"photo{i}.jpg"
        path.write_bytes(_jpeg(_photo(w, h, seed=i)))
        images.append(Image.open(path).convert("RGB"))
    return images


@pytest.fixture(scope="module")
def photo_files(photos, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("photo_files")
    paths = []
    for i, image in enumerate(photos):
        path = folder / f"photo{i}.png"      # lossless: the file decodes to exactly the pixels vLLM gets
        image.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def llm(checkpoints):
    engine = make_llm(checkpoints["glm4v"], fast=True, enable_mm_embeds=True)
    yield engine
    del engine


def _case(photos) -> dict:
    return {"prompt": TWO_IMAGES_PROMPT, "multi_modal_data": {"image": list(photos)}}


def _pipeline(path):
    import glm4v_fast as gf

    model = gf.VisionModel.from_pretrained(path, dtype=torch.float32).eval()
    return gf.GLM4VEmbeddingPipeline(model=model, processor=gf.VisionProcessor.from_pretrained(path))


def test_photos_are_resized_and_preprocessed_as_vllm_does(checkpoints, photos):
    """The premise: the processor vLLM runs (transformers' default for the checkpoint) resizes these photos, and
    glm4v-fast's default processor gives its pixel values bit for bit."""
    from transformers import AutoImageProcessor

    import glm4v_fast as gf

    path = checkpoints["glm4v"]
    engine_processor = AutoImageProcessor.from_pretrained(path)
    assert type(engine_processor).__name__ == "Glm4vImageProcessor"          # the torchvision backend
    want = engine_processor(images=photos, return_tensors="pt")
    got = gf.VisionProcessor.from_pretrained(path)(images=photos)
    assert got["image_grid_thw"].tolist() == want["image_grid_thw"].tolist()
    assert all(h * 14 != s[1] or w * 14 != s[0] for (_, h, w), s in zip(got["image_grid_thw"].tolist(), SIZES))
    assert torch.equal(got["pixel_values"], want["pixel_values"])


def test_embeds_route_from_the_pipeline(checkpoints, llm, photos):
    from glm4v_fast.integrations.vllm import embeds_to_multi_modal_data

    info = _pipeline(checkpoints["glm4v"]).extract_image_embeddings(photos, return_dict=True)
    data = embeds_to_multi_modal_data(info["embeddings"], info["grid_thw"])
    got = greedy(llm, [{"prompt": TWO_IMAGES_PROMPT, "multi_modal_data": data}])[0]
    assert len(got) == 8
    assert got == greedy(llm, [_case(photos)])[0]


def test_embeds_route_from_encode(checkpoints, llm, photos, photo_files, tmp_path):
    """`glm4v-fast encode` on the photo files, its safetensors file as vLLM input."""
    from safetensors import safe_open

    from glm4v_fast.integrations.vllm import embeds_to_multi_modal_data

    out = tmp_path / "photos.safetensors"
    result = subprocess.run([sys.executable, "-m", "glm4v_fast", "encode", *photo_files, "--out", str(out),
                             "--checkpoint", str(checkpoints["glm4v"]), "--dtype", "float32", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with safe_open(out, framework="pt") as f:
        embeddings = [f.get_tensor(p) for p in photo_files]
        grids = torch.stack([f.get_tensor(f"{p}::grid_thw").reshape(3) for p in photo_files])
    got = greedy(llm, [{"prompt": TWO_IMAGES_PROMPT, "multi_modal_data": embeds_to_multi_modal_data(embeddings, grids)}])
    assert got[0] == greedy(llm, [_case(photos)])[0]


@pytest.fixture(scope="module")
def encoder_server(checkpoints):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GLM4V_FAST_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "glm4v_fast", "serve", "--checkpoint", str(checkpoints["glm4v"]),
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--device", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, "glm4v-fast serve", 120, lambda: proc.stderr.read().decode())
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_embeds_route_from_the_server(llm, photos, photo_files, encoder_server):
    """The photo files' bytes posted to `glm4v-fast serve`, its answer as vLLM input."""
    from safetensors.torch import load

    from glm4v_fast.integrations.vllm import embeds_to_multi_modal_data
    from glm4v_fast.serving.client import EmbeddingClient

    client = EmbeddingClient(encoder_server)
    body = {"images": [_b64(p) for p in photo_files], "dtype": "float32"}
    answer = httpx.post(f"{encoder_server}/v1/embeddings", json=body, headers={**client.headers(),
                        "Accept": "application/vnd.safetensors"}, timeout=120)
    assert answer.status_code == 200, answer.text
    tensors = load(answer.content)
    embeddings = [tensors[f"embedding.{i}"] for i in range(len(photo_files))]
    data = embeds_to_multi_modal_data(embeddings, tensors["grid_thw"])
    got = greedy(llm, [{"prompt": TWO_IMAGES_PROMPT, "multi_modal_data": data}])[0]
    assert got == greedy(llm, [_case(photos)])[0]


def _b64(path: str) -> str:
    import base64

    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


def test_video_embeds_route_with_resized_frames(checkpoints, llm):
    """A clip whose frames the engine resizes (odd sides): the pipeline's embeddings give the pixel route's prompt
    and tokens."""
    from glm4v_fast.integrations.vllm import embeds_to_multi_modal_data

    w, h = VIDEO_SIZE
    frames = np.stack([np.asarray(_photo(w, h, seed=10 + i)) for i in range(4)])
    meta = {"total_num_frames": 4, "fps": 2.0, "duration": 2.0, "frames_indices": [0, 1, 2, 3],
            "video_backend": "opencv", "do_sample_frames": False}
    case = {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": (frames, meta)}}
    info = _pipeline(checkpoints["glm4v"]).extract_video_embeddings(
        frames, video_metadata={"fps": 2.0}, do_sample_frames=False, return_dict=True)
    (t, gh, gw), = info["grid_thw"].tolist()
    assert (gh * 14, gw * 14) != (h, w)                   # resized
    data = embeds_to_multi_modal_data(info["embeddings"], info["grid_thw"], modality="video",
                                      timestamps=info["timestamps"])
    embeds_case = {"prompt": VIDEO_PROMPT, "multi_modal_data": data}
    assert llm.generate([embeds_case], use_tqdm=False)[0].prompt_token_ids == \
        llm.generate([case], use_tqdm=False)[0].prompt_token_ids
    got = greedy(llm, [embeds_case])[0]
    assert len(got) == 8
    assert got == greedy(llm, [case])[0]


# The EC consumers below build engines of their own; deleting one tears down vLLM's process-wide state, so they
# come after every test of the shared `llm`.


class TowerCalls:
    """Counts forward calls of an engine's vision tower."""

    def __init__(self, engine):
        tower = visual_of(engine)
        self.count, original = 0, tower.forward

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        tower.forward = counted


def _with_uuids(case: dict, uuids: list[str]) -> dict:
    return {**case, "multi_modal_uuids": {"image": uuids}}


def test_epd_shared_folder_from_the_pipeline(checkpoints, photos, tmp_path):
    """ECProducer fills the folder with the pipeline's embeddings of the original photos; the consumer engine
    runs no tower for them and gives the pixel route's tokens."""
    from vllm.config import ECTransferConfig

    from glm4v_fast.integrations.vllm import ECProducer

    path = checkpoints["glm4v"]
    uuids = ["photo-a", "photo-b"]
    info = _pipeline(path).extract_image_embeddings(photos, return_dict=True)
    producer = ECProducer(tmp_path / "ec", dtype=torch.float32)
    producer.put_many(uuids, info["embeddings"])
    consumer = make_llm(path, fast=True, ec_transfer_config=ECTransferConfig(
        ec_connector="ECExampleConnector", ec_role="ec_consumer",
        ec_connector_extra_config={"shared_storage_path": str(tmp_path / "ec")}))
    calls = TowerCalls(consumer)
    epd = greedy(consumer, [_with_uuids(_case(photos), uuids)])[0]
    assert calls.count == 0
    pixel = greedy(consumer, [_case(photos)])[0]
    assert calls.count > 0
    assert epd == pixel
    del consumer


def test_epd_connector_from_the_server(checkpoints, photos, encoder_server):
    from vllm.config import ECTransferConfig

    consumer = make_llm(checkpoints["glm4v"], fast=True, ec_transfer_config=ECTransferConfig(
        ec_connector="GLM4VFastECConnector", ec_role="ec_consumer",
        ec_connector_module_path="glm4v_fast.integrations.vllm.ec_connector",
        ec_connector_extra_config={"server_url": encoder_server}))
    calls = TowerCalls(consumer)
    epd = greedy(consumer, [_with_uuids(_case(photos), ["glm4v-fast:a", "glm4v-fast:b"])])[0]
    assert calls.count == 0
    pixel = greedy(consumer, [_case(photos)])[0]
    assert calls.count > 0
    assert epd == pixel
    del consumer
