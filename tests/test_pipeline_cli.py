"""The seeds' API (pipeline, encode_image(s), create_glm4v_vision_encoder) and the glm4v-fast CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import glm4v_fast as gf
from glm4v_fast.cli import EXAMPLES, main
from glm4v_fast.reference import ReferenceVisionModel
from _tiny import CONFIGS, rel_err, save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1, std=0.02)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return gf.create_glm4v_vision_encoder(checkpoint=checkpoint, device="cpu")


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(60, 90), (120, 40), (33, 33)]]


def test_create_encoder_from_checkpoint(encoder):
    config, model, processor = encoder
    assert config == gf.VisionConfig(**CONFIGS["tiny"])
    assert model.dtype == torch.float32 and not model.training
    assert isinstance(processor, gf.VisionProcessor)


def test_pipeline_equals_reference_per_image(encoder):
    config, model, processor = encoder
    pipe = gf.GLM4VEmbeddingPipeline(model=model, processor=processor)
    images = _images()
    out = pipe.extract_image_embeddings(images, return_dict=True, batch_size=2)
    ref = ReferenceVisionModel(config).eval()
    ref.load_state_dict(model.state_dict())
    assert len(out["embeddings"]) == 3 and out["embedding_dim"] == config.out_hidden_size
    for image, emb, grid, patches in zip(images, out["embeddings"], out["grid_thw"], out["num_patches"]):
        alone = processor(images=[image])
        assert torch.equal(alone["image_grid_thw"][0], grid) and patches == int(grid.prod())
        with torch.no_grad():
            expected = ref(alone["pixel_values"], alone["image_grid_thw"])
        assert emb.shape == (patches // 4, config.out_hidden_size)
        assert rel_err(emb, expected) <= 1e-5


def test_encode_image_and_images(encoder, tmp_path):
    _, model, processor = encoder
    images = _images()
    path = tmp_path / "a.png"
    images[0].save(path)
    one = gf.encode_image(str(path), model=model, processor=processor)
    many = gf.encode_images([path, images[1], images[2]], batch_size=2, model=model, processor=processor)
    assert len(many) == 3
    assert torch.allclose(one, many[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(many[1], gf.encode_image(images[1], model=model, processor=processor), rtol=1e-5, atol=1e-6)


def test_video_embeddings(encoder):
    config, model, processor = encoder
    pipe = gf.GLM4VEmbeddingPipeline(model=model, processor=processor)
    video = np.random.default_rng(0).integers(0, 255, (8, 56, 84, 3), dtype=np.uint8)
    out = pipe.extract_video_embeddings(video, video_metadata={"fps": 4, "total_num_frames": 8}, return_dict=True)
    (emb,) = out["embeddings"]
    grid = out["grid_thw"][0]
    assert emb.shape == (int(grid.prod()) // 4, config.out_hidden_size)
    assert len(out["timestamps"][0]) == int(grid[0])


def test_pipeline_bad_input(encoder):
    _, model, processor = encoder
    pipe = gf.GLM4VEmbeddingPipeline(model=model, processor=processor)
    with pytest.raises(ValueError, match="no images"):
        pipe.extract_image_embeddings([])
    with pytest.raises(ValueError, match="batch_size"):
        pipe.extract_image_embeddings(_images(), batch_size=0)
    with pytest.raises(FileNotFoundError):
        pipe.extract_image_embeddings(["/nonexistent/x.png"])


def test_random_weights_default_warns():
    with pytest.warns(UserWarning, match="RANDOM"):
        config, model, _ = gf.create_glm4v_vision_encoder(config=CONFIGS["tiny"], device="cpu")
    assert model.config == config


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_info(capsys):
    assert main(["info"]) == 0
    assert "attention backends" in capsys.readouterr().out


def test_cli_demo_on_examples(checkpoint, capsys):
    assert main(["demo", "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    for name in sorted(os.listdir(EXAMPLES)):
        assert name in out
    errors = [float(line.split()[-1]) for line in out.splitlines() if line.split() and line.split()[0] in os.listdir(EXAMPLES)]
    assert errors and max(errors) <= 1e-5


def test_cli_encode(checkpoint, tmp_path, capsys):
    for i, image in enumerate(_images()):
        image.save(tmp_path / f"img{i}.png")
    (tmp_path / "sub").mkdir()
    _images()[0].save(tmp_path / "sub" / "deep.jpg")
    out = tmp_path / "out" / "emb.safetensors"
    code = main(["encode", str(tmp_path / "img*.png"), str(tmp_path / "sub"), "--out", str(out),
                 "--checkpoint", str(checkpoint), "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    _, model, processor = gf.create_glm4v_vision_encoder(checkpoint=checkpoint, device="cpu")
    with safe_open(out, framework="pt") as f:
        keys = set(f.keys())
        path = str(tmp_path / "img1.png")
        assert {path, f"{path}::grid_thw", str(tmp_path / "sub" / "deep.jpg")} <= keys
        expected = gf.encode_image(path, model=model, processor=processor)
        assert torch.allclose(f.get_tensor(path), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, match", [
    (["encode", "/nonexistent.png", "--out", "x.safetensors"], "does not exist"),
    (["encode", "/nonexistent/*.png", "--out", "x.safetensors"], "no file matches"),
])
def test_cli_encode_errors(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_cli_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "glm4v_fast", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "glm4v-fast" in result.stdout
