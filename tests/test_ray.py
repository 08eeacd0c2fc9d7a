"""GLM4VEmbedder on its own and on a local Ray instance: the embeddings equal the offline encoder's."""
from __future__ import annotations

import faulthandler
import importlib.util
import io
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

import glm4v_fast as gf  # noqa: E402
from glm4v_fast.integrations.ray import GLM4VEmbedder, embeddings_from_table  # noqa: E402

from _tiny import rel_err, save_tiny_checkpoint  # noqa: E402

SIZES = [(60, 100), (200, 130), (33, 47), (150, 150), (90, 300)]
RAY_TIMEOUT_S = 180
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "ray_embed_dir.py"


def png_bytes(width, height, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), seed=5)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    for i, (w, h) in enumerate(SIZES):
        (path / f"img{i}.png").write_bytes(png_bytes(w, h, seed=i))
    return path


@pytest.fixture(scope="module")
def offline(checkpoint):
    model = gf.VisionModel.from_pretrained(checkpoint)
    processor = gf.VisionProcessor()

    def encode(path):
        out = processor(images=[str(path)], return_tensors="pt")
        with torch.no_grad():
            return model(out["pixel_values"], out["image_grid_thw"]).numpy(), out["image_grid_thw"][0].tolist()

    return encode


def test_embedder_on_a_batch_without_ray(checkpoint, image_dir, offline):
    paths = sorted(image_dir.glob("*.png"))
    embedder = GLM4VEmbedder(checkpoint=checkpoint, batch_size=2, on_error="null")
    assert embedder.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    # read_binary_files' columns; one undecodable row in the middle must not spoil its chunk-mates.
    raw = [p.read_bytes() for p in paths]
    batch = {"bytes": np.array(raw[:2] + [b"not an image"] + raw[2:], dtype=object),
             "path": np.array([str(p) for p in paths[:2]] + ["bad"] + [str(p) for p in paths[2:]], dtype=object)}
    table = embedder(batch)
    assert table.column_names == ["path", "embedding", "shape", "grid_thw", "error"]
    rows = table.to_pydict()
    embeddings = embeddings_from_table(table)
    assert embeddings[2] is None and rows["grid_thw"][2] is None and "not an image" in rows["error"][2]
    for path, emb, grid, err in zip(rows["path"], embeddings, rows["grid_thw"], rows["error"]):
        if path == "bad":
            continue
        expected, expected_grid = offline(path)
        assert err is None and grid == expected_grid and emb.shape == expected.shape
        assert rel_err(emb, expected) <= 1e-5

    # Paths and decoded arrays work as inputs too; pool="mean" gives one vector per image.
    mean = GLM4VEmbedder(checkpoint=checkpoint, column="path", pool="mean")({"path": np.array([str(paths[0])])})
    expected, _ = offline(paths[0])
    assert rel_err(embeddings_from_table(mean)[0], expected.mean(0)) <= 1e-5
    array = np.asarray(Image.open(paths[1]).convert("RGB"))
    out = GLM4VEmbedder(checkpoint=checkpoint)({"image": [array]})
    assert rel_err(embeddings_from_table(out)[0], offline(paths[1])[0]) <= 1e-5

    with pytest.raises(ValueError, match="not an image"):
        GLM4VEmbedder(checkpoint=checkpoint)({"bytes": np.array([b"junk"], dtype=object)})
    with pytest.raises(ValueError, match="no image column"):
        GLM4VEmbedder(checkpoint=checkpoint)({"text": np.array(["x"])})


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'glm4v-fast[ray]')")
    pytest.importorskip("ray.data")
    # A hung Ray job must not hang the suite: dump every thread's stack and exit after the bound.
    faulthandler.dump_traceback_later(RAY_TIMEOUT_S, exit=True)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             log_to_driver=False, ignore_reinit_error=True)
    try:
        yield ray
    finally:
        ray.shutdown()
        faulthandler.cancel_dump_traceback_later()


def test_example_pipeline_writes_offline_embeddings(ray_local, checkpoint, image_dir, tmp_path, offline):
    """examples/ray_embed_dir.py: read_binary_files -> map_batches(GLM4VEmbedder) -> write_parquet."""
    spec = importlib.util.spec_from_file_location("ray_embed_dir", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "parquet"
    assert example.main([str(image_dir), str(out), "--checkpoint", str(checkpoint),
                         "--batch-size", "2", "--forward-batch", "2"]) == 0

    table = pq.read_table(out)
    assert table.num_rows == len(SIZES)
    rows = table.to_pydict()
    assert "bytes" not in rows
    for path, emb, grid in zip(rows["path"], embeddings_from_table(table), rows["grid_thw"]):
        expected, expected_grid = offline(os.path.join(image_dir, os.path.basename(path)))
        assert grid == expected_grid and emb.shape == expected.shape
        assert rel_err(emb, expected) <= 1e-5
