"""Files glm4v-fast writes and reads: permissions from the umask, the stored dtype from headers, and what a
missing checkpoint path says."""
import json
import os
import stat

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import glm4v_fast as gf
from glm4v_fast.cli import main
from glm4v_fast.weights import _umask, stored_dtype
from _tiny import save_tiny_checkpoint, tiny_config


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(umask):
    assert _umask() == umask
    assert os.umask(umask) == umask         # still set


def test_save_pretrained_files_follow_the_umask(umask, tmp_path):
    model = gf.VisionModel(tiny_config())
    model.save_pretrained(tmp_path / "ckpt")
    for name in ("model.safetensors", "config.json"):
        assert _mode(tmp_path / "ckpt" / name) == 0o666 & ~umask, name
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]   # no temporary left


def test_encode_output_follows_the_umask(umask, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    Image.new("RGB", (56, 56), "blue").save(tmp_path / "x.png")
    out = tmp_path / "out" / "x.safetensors"
    assert main(["encode", str(tmp_path / "x.png"), "--out", str(out), "--checkpoint", str(checkpoint)]) == 0
    assert _mode(out) == 0o666 & ~umask
    assert os.listdir(out.parent) == ["x.safetensors"]


def test_stored_dtype_from_the_tensors(tmp_path):
    model = gf.VisionModel(tiny_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "vision")
    assert stored_dtype(tmp_path / "vision") == torch.bfloat16

    # A full checkpoint: sharded, the tower under model.visual., the text model in another dtype; the config
    # says nothing, so the header decides.
    full = tmp_path / "full"
    full.mkdir()
    save_file({"model.language_model.embed_tokens.weight": torch.zeros(4, 4)}, full / "a.safetensors")
    save_file({"model.visual.blocks.0.attn.qkv.weight": torch.zeros(6, 2, dtype=torch.float16)},
              full / "b.safetensors")
    (full / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.language_model.embed_tokens.weight": "a.safetensors",
        "model.visual.blocks.0.attn.qkv.weight": "b.safetensors"}}))
    (full / "config.json").write_text("{}")
    assert stored_dtype(full) == torch.float16


def test_stored_dtype_from_the_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert stored_dtype(tmp_path) == torch.bfloat16      # no weights: the config's word
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"dtype": "float16"}}))
    assert stored_dtype(tmp_path) == torch.float16
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "int8"}))
    assert stored_dtype(tmp_path) is None
    assert stored_dtype(tmp_path / "missing") is None


def test_hub_id_is_not_downloaded_and_says_how(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        gf.VisionModel.from_pretrained("zai-org/GLM-4.1V-9B-Thinking")
    message = str(info.value)
    assert "'zai-org/GLM-4.1V-9B-Thinking' does not exist" in message
    assert "does not download from the Hugging Face Hub" in message
    assert "hf download zai-org/GLM-4.1V-9B-Thinking --local-dir GLM-4.1V-9B-Thinking" in message
    # A path that is plainly local gets no such hint.
    for path in ("missing", "./a/b", str(tmp_path / "a" / "b"), "a/b/c"):
        with pytest.raises(FileNotFoundError) as info:
            gf.VisionModel.from_pretrained(path)
        assert "Hugging Face" not in str(info.value), path
