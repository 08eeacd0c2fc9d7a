import json

import pytest

import glm4v_fast as gf


def test_defaults_are_glm41v():
    c = gf.VisionConfig()
    assert (c.depth, c.hidden_size, c.num_heads, c.head_dim) == (24, 1536, 12, 128)
    assert (c.out_hidden_size, c.intermediate_size, c.patch_dim, c.num_grid_per_side) == (4096, 13696, 1176, 24)


def test_matches_transformers_defaults_and_roundtrips():
    transformers = pytest.importorskip("transformers")
    hf = transformers.models.glm4v.configuration_glm4v.Glm4vVisionConfig()
    ours = gf.VisionConfig.from_dict(hf.to_dict())
    assert ours == gf.VisionConfig()
    again = transformers.models.glm4v.configuration_glm4v.Glm4vVisionConfig(**ours.to_dict())
    for key in ("depth", "hidden_size", "num_heads", "out_hidden_size", "intermediate_size", "rms_norm_eps"):
        assert getattr(again, key) == getattr(hf, key)


def test_full_config_and_glm45v_merger(tmp_path):
    full = {"model_type": "glm4v_moe", "text_config": {"hidden_size": 4096},
            "vision_config": {"depth": 24, "hidden_size": 1536, "intermediate_size": 10944, "num_heads": 12,
                              "out_hidden_size": 4096, "attention_bias": False, "hidden_act": "silu",
                              "unknown_future_key": 1}}
    (tmp_path / "config.json").write_text(json.dumps(full))
    c = gf.VisionConfig.from_pretrained(tmp_path)
    assert c.intermediate_size == 10944 and c.out_hidden_size == 4096
    assert gf.VisionConfig.from_pretrained(tmp_path / "config.json") == c


def test_aliases():
    c = gf.VisionConfig.from_dict({"num_hidden_layers": 3, "num_attention_heads": 4, "hidden_size": 64})
    assert (c.depth, c.num_heads) == (3, 4)


@pytest.mark.parametrize("bad, field", [
    ({"num_heads": 5}, "num_heads"),
    ({"hidden_size": 1536, "num_heads": 256}, "head_dim"),   # head_dim 6: not a multiple of 4
    ({"depth": 0}, "depth"),
    ({"hidden_size": -8}, "hidden_size"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"patch_size": "14"}, "patch_size"),
    ({"image_size": 100}, "image_size"),
    ({"rope_parameters": {"rope_type": "yarn"}}, "rope"),
])
def test_invalid_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        gf.VisionConfig.from_dict(bad)


def test_missing_and_corrupt_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        gf.VisionConfig.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        gf.VisionConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dict"):
        gf.VisionConfig.from_dict([1, 2])
