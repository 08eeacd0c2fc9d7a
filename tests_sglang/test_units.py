"""The integration's pieces without an engine: version gate, entry point, tower choice, processor fixes, helpers,
and the sgl_kernel stand-in's refusal."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def test_package_imports_without_sglang():
    """No SGLang installed (simulated): the package and its helpers import, the plugin says what's missing."""
    code = (
        "import sys; sys.modules['sglang'] = None\n"
        "import glm4v_fast.integrations.sglang as s\n"
        "from glm4v_fast.integrations.sglang import image_item, expand_image_tokens\n"
        "from glm4v_fast.integrations.sglang import _version\n"
        "_version.installed_sglang_version = lambda: None\n"
        "try:\n"
        "    s.check_sglang_version()\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR glm4v-fast's SGLang integration needs SGLang: pip install 'glm4v-fast[sglang]'" in out.stdout


@pytest.mark.parametrize("version", ["0.5.22", "0.5.24", "0.6.0"])
def test_sglang_outside_tested_range_is_refused(version, monkeypatch):
    from glm4v_fast.integrations.sglang import _version, plugin

    with pytest.raises(RuntimeError, match=rf"tested with SGLang >=0.5.23,<0.5.24, but SGLang {version} is installed"):
        _version.check_sglang_version(version)
    monkeypatch.setattr(plugin, "check_sglang_version", lambda: _version.check_sglang_version(version))
    monkeypatch.delenv("GLM4V_FAST_SGLANG", raising=False)
    with pytest.raises(RuntimeError, match="is installed"):
        plugin.register()
    monkeypatch.setenv("GLM4V_FAST_SGLANG", "0")           # SGLang's tower wanted anyway: SGLang starts as shipped
    plugin.register()


def test_plugin_registers_through_entry_point():
    from sglang.srt.managers import multimodal_processor
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.multimodal.processors.glm4v import Glm4vImageProcessor
    from sglang.srt.plugins import load_plugins

    from glm4v_fast.integrations.sglang import check_sglang_version, models
    from glm4v_fast.integrations.sglang.processing import Glm4vFastProcessor

    assert check_sglang_version() == "0.5.23"
    load_plugins()
    assert ModelRegistry.models["Glm4vForConditionalGeneration"] is models.Glm4vForConditionalGeneration
    assert ModelRegistry.models["Glm4vMoeForConditionalGeneration"] is models.Glm4vMoeForConditionalGeneration
    assert ModelRegistry.resolve_model_cls(["Glm4vMoeForConditionalGeneration"])[0] is \
        models.Glm4vMoeForConditionalGeneration

    # SGLang's choice of multimodal processor is hooked (applied by load_plugins) to pick ours for these models.
    from sglang.srt.plugins.hook_registry import HookRegistry

    from glm4v_fast.integrations.sglang import plugin

    assert plugin._PROCESSOR_TARGET in HookRegistry._patched
    assert any(hook is plugin._glm4v_fast_processor for _, hook, _ in HookRegistry._hooks[plugin._PROCESSOR_TARGET])
    assert multimodal_processor.get_mm_processor_cls is not plugin._glm4v_fast_processor
    assert plugin._CONTRACT_TARGET in HookRegistry._patched        # /generate admits preprocessed items

    class Config:
        architectures = ["Glm4vMoeForConditionalGeneration"]

    assert plugin._glm4v_fast_processor(Glm4vImageProcessor, Config()) is Glm4vFastProcessor
    Config.architectures = ["GlmOcrForConditionalGeneration"]          # another user of SGLang's GLM processor
    assert plugin._glm4v_fast_processor(Glm4vImageProcessor, Config()) is Glm4vImageProcessor


def test_tower_choice(monkeypatch):
    from glm4v_fast.integrations.sglang.selection import choose_tower

    monkeypatch.delenv("GLM4V_FAST_SGLANG", raising=False)
    assert choose_tower().use_fast and not choose_tower().forced
    for value, expected in (("0", False), ("off", False), ("1", True), ("true", True)):
        monkeypatch.setenv("GLM4V_FAST_SGLANG", value)
        choice = choose_tower()
        assert (choice.use_fast, choice.forced) == (expected, True)
    monkeypatch.setenv("GLM4V_FAST_SGLANG", "maybe")
    with pytest.raises(ValueError, match="GLM4V_FAST_SGLANG must be one of"):
        choose_tower()


def test_quantized_checkpoint_keeps_sglangs_tower(monkeypatch):
    from glm4v_fast.integrations.sglang.models import _blockers
    from glm4v_fast.integrations.sglang.selection import choose_tower

    class Fp8:
        def get_name(self):
            return "fp8"

    blockers = _blockers(Fp8())
    assert _blockers(None) == []
    monkeypatch.delenv("GLM4V_FAST_SGLANG", raising=False)
    choice = choose_tower(blockers)
    assert not choice.use_fast and "a quantized checkpoint (fp8)" in choice.reason
    monkeypatch.setenv("GLM4V_FAST_SGLANG", "1")
    with pytest.raises(ValueError, match=r"forced on \(GLM4V_FAST_SGLANG=1\) but cannot serve this model: a quantized"):
        choose_tower(blockers)


def test_processor_result_reads_like_transformers_output():
    from glm4v_fast.integrations.sglang.processing import ProcessorResult

    ret = ProcessorResult({"format": "processor_output", "image_grid_thw": [[1, 4, 6]]})
    assert ret.image_grid_thw.dtype == torch.int64 and ret.image_grid_thw.tolist() == [[1, 4, 6]]
    assert ret.video_grid_thw is None and ret.attention_mask is None
    assert ret["format"] == "processor_output"


def test_embeds_helpers():
    from glm4v_fast.integrations.sglang import expand_image_tokens, image_item, json_item, tokens_per_image

    a, b = torch.randn(6, 8), torch.randn(2, 8)
    item = image_item([a, b], [[1, 4, 6], [1, 2, 4]])
    assert item["format"] == "precomputed_embedding" and torch.equal(item["feature"], torch.cat([a, b]))
    assert item["image_grid_thw"].tolist() == [[1, 4, 6], [1, 2, 4]]
    item = image_item({"embeddings": [a, b], "grid_thw": torch.tensor([[1, 4, 6], [1, 2, 4]])},
                      format="processor_output")
    assert item["modality"] == "image" and torch.equal(item["precomputed_embeddings"], torch.cat([a, b]))
    with pytest.raises(ValueError, match="do not match grid_thw"):
        image_item([a, b], [[1, 2, 4], [1, 4, 6]])
    with pytest.raises(ValueError, match="needs 8"):
        image_item(torch.randn(7, 8), [[1, 4, 6], [1, 2, 4]])
    with pytest.raises(ValueError, match="grid_thw is needed"):
        image_item([a])
    with pytest.raises(ValueError, match="format must be one of"):
        image_item([a], [[1, 4, 6]], format="pixels")
    assert tokens_per_image([[1, 4, 6], [1, 2, 4]]) == [6, 2]
    prompt = "a <|image|> b <|image|> c"
    assert expand_image_tokens(prompt, [[1, 4, 6], [1, 2, 4]]) == "a " + "<|image|>" * 6 + " b <|image|><|image|> c"
    with pytest.raises(ValueError, match="2 <|image|> placeholder"):
        expand_image_tokens(prompt, [[1, 4, 6]])
    as_json = json_item(image_item([a.bfloat16()], [[1, 4, 6]]))
    assert as_json["image_grid_thw"] == [[1, 4, 6]] and as_json["feature"] == a.bfloat16().float().tolist()


def test_item_from_server_response():
    from safetensors.torch import save

    from glm4v_fast.integrations.sglang import image_item_from_server_response

    a, b = torch.randn(6, 8), torch.randn(2, 8)
    body = save({"embedding.0": a, "embedding.1": b, "grid_thw": torch.tensor([[1, 4, 6], [1, 2, 4]])})
    item = image_item_from_server_response(body)
    assert torch.equal(item["feature"], torch.cat([a, b])) and item["image_grid_thw"].tolist() == [[1, 4, 6], [1, 2, 4]]
    answer = {"data": [{"index": 0, "grid_thw": [1, 2, 4], "shape": [2, 8], "embedding": b.tolist()}]}
    item = image_item_from_server_response(answer, format="processor_output")
    assert torch.allclose(item["precomputed_embeddings"], b) and item["image_grid_thw"].tolist() == [[1, 2, 4]]


def test_video_helpers():
    from glm4v_fast.integrations.sglang import expand_video_tokens, video_item, video_item_from_server_response

    emb = torch.randn(12, 8)
    item = video_item(emb, [[2, 4, 6]], format="processor_output")
    assert item["modality"] == "video" and item["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert video_item({"embeddings": [emb], "grid_thw": [[2, 4, 6]]})["feature"] is not None
    text = expand_video_tokens("<|begin_of_video|><|video|><|end_of_video|> x", [[2, 2, 4]], [[0.0, 1.5]])
    assert text == ("<|begin_of_video|><|begin_of_image|><|image|><|image|><|end_of_image|>0"
                    "<|begin_of_image|><|image|><|image|><|end_of_image|>1<|end_of_video|> x")
    with pytest.raises(ValueError, match="one time per slice"):
        expand_video_tokens("<|video|>", [[2, 2, 4]], [[0.0]])
    with pytest.raises(ValueError, match="0 <|video|> placeholder"):
        expand_video_tokens("no video", [[2, 2, 4]], [[0.0, 1.0]])
    answer = {"data": [], "videos": [{"index": 0, "grid_thw": [2, 4, 6], "shape": [12, 8], "embedding": emb.tolist(),
                                      "timestamps": [0.0, 1.0]}]}
    item, stamps = video_item_from_server_response(answer)
    assert torch.allclose(item["feature"], emb) and stamps == [[0.0, 1.0]]


def test_kernel_stand_in_refuses_by_name():
    import sgl_kernel

    assert "stand-in" in sgl_kernel.__doc__
    with pytest.raises(NotImplementedError, match="sgl_kernel.fused_add_rmsnorm_cpu is not in the test stand-in"):
        sgl_kernel.fused_add_rmsnorm_cpu(torch.zeros(1))


def test_http_contract_admits_preprocessed_images_only():
    from sglang.srt.entrypoints import api_contract

    from glm4v_fast.integrations.sglang.http_contract import admit_preprocessed_images

    item = {"format": "precomputed_embedding", "feature": [[0.5, 1.0]], "image_grid_thw": [[1, 2, 2]]}
    check = api_contract.generate_contract_error
    original = getattr(check, "__wrapped__", check)         # load_plugins (another test) may have wrapped it
    assert "unknown field `format`" in original({"text": "x", "image_data": [item]})
    assert admit_preprocessed_images(original, {"text": "x", "image_data": [item]}) is None
    assert admit_preprocessed_images(original, {"text": "x", "image_data": [[item, "https://a/b.png"]]}) is None
    video = dict(item, format="processor_output")
    assert admit_preprocessed_images(original, {"input_ids": [1, 2], "video_data": [video]}) is None
    assert "unknown field `colour`" in admit_preprocessed_images(original, {"text": "x", "image_data": [
        {"url": "https://a/b.png", "colour": 1}]})
