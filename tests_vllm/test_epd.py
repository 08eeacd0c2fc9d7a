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
    del consumer


@pytest.fixture
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


def _images_encoded(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("glm4v_images_total"))


def test_connector_fetches_from_glm4v_fast_serve(checkpoints, encoder_server):
    from vllm.config import ECTransferConfig

    path = checkpoints["glm4v"]
    case = prompts()["two_images"]
    consumer = make_llm(path, fast=True, ec_transfer_config=ECTransferConfig(
        ec_connector="GLM4VFastECConnector", ec_role="ec_consumer",
        ec_connector_module_path="glm4v_fast.integrations.vllm.ec_connector",
        ec_connector_extra_config={"server_url": encoder_server}))
    calls = TowerCalls(consumer)
    before = _images_encoded(encoder_server)
    epd = greedy(consumer, [_with_uuids(case, ["glm4v-fast:a", "glm4v-fast:b"])])[0]
    assert calls.count == 0
    assert _images_encoded(encoder_server) == before + 2         # the two images, by the server
    pixel = greedy(consumer, [case])[0]                           # no prefix: the engine's tower runs
    assert calls.count > 0
    assert epd == pixel
    del consumer


def test_connector_refuses_a_prefixed_video_in_the_engine(checkpoints):
    """A video whose UUID has the connector's prefix stops the request with a ValueError naming it (the connector
    fetches images only; the scheduler raises it, here in the test's in-process engine); no server is contacted."""
    from vllm.config import ECTransferConfig

    case = prompts()["video"]
    consumer = make_llm(checkpoints["glm4v"], fast=True, ec_transfer_config=ECTransferConfig(
        ec_connector="GLM4VFastECConnector", ec_role="ec_consumer",
        ec_connector_module_path="glm4v_fast.integrations.vllm.ec_connector",
        ec_connector_extra_config={"server_url": f"http://127.0.0.1:{free_port()}"}))
    with pytest.raises(ValueError, match="fetches images only; the video item 'glm4v-fast:clip' has the prefix"):
        greedy(consumer, [{**case, "multi_modal_uuids": {"video": ["glm4v-fast:clip"]}}])
    del consumer
