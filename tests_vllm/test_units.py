"""The integration's pieces without an engine: version gate, lazy import, tower choice, helpers, connector I/O."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch


def test_package_imports_without_vllm():
    """No vLLM installed (simulated): the package and its vLLM-free helpers import, the plugin says what's missing."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import glm4v_fast.integrations.vllm as v\n"
        "from glm4v_fast.integrations.vllm import embeds_to_multi_modal_data, ECProducer\n"
        "from glm4v_fast.integrations.vllm import _version\n"
        "_version.installed_vllm_version = lambda: None\n"
        "try:\n"
        "    v.check_vllm_version()\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR glm4v-fast's vLLM integration needs vLLM: pip install 'glm4v-fast[vllm]'" in out.stdout


@pytest.mark.parametrize("version", ["0.31.2", "0.35.0", "1.0.0"])
def test_vllm_outside_tested_range_is_refused(version, monkeypatch):
    from glm4v_fast.integrations.vllm import _version, plugin

    with pytest.raises(RuntimeError, match=rf"tested with vLLM >=0.32.0,<0.35, but vLLM {version} is installed"):
        _version.check_vllm_version(version)
    monkeypatch.setattr(_version, "installed_vllm_version", lambda: version)
    monkeypatch.setattr(plugin, "check_vllm_version", lambda: _version.check_vllm_version(version))
    monkeypatch.delenv("GLM4V_FAST_VLLM", raising=False)
    with pytest.raises(RuntimeError, match="is installed"):
        plugin.register()
    monkeypatch.setenv("GLM4V_FAST_VLLM", "0")           # vLLM's tower wanted anyway: vLLM starts as shipped
    plugin.register()


def test_installed_vllm_is_in_range_and_plugin_registers_through_entry_point():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    from glm4v_fast.integrations.vllm import check_vllm_version

    assert check_vllm_version().split(".")[:2] in (["0", "32"], ["0", "33"], ["0", "34"])
    for version in ("0.32.0", "0.33.0", "0.34.0", "0.34.9"):
        assert check_vllm_version(version) == version
    load_general_plugins()
    models = ModelRegistry.models
    for arch, cls in (("Glm4vForConditionalGeneration", "Glm4vFastForConditionalGeneration"),
                      ("Glm4vMoeForConditionalGeneration", "Glm4vMoeFastForConditionalGeneration")):
        assert models[arch].class_name == cls
        assert models[arch].module_name == "glm4v_fast.integrations.vllm.models"


def test_tower_choice(monkeypatch):
    from glm4v_fast.integrations.vllm.selection import choose_tower

    bf16, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    monkeypatch.delenv("GLM4V_FAST_VLLM", raising=False)
    assert choose_tower("cuda", bf16).use_fast is True
    assert choose_tower("cuda", f16, {"glm4v_fast": "off"}).use_fast is False
    # unforced: an option the tower cannot serve keeps vLLM's tower; forced: a ValueError naming it
    kept = choose_tower("cuda", bf16, blockers=["encoder CUDA graphs (cudagraph_mm_encoder)"])
    assert kept.use_fast is False and "cudagraph_mm_encoder" in kept.reason
    with pytest.raises(ValueError, match="forced on .*cudagraph_mm_encoder"):
        choose_tower("cuda", bf16, {"glm4v_fast": True}, blockers=["encoder CUDA graphs (cudagraph_mm_encoder)"])
    monkeypatch.setenv("GLM4V_FAST_VLLM", "1")             # the environment wins over the config
    assert choose_tower("cpu", f16, {"glm4v_fast": False}).use_fast is True
    monkeypatch.setenv("GLM4V_FAST_VLLM", "0")
    assert choose_tower("cuda", bf16, {"glm4v_fast": True}).use_fast is False
    monkeypatch.setenv("GLM4V_FAST_VLLM", "maybe")
    with pytest.raises(ValueError, match="GLM4V_FAST_VLLM must be one of"):
        choose_tower("cuda", bf16)


def test_cpu_default_is_the_fast_tower_where_it_runs_compiled(monkeypatch):
    """On a CPU, glm4v-fast's tower is the default exactly where its compiled path runs (measured faster than
    vLLM's tower there); eager, vLLM's tower stays."""
    from glm4v_fast import compiled_cpu
    from glm4v_fast.integrations.vllm import selection

    monkeypatch.delenv("GLM4V_FAST_VLLM", raising=False)
    monkeypatch.delenv("GLM4V_FAST_COMPILE", raising=False)
    monkeypatch.setattr(compiled_cpu, "cxx_compiler", lambda: "g++")
    for dtype in (torch.bfloat16, torch.float32):
        choice = selection.choose_tower("cpu", dtype)
        assert choice.use_fast and not choice.forced and "compiled CPU path" in choice.reason
    float16 = selection.choose_tower("cpu", torch.float16)
    assert not float16.use_fast and "float16" in float16.reason
    assert selection.choose_tower("cpu", torch.float32, {"glm4v_fast": True}).use_fast      # forcing still wins
    monkeypatch.setenv("GLM4V_FAST_COMPILE", "off")
    off = selection.choose_tower("cpu", torch.bfloat16)
    assert not off.use_fast and "compile='off'" in off.reason
    monkeypatch.delenv("GLM4V_FAST_COMPILE")
    monkeypatch.setattr(compiled_cpu, "cxx_compiler", lambda: None)
    no_compiler = selection.choose_tower("cpu", torch.bfloat16)
    assert not no_compiler.use_fast and "no C++ compiler" in no_compiler.reason
    assert not selection.choose_tower("xpu", torch.bfloat16).use_fast


def test_encoder_cuda_graphs_and_quantization_block_the_fast_tower():
    from types import SimpleNamespace

    from glm4v_fast.integrations.vllm.models import _blockers

    plain = SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mm_encoder=False), quant_config=None)
    assert _blockers(plain) == []
    graphs = SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mm_encoder=True), quant_config=None)
    assert "cudagraph_mm_encoder" in _blockers(graphs)[0]
    quant = SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mm_encoder=False),
                            quant_config=SimpleNamespace(get_name=lambda: "fp8"))
    assert "fp8" in _blockers(quant)[0]
    lora = SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mm_encoder=False), quant_config=None,
                           lora_config=SimpleNamespace(enable_tower_connector_lora=True))
    assert "enable_tower_connector_lora" in _blockers(lora)[0]


def test_tower_refuses_vllm_encoder_metadata():
    from vllm.model_executor.layers.fusion.mm_input_norm import IdentityInputNorm

    import glm4v_fast as gf
    from glm4v_fast.integrations.vllm.tower import VllmVisionTower

    cfg = gf.VisionConfig(depth=1, hidden_size=64, num_heads=4, out_hidden_size=32, intermediate_size=48,
                          image_size=56)
    tower = VllmVisionTower(cfg, IdentityInputNorm())
    with pytest.raises(ValueError, match="encoder_metadata"):
        tower(torch.zeros(4, 1176), None, encoder_metadata={})
    with pytest.raises(ValueError, match="no parameter 'blocks.9.attn.qkv.weight'"):
        tower.load_weights([("blocks.9.attn.qkv.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="has shape"):
        tower.load_weights([("post_layernorm.weight", torch.zeros(3))])
    assert tower.load_weights([("post_layernorm.weight", torch.full((64,), 2.0))]) == {"post_layernorm.weight"}
    assert torch.equal(tower.post_layernorm.weight.detach(), torch.full((64,), 2.0))


def test_embeds_helpers():
    from glm4v_fast.integrations.vllm import embeds_to_multi_modal_data, image_embeds_content_part
    from glm4v_fast.integrations.vllm.embeds import embeddings_from_server_response

    a, b = torch.randn(6, 8), torch.randn(2, 8)
    data = embeds_to_multi_modal_data([a, b], [[1, 4, 6], [1, 2, 4]])["image"]
    assert torch.equal(data["image_embeds"], torch.cat([a, b]))
    assert data["image_grid_thw"].tolist() == [[1, 4, 6], [1, 2, 4]]
    with pytest.raises(ValueError, match="do not match grid_thw"):
        embeds_to_multi_modal_data([a, b], [[1, 2, 4], [1, 4, 6]])
    with pytest.raises(ValueError, match="modality must be 'image' or 'video'"):
        embeds_to_multi_modal_data([a], [[1, 4, 6]], modality="audio")
    with pytest.raises(ValueError, match="timestamps are for videos"):
        embeds_to_multi_modal_data([a], [[1, 4, 6]], timestamps=[[0.0]])
    with pytest.raises(ValueError, match="needs 8"):
        embeds_to_multi_modal_data(torch.randn(7, 8), [[1, 4, 6], [1, 2, 4]])
    part = image_embeds_content_part(a.bfloat16(), [1, 4, 6])
    assert part["type"] == "image_embeds"
    from vllm.multimodal.media.image import ImageEmbeddingMediaIO

    io = ImageEmbeddingMediaIO()            # how vLLM's chat API reads the two fields
    assert torch.equal(io.load_base64("", part["image_embeds"]["image_embeds"]), a.bfloat16().float())
    assert io.load_base64("", part["image_embeds"]["image_grid_thw"]).tolist() == [1, 4, 6]

    from safetensors.torch import save

    body = save({"embedding.0": a, "embedding.1": b, "grid_thw": torch.tensor([[1, 4, 6], [1, 2, 4]])})
    embs, grid = embeddings_from_server_response(body)
    assert torch.equal(embs[1], b) and grid.tolist() == [[1, 4, 6], [1, 2, 4]]
    json_answer = {"data": [{"index": 0, "grid_thw": [1, 2, 4], "shape": [2, 8], "embedding": b.tolist()}]}
    embs, grid = embeddings_from_server_response(json_answer)
    assert torch.allclose(embs[0], b) and grid.tolist() == [[1, 2, 4]]


def test_server_errors_are_named_with_status_and_message():
    """A refused request (no key: 401) is reported with its status and the server's own message, not as a
    malformed answer."""
    import httpx

    from glm4v_fast.integrations.vllm import embeddings_from_server_response, video_embeddings_from_server_response

    refused = httpx.Response(401, json={"error": {"message": "missing Authorization header: this server needs "
                                                             "'Authorization: Bearer <API key>'",
                                                  "type": "authentication_error"}})
    for read in (embeddings_from_server_response, video_embeddings_from_server_response):
        with pytest.raises(ValueError, match=r"answered 401: missing Authorization header.*send the server's key"):
            read(refused)
    with pytest.raises(ValueError, match="answered 413: too big"):
        embeddings_from_server_response(httpx.Response(413, json={"error": {"message": "too big"}}))
    with pytest.raises(ValueError, match="answered 502: bad gateway"):
        embeddings_from_server_response(httpx.Response(502, content=b"bad gateway"))


def test_producer_layout(tmp_path):
    from safetensors.torch import load_file

    from glm4v_fast.integrations.vllm import ECProducer

    producer = ECProducer(tmp_path, dtype=torch.bfloat16)
    path = producer.put("img-1", torch.randn(6, 8))
    assert path == str(tmp_path / "img-1" / "encoder_cache.safetensors")
    stored = load_file(path)
    assert list(stored) == ["ec_cache"] and stored["ec_cache"].dtype == torch.bfloat16
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(ValueError, match="cannot name a folder"):
            producer.put(bad, torch.randn(6, 8))
    with pytest.raises(ValueError, match="2-D"):
        producer.put("img-2", torch.randn(6))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_producer_file_mode_follows_the_umask(tmp_path, umask):
    """The file gets the mode a plain open() gives (0666 less the umask), like its folder (0777 less the umask),
    so a consumer running as another user reads it where the umask allows."""
    import os
    import stat

    from glm4v_fast.integrations.vllm import ECProducer

    old = os.umask(umask)
    try:
        path = ECProducer(tmp_path / "ec", dtype=torch.float32).put("img-1", torch.randn(6, 8))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o777 & ~umask


def test_choice_is_logged_once_with_kernels_and_attention():
    import logging

    from glm4v_fast.integrations.vllm import selection

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    selection.logger.addHandler(handler)
    old_level = selection.logger.level
    selection.logger.setLevel(logging.INFO)
    try:
        choice = selection.TowerChoice(True, True, "forced on by test")
        for _ in range(3):
            selection.log_choice_once("TestArch", choice, "triton", "flash_attn")
        selection.log_choice_once("TestArch", selection.TowerChoice(False, False, "default on cpu"))
    finally:
        selection.logger.removeHandler(handler)
        selection.logger.setLevel(old_level)
    assert records == ["glm4v-fast: TestArch uses glm4v-fast's vision tower (kernels=triton, attention=flash_attn; "
                       "forced on by test)",
                       "glm4v-fast: TestArch uses vLLM's own vision tower (default on cpu)"]


def test_video_embeds_helpers():
    from glm4v_fast.integrations.vllm import (embeds_to_multi_modal_data, video_embeddings_from_server_response,
                                              video_embeds_content_part)

    v0, v1 = torch.randn(12, 8), torch.randn(4, 8)
    data = embeds_to_multi_modal_data([v0, v1], [[2, 4, 6], [2, 2, 4]], modality="video",
                                      timestamps=[[0.0, 1.0], [0.5, 2.5]])["video"]
    assert torch.equal(data["video_embeds"], torch.cat([v0, v1]))
    assert data["video_grid_thw"].tolist() == [[2, 4, 6], [2, 2, 4]]
    assert data["timestamps"].dtype == torch.float64 and data["timestamps"].tolist() == [[0.0, 1.0], [0.5, 2.5]]
    uneven = embeds_to_multi_modal_data([v0, v1], [[2, 4, 6], [1, 4, 4]], modality="video",
                                        timestamps=[[0.0, 1.0], [3.0]])["video"]["timestamps"]
    assert [t.tolist() for t in uneven] == [[0.0, 1.0], [3.0]]
    one = embeds_to_multi_modal_data(v0, [2, 4, 6], modality="video", timestamps=[0, 1])["video"]
    assert one["timestamps"].tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="video embeddings need timestamps"):
        embeds_to_multi_modal_data([v0], [[2, 4, 6]], modality="video")
    with pytest.raises(ValueError, match=r"has \[2\] temporal slices"):
        embeds_to_multi_modal_data([v0], [[2, 4, 6]], modality="video", timestamps=[[0.0, 1.0, 2.0]])

    part = video_embeds_content_part(v0.bfloat16(), [2, 4, 6], [0.0, 1.0])
    assert part["type"] == "video_embeds" and part["video_embeds"]["timestamps"] == [0.0, 1.0]
    from vllm.multimodal.media.video import VideoEmbeddingMediaIO

    io = VideoEmbeddingMediaIO()            # how vLLM's chat API reads the base64 fields
    assert torch.equal(io.load_base64("", part["video_embeds"]["video_embeds"]), v0.bfloat16().float())
    assert io.load_base64("", part["video_embeds"]["video_grid_thw"]).tolist() == [2, 4, 6]

    # the server's two answer forms (glm4v-fast's own renderers)
    from glm4v_fast.serving.rendering import render_json, render_safetensors

    videos = [(v0, [2, 4, 6], [0.0, 1.0]), (v1, [2, 2, 4], [0.5, 2.5])]
    no_images = torch.zeros(0, 3, dtype=torch.int64)
    for body in (render_safetensors("m", [], no_images, videos=videos),
                 __import__("json").loads(render_json("m", [], no_images, "base64", videos=videos))):
        embs, grid, stamps = video_embeddings_from_server_response(body)
        assert torch.equal(embs[0], v0) and torch.equal(embs[1], v1)
        assert grid.tolist() == [[2, 4, 6], [2, 2, 4]] and stamps == [[0.0, 1.0], [0.5, 2.5]]
    with pytest.raises(ValueError, match="no videos"):
        video_embeddings_from_server_response(render_safetensors("m", [torch.ones(6, 8)], torch.tensor([[1, 4, 6]])))


def test_processing_checks_video_embeds_timestamps():
    from glm4v_fast.integrations.vllm.processing import Glm4vFastDataParser

    parser = Glm4vFastDataParser(2, video_needs_metadata=True, expected_hidden_size=8)
    grid = torch.tensor([[2, 4, 6]])
    items = parser.parse_mm_data({"video": {"video_embeds": torch.randn(12, 8), "video_grid_thw": grid,
                                            "timestamps": [[0.0, 1.0]]}})["video"]
    assert items.get_count() == 1 and items.get(0)["timestamps"].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="needs its slices' times"):
        parser.parse_mm_data({"video": {"video_embeds": torch.randn(12, 8), "video_grid_thw": grid}})
    with pytest.raises(ValueError, match="1 rows for 2 videos"):
        parser.parse_mm_data({"video": {"video_embeds": torch.randn(16, 8),
                                        "video_grid_thw": torch.tensor([[2, 4, 6], [2, 2, 2]]),
                                        "timestamps": [[0.0, 1.0]]}})
    with pytest.raises(ValueError, match="finite seconds >= 0"):
        parser.parse_mm_data({"video": {"video_embeds": torch.randn(12, 8), "video_grid_thw": grid,
                                        "timestamps": [[0.0, float("nan")]]}})
    for bare in (torch.randn(1, 12, 8), [torch.randn(12, 8)]):      # embeddings without grid or times
        with pytest.raises(ValueError, match="bare embeddings tensor"):
            parser.parse_mm_data({"video": bare})
