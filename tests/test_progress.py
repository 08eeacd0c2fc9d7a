"""Progress moves inside a packed forward: each finished block of the tower reports its share of the batch."""
import numpy as np
import pytest
import torch
from PIL import Image

import glm4v_fast as gf
from glm4v_fast import progress as progress_module
from glm4v_fast.cli import main
from glm4v_fast.progress import ProgressBar, block_progress
from _tiny import TINY_BIAS, save_tiny_checkpoint


@pytest.fixture(scope="module")
def pipe():
    # Three blocks, so that a forward reports thirds.
    with pytest.warns(UserWarning, match="RANDOM"):
        _, model, processor = gf.create_glm4v_vision_encoder(config=TINY_BIAS, device="cpu", dtype="float32")
    return gf.GLM4VEmbeddingPipeline(model=model, processor=processor)


def _images(n, size=(56, 84)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)) for _ in range(n)]


def test_block_progress_reports_each_block_and_unhooks(pipe):
    batch = pipe.processor(images=_images(1))
    seen = []
    with block_progress(pipe.model, seen.append):
        with torch.inference_mode():
            pipe.model(batch["pixel_values"], batch["image_grid_thw"])
    assert seen == [1 / 3, 2 / 3, 1.0]
    with torch.inference_mode():
        pipe.model(batch["pixel_values"], batch["image_grid_thw"])
    assert len(seen) == 3                   # the hooks are gone


def test_iter_image_embeddings_reports_progress_inside_each_batch(pipe):
    images = _images(5)
    reported, yielded = [], []

    def record(done):
        reported.append((done, len(yielded)))

    for result in pipe.iter_image_embeddings(images, batch_size=2, progress=record):
        yielded.append(result)
    values = [done for done, _ in reported]
    assert values == sorted(set(values)) and values[-1] == 5     # rising, each value once
    # Before the first image comes back, the first batch of 2 has moved the count by thirds of 2 images.
    before_first = [done for done, n in reported if n == 0]
    assert before_first[:3] == pytest.approx([2 / 3, 4 / 3, 2.0])
    # The last batch (1 image) moves from 4 to 5 in thirds.
    assert values[-3:] == pytest.approx([4 + 1 / 3, 4 + 2 / 3, 5.0])
    # The embeddings are those of a run without progress.
    plain = pipe.extract_image_embeddings(images, batch_size=2)
    assert all(torch.equal(r.embedding, p) for r, p in zip(yielded, plain))


def test_bad_images_count_as_done_at_once(pipe):
    images = _images(1) + [np.zeros((1, 300), np.uint8)] + _images(1)
    reported = []
    results = list(pipe.iter_image_embeddings(images, batch_size=3, skip_bad=True, progress=reported.append))
    assert results[1].error is not None
    # The bad one is done before the forward starts: the 2 good ones move the count from 1 to 3.
    assert reported[:3] == pytest.approx([1 + 2 / 3, 1 + 4 / 3, 3.0]) and reported[-1] == 3


def test_extract_progress_bar_moves_inside_the_batch(pipe, monkeypatch):
    seen = []
    real_to = ProgressBar.to
    monkeypatch.setattr(ProgressBar, "to", lambda self, done: (seen.append(done), real_to(self, done)))
    out = pipe.extract_image_embeddings(_images(3), batch_size=3, progress=True)
    assert len(out) == 3
    assert seen[:3] == pytest.approx([1.0, 2.0, 3.0]) and seen[-1] == 3


def test_progress_bar_shows_fractions_and_whole_counts(capsys):
    with ProgressBar(13, "image", "encoding images") as bar:
        bar.to(1 / 3)
        bar.to(0.1)                         # never back
        assert bar.n == pytest.approx(1 / 3)
        bar.bar.refresh()                   # tqdm draws at most every 0.1 s by itself
        bar.to(7)
    err = capsys.readouterr().err
    assert "0.3/13 [" in err and "7/13 [" in err and "image/s" in err


def test_cli_encode_progress_moves_inside_a_batch(tmp_path, monkeypatch, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", name="tiny_bias")
    for i, image in enumerate(_images(3)):
        image.save(tmp_path / f"img{i}.png")
    seen = []
    real_to = progress_module.ProgressBar.to
    monkeypatch.setattr(progress_module.ProgressBar, "to", lambda self, done: (seen.append(done), real_to(self, done)))
    assert main(["encode", str(tmp_path / "img*.png"), "--out", str(tmp_path / "x.safetensors"),
                 "--checkpoint", str(checkpoint), "--batch-size", "3"]) == 0
    # One forward of 3 images, 3 blocks: one image's worth per block, before any image is done.
    assert seen[:3] == pytest.approx([1.0, 2.0, 3.0])
    assert "3/3 [" in capsys.readouterr().err


def test_progress_never_goes_back_when_a_failed_forward_is_retried(pipe, monkeypatch):
    """A packed forward that fails at its end (think: out of memory in the merger) is retried image by image,
    whose blocks report again: the count only rises."""
    encode = pipe._encode

    def fails_when_packed(pixel_values, grid):
        out = encode(pixel_values, grid)
        if len(grid) > 1:
            raise RuntimeError("out of memory")
        return out

    monkeypatch.setattr(pipe, "_encode", fails_when_packed)
    reported = []
    results = list(pipe.iter_image_embeddings(_images(3), batch_size=3, skip_bad=True, progress=reported.append))
    assert all(r.error is None for r in results)
    assert reported == sorted(set(reported)) and reported[-1] == 3
