"""Checkpoint interop with transformers: full sharded GLM-4V checkpoints in, Glm4vVisionModel-loadable out."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import glm4v_fast as gf
from _tiny import CONFIGS, random_inputs, rel_err

transformers = pytest.importorskip("transformers")

TEXT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]})


def _full_model(kind: str):
    vision = dict(CONFIGS["tiny"], out_hidden_size=TEXT["hidden_size"])
    torch.manual_seed(0)
    if kind == "glm4v":
        config = transformers.Glm4vConfig(vision_config=vision, text_config=TEXT)
        model = transformers.Glm4vForConditionalGeneration(config)
    else:
        text = dict(TEXT, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                    first_k_dense_replace=0, n_group=1, topk_group=1)
        config = transformers.Glm4vMoeConfig(vision_config=dict(vision, intermediate_size=56), text_config=text)
        model = transformers.Glm4vMoeForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.model.visual.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["glm4v", "glm4v_moe"])
def full_checkpoint(request, tmp_path_factory):
    model = _full_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="100KB")     # sharded, with model.safetensors.index.json
    return model, path


def test_load_full_sharded_checkpoint_reads_only_vision(full_checkpoint, monkeypatch):
    hf, path = full_checkpoint
    assert os.path.exists(path / "model.safetensors.index.json")
    read = []
    import safetensors

    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.inner = real_open(*a, **k)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            return self.inner.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    model = gf.VisionModel.from_pretrained(path, kernels="torch", attn_backend="sdpa")
    assert read and all(k.startswith("model.visual.") for k in read)
    pv, grid = random_inputs([[1, 4, 6], [1, 2, 2]])
    with torch.no_grad():
        expected = hf.model.visual(pv, grid).pooler_output
        assert rel_err(model(pv, grid), expected) <= 1e-5


def test_dtype_and_device_arguments(full_checkpoint):
    _, path = full_checkpoint
    model = gf.VisionModel.from_pretrained(path, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert not model.training


def test_save_then_transformers_loads_ours(tmp_path):
    torch.manual_seed(0)
    ours = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny_bias"]), kernels="torch").eval()
    ours.reset_parameters(seed=3)
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    theirs = transformers.models.glm4v.modeling_glm4v.Glm4vVisionModel.from_pretrained(tmp_path).eval()
    again = gf.VisionModel.from_pretrained(tmp_path)
    pv, grid = random_inputs([[1, 4, 6], [1, 2, 2]])
    with torch.no_grad():
        expected = theirs(pv, grid).pooler_output
        assert rel_err(ours(pv, grid), expected) <= 1e-5
        assert torch.equal(again(pv, grid), ours(pv, grid))


def test_seeded_init_is_reproducible():
    a = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]))
    b = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]))
    a.reset_parameters(seed=7)
    b.reset_parameters(seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def saved(tmp_path):
    model = gf.VisionModel(gf.VisionConfig(**CONFIGS["tiny"]))
    model.save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.pop("blocks.1.attn.proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: blocks\.1\.attn\.proj\.weight"):
        gf.VisionModel.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.update({"blocks.0.attn.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: blocks\.0\.attn\.extra"):
        gf.VisionModel.from_pretrained(saved)


def test_misshaped_tensor_is_named(saved):
    _rewrite(saved, lambda t: t.update({"merger.proj.weight": torch.zeros(3, 3)}))
    with pytest.raises(ValueError, match=r"merger\.proj\.weight has shape \(3, 3\)"):
        gf.VisionModel.from_pretrained(saved)


def test_config_mismatch_is_reported(saved):
    config = json.loads((saved / "config.json").read_text())
    config["depth"] = 3
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing tensors: blocks\.2\."):
        gf.VisionModel.from_pretrained(saved)


def test_no_weights(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(ValueError, match="no weights"):
        gf.VisionModel.from_pretrained(saved)


def test_pickled_weights_are_refused_not_unpickled(saved):
    os.remove(saved / "model.safetensors")
    marker = saved / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (saved / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="pickled"):
        gf.VisionModel.from_pretrained(saved)
    assert not marker.exists()


def test_corrupt_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="safetensors"):
        gf.VisionModel.from_pretrained(saved)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        gf.VisionModel.from_pretrained(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["tiny"]))
    with pytest.raises(ValueError, match="no weights"):
        gf.VisionModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        gf.VisionModel.from_pretrained(tmp_path / "config.json")


def test_checkpoint_without_vision_tensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["tiny"]))
    save_file({"model.language_model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no GLM-4V vision tensors"):
        gf.VisionModel.from_pretrained(tmp_path)


def test_index_naming_missing_shard(saved):
    index = {"metadata": {}, "weight_map": {"blocks.0.norm1.weight": "model-00002-of-00002.safetensors"}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        gf.VisionModel.from_pretrained(saved)
