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
from glm4v_fast.integrations.ray import GLM4VEmbedder, embeddings_from_table, plan_actor_pool  # noqa: E402

from _tiny import png_bytes, rel_err, save_tiny_checkpoint  # noqa: E402

SIZES = [(60, 100), (200, 130), (33, 47), (150, 150), (90, 300)]
RAY_TIMEOUT_S = 180
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "ray_embed_dir.py"



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

    with pytest.raises(ValueError, match="row 0 of a 1-row batch.*not an image"):
        GLM4VEmbedder(checkpoint=checkpoint)({"bytes": np.array([b"junk"], dtype=object)})
    # A failure names the file when the batch has read_binary_files' `path` column.
    with pytest.raises(ValueError, match="cannot encode 'bad'.*not an image"):
        GLM4VEmbedder(checkpoint=checkpoint, batch_size=2)({k: v[:3] for k, v in batch.items()})
    with pytest.raises(ValueError, match="no image column"):
        GLM4VEmbedder(checkpoint=checkpoint)({"text": np.array(["x"])})


def test_embedder_loads_bytes_like_files(checkpoint, offline, tmp_path):
    """read_binary_files hands over encoded bytes: they load as a file does (EXIF orientation applied)."""
    exif = Image.Exif()
    exif[0x0112] = 6                   # stored sideways; upright it is 64 wide and 176 high
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 176, 3), dtype=np.uint8)).save(
        buf, "JPEG", exif=exif.tobytes(), quality=95)
    path = tmp_path / "phone.jpg"
    path.write_bytes(buf.getvalue())
    table = GLM4VEmbedder(checkpoint=checkpoint)({"bytes": np.array([buf.getvalue()], dtype=object)})
    expected, expected_grid = offline(path)
    assert table.to_pydict()["grid_thw"][0] == expected_grid and expected_grid[1] > expected_grid[2]
    assert rel_err(embeddings_from_table(table)[0], expected) <= 1e-5


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


@pytest.mark.parametrize("cpus, gpus, actors, plan", [
    (2, 0, None, (1, 1.0, 0.0)),        # the 2-core machine: one actor, one CPU left for the read tasks
    (1, 0, None, (1, 0.0, 0.0)),
    (16, 0, None, (1, 8.0, 0.0)),
    (8, 0, 3, (3, 2.333, 0.0)),
    (16, 4, None, (4, 3.75, 1.0)),      # one actor per GPU
    (4, 1, 2, (2, 1.5, 0.5)),
])
def test_plan_actor_pool(cpus, gpus, actors, plan):
    assert plan_actor_pool(cpus, gpus, actors) == plan
    size, cpus_each, _ = plan
    assert size * cpus_each <= max(cpus - 1, 0)


def test_plan_actor_pool_bad_input():
    with pytest.raises(ValueError, match="actors"):
        plan_actor_pool(4, 0, 0)


def _load_example():
    spec = importlib.util.spec_from_file_location("ray_embed_dir", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_example_pipeline_writes_offline_embeddings(ray_local, checkpoint, image_dir, tmp_path, offline, capsys):
    """examples/ray_embed_dir.py on a 2-CPU Ray with the default (auto-sized) actor pool: read_binary_files ->
    map_batches(GLM4VEmbedder) -> write_parquet; a bad file is named; a used output folder is refused."""
    example = _load_example()
    images = tmp_path / "images"
    images.mkdir()
    for path in image_dir.iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (images / "zz_bad.png").write_bytes(b"not an image")
    out = tmp_path / "parquet"
    args = [str(images), str(out), "--checkpoint", str(checkpoint), "--batch-size", "2", "--forward-batch", "2"]
    assert example.main(args + ["--skip-bad"]) == 1
    captured = capsys.readouterr()
    assert "actors: 1, each with 1.0 CPUs" in captured.out
    assert "failed: " in captured.err and "zz_bad.png" in captured.err and "not an image" in captured.err

    table = pq.read_table(out)
    assert table.num_rows == len(SIZES) + 1
    rows = table.to_pydict()
    assert "bytes" not in rows
    for path, emb, grid, error in zip(rows["path"], embeddings_from_table(table), rows["grid_thw"], rows["error"]):
        if path.endswith("zz_bad.png"):
            assert emb is None and "not an image" in error
            continue
        expected, expected_grid = offline(os.path.join(image_dir, os.path.basename(path)))
        assert grid == expected_grid and emb.shape == expected.shape
        assert rel_err(emb, expected) <= 1e-5

    # Running again into the same folder would add a second copy of every row: refused without --overwrite.
    assert example.main(args + ["--skip-bad"]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert pq.read_table(out).num_rows == len(SIZES) + 1
    # With --overwrite and without --skip-bad the job stops at the bad file, and says which it is.
    assert example.main(args + ["--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "cannot encode" in err and "zz_bad.png" in err and "Traceback" not in err
