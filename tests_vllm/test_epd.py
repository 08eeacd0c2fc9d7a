"""Disaggregated encoding: glm4v-fast as vLLM's encoder, through a shared folder or a running server.

The consumer engine must give the pixel route's greedy tokens while running its vision tower zero times for the
items it loads (counted by wrapping the tower's forward).
"""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import torch

from _inputs import greedy, prompts
from _servers import free_port, wait_healthy
from conftest import make_llm, visual_of


class TowerCalls:
    """Counts forward calls of an engine's vision tower."""

    def __init__(self, llm):
        tower = visual_of(llm)
        self.count, original = 0, tower.forward

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        tower.forward = counted


def _pipeline_embeddings(path, images):
    import glm4v_fast as gf

    model = gf.VisionModel.from_pretrained(path, dtype=torch.float32).eval()
    processor = gf.VisionProcessor.from_pretrained(path)
    info = gf.GLM4VEmbeddingPipeline(model=model, processor=processor).extract_image_embeddings(
        images, return_dict=True)
    return info["embeddings"]


def _with_uuids(case: dict, uuids: list[str]) -> dict:
    return {**case, "multi_modal_uuids": {"image": uuids}}


def test_producer_writes_what_vllm_example_connector_reads(checkpoints, tmp_path):
    from vllm.config import ECTransferConfig

    from glm4v_fast.integrations.vllm import ECProducer

    path = checkpoints["glm4v"]
    case = prompts()["two_images"]
    uuids = ["img-a", "img-b"]
    producer = ECProducer(tmp_path / "ec", dtype=torch.float32)
    producer.put_many(uuids, _pipeline_embeddings(path, case["multi_modal_data"]["image"]))
    assert all(producer.has(u) for u in uuids)

    consumer = make_llm(path, fast=True, ec_transfer_config=ECTransferConfig(
        ec_connector="ECExampleConnector", ec_role="ec_consumer",
        ec_connector_extra_config={"shared_storage_path": str(tmp_path / "ec")}))
    calls = TowerCalls(consumer)
    epd = greedy(consumer, [_with_uuids(case, uuids)])[0]
    assert calls.count == 0
    pixel = greedy(consumer, [case])[0]                 # no UUIDs: not in the folder, the tower runs
    assert calls.count > 0
    assert epd == pixel

    # the chat API: a `uuid` beside each image part names it. Fresh UUIDs whose files hold zeros: the answer differs
    # from the pixels' only if the UUIDs reached the connector (the pixels' own embeddings are cached by now).
    from vllm import SamplingParams

    zero_uuids = ["chat-a", "chat-b"]
    producer.put_many(zero_uuids, [torch.zeros(6, 128), torch.zeros(8, 128)])

    def chat(names):
        parts = [{"type": "image_pil", "image_pil": img, **({"uuid": u} if u else {})}
                 for img, u in zip(case["multi_modal_data"]["image"], names)]
        out = consumer.chat([{"role": "user", "content": [*parts, {"type": "text", "text": "compare"}]}],
                            SamplingParams(max_tokens=8, temperature=0), use_tqdm=False,
                            chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
        return list(out[0].outputs[0].token_ids)

    assert chat(uuids) == chat([None, None])            # the folder's embeddings are the pixels' own
    before = calls.count
    zeros = chat(zero_uuids)
    assert calls.count == before                         # loaded, not encoded
    assert zeros != chat(uuids)                          # the zeros were read: by the parts' UUIDs
    del consumer


API_KEY = "epd-test-key"


def _start_encoder(checkpoints, api_key: str | None = None):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GLM4V_FAST_API_KEY"}
    if api_key:
        env["GLM4V_FAST_API_KEY"] = api_key
    proc = subprocess.Popen([sys.executable, "-m", "glm4v_fast", "serve", "--checkpoint", str(checkpoints["glm4v"]),
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--device", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, "glm4v-fast serve", 120, lambda: proc.stderr.read().decode())
    return proc, url


def _stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture
def encoder_server(checkpoints):
    """A glm4v-fast serve that requires API_KEY."""
    proc, url = _start_encoder(checkpoints, API_KEY)
    yield url, proc
    if proc.poll() is None:
        _stop(proc)


def _images_encoded(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("glm4v_images_total"))


def _consumer(path, url: str, **extra):
    from vllm.config import ECTransferConfig

    return make_llm(path, fast=True, ec_transfer_config=ECTransferConfig(
        ec_connector="GLM4VFastECConnector", ec_role="ec_consumer",
        ec_connector_module_path="glm4v_fast.integrations.vllm.ec_connector",
        ec_connector_extra_config={"server_url": url, **extra}))


def test_connector_fetches_from_glm4v_fast_serve(checkpoints, encoder_server):
    url, _ = encoder_server
    path = checkpoints["glm4v"]
    case = prompts()["two_images"]
    consumer = _consumer(path, url, api_key=API_KEY)
    calls = TowerCalls(consumer)
    before = _images_encoded(url)
    epd = greedy(consumer, [_with_uuids(case, ["glm4v-fast:a", "glm4v-fast:b"])])[0]
    assert calls.count == 0
    assert _images_encoded(url) == before + 2                     # the two images, by the server
    pixel = greedy(consumer, [case])[0]                           # no prefix: the engine's tower runs
    assert calls.count > 0
    assert epd == pixel
    del consumer


def test_connector_without_the_key_stops_at_start_naming_the_fix(checkpoints, encoder_server, monkeypatch):
    """The server requires a key, the consumer has none: the engine does not start, and the error says where the
    key goes (rather than an engine that dies at its first request)."""
    url, _ = encoder_server
    monkeypatch.delenv("GLM4V_FAST_API_KEY", raising=False)
    with pytest.raises(Exception, match=r"requires an API key and no key was sent.*ec_connector_extra_config"):
        _consumer(checkpoints["glm4v"], url)


def test_server_gone_later_leaves_the_images_to_vllms_tower(checkpoints, encoder_server):
    """The server stops after the engine started: the request is answered (the pixel route's tokens), its images
    encoded by the engine's own tower; the engine keeps serving."""
    url, proc = encoder_server
    path = checkpoints["glm4v"]
    case = prompts()["two_images"]
    consumer = _consumer(path, url, api_key=API_KEY, timeout_s=10)
    calls = TowerCalls(consumer)
    _stop(proc)
    got = greedy(consumer, [_with_uuids(case, ["glm4v-fast:x", "glm4v-fast:y"])])[0]
    assert calls.count > 0
    assert got == greedy(consumer, [case])[0]
    assert greedy(consumer, [prompts()["one_image"]])[0]          # still serving
    del consumer


def test_prefixed_video_is_encoded_by_vllms_tower(checkpoints):
    """The connector fetches images only: a video whose UUID has its prefix is encoded by the engine's own tower
    (logged), with the pixel route's tokens; nothing is sent to the server."""
    case = prompts()["video"]
    consumer = _consumer(checkpoints["glm4v"], f"http://127.0.0.1:{free_port()}", check_server=False)
    calls = TowerCalls(consumer)
    got = greedy(consumer, [{**case, "multi_modal_uuids": {"video": ["glm4v-fast:clip"]}}])[0]
    assert calls.count > 0
    assert got == greedy(consumer, [case])[0]
    del consumer
