"""SGLang's HTTP server with the plugin: the entry point loads in the server's processes (the scheduler builds
glm4v-fast's tower, the tokenizer process uses our processor), and /generate answers the pixel route and the
precomputed-embedding routes (JSON items) with the same tokens, which are transformers'."""
from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from _inputs import cases, sampling, transformers_greedy

pytest.importorskip("httpx")
import httpx  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def server(checkpoints):
    """(base URL, function returning the server's output so far, checkpoint path): GLM-4.1V, default tower choice."""
    path = checkpoints["glm4v"]
    port = _free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if k != "GLM4V_FAST_SGLANG"}      # the default: our tower
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
           "--max-total-tokens", "2048", "--context-length", "1024", "--disable-cuda-graph", "--random-seed", "0",
           "--skip-server-warmup", "--log-level", "info"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def output() -> str:
        with open(log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the SGLang server exited:\n{output()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the SGLang server did not come up:\n{output()[-3000:]}")
        time.sleep(1)
    yield url, output, path
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    os.unlink(log.name)


def _generate(url: str, prompt: str, image_data: list) -> list[int]:
    answer = httpx.post(f"{url}/generate", json={"text": prompt, "image_data": image_data,
                                                 "sampling_params": sampling()}, timeout=300)
    assert answer.status_code == 200, answer.text
    return answer.json()["output_ids"]


def test_plugin_loads_in_the_server_processes(server):
    url, output, _ = server
    prompt, images = cases()["one_image"]
    _generate(url, prompt, [_data_url(images[0])])
    log = output()
    assert "glm4v-fast: Glm4vForConditionalGeneration uses glm4v-fast's vision tower" in log    # the scheduler
    # The server process: its /generate admits preprocessed items and its processor reads them (the next test).


@pytest.mark.parametrize("case", list(cases()))
def test_http_routes_give_transformers_tokens(server, case):
    from glm4v_fast.integrations.sglang import expand_image_tokens, image_item, json_item
    from glm4v_fast.pipeline import GLM4VEmbeddingPipeline, create_glm4v_vision_encoder

    url, _, path = server
    prompt, images = cases()[case]
    pixels = _generate(url, prompt, [_data_url(image) for image in images])
    assert pixels == transformers_greedy(path, prompt, images)
    _, model, processor = create_glm4v_vision_encoder(checkpoint=path, device="cpu", dtype="float32")
    emb = GLM4VEmbeddingPipeline(model, processor).extract_image_embeddings(images, return_dict=True)
    expanded = expand_image_tokens(prompt, emb["grid_thw"])
    for fmt in ("precomputed_embedding", "processor_output"):
        assert _generate(url, expanded, [json_item(image_item(emb, format=fmt))]) == pixels, fmt
