"""Scale-out embedding on Ray Data: a callable class for `Dataset.map_batches`.

    import ray
    from glm4v_fast.integrations.ray import GLM4VEmbedder, actor_pool

    ray.init()
    ds = ray.data.read_binary_files("images/", include_paths=True)
    ds = ds.map_batches(GLM4VEmbedder, fn_constructor_kwargs={"checkpoint": "ckpt/"}, batch_size=64,
                        **actor_pool())     # compute=ActorPoolStrategy(size=n), num_cpus=..., num_gpus=...
    ds.write_parquet("embeddings/")

Ray creates the pool's actors, each constructing one GLM4VEmbedder, so the model is loaded once per actor and
reused for every batch it is given. `actor_pool()` sizes the pool to the cluster: one actor per GPU when there
are GPUs, else one CPU actor; either way one CPU is left free, because Ray Data's read tasks need one and would
otherwise wait for ever behind actors that hold every CPU. This module needs neither ray nor pyarrow to import
(the class is plain Python); only its output construction uses pyarrow, which Ray Data always has.

Output schema (one row per input row), chosen so the Parquet files read back anywhere (pyarrow, pandas, Spark)
without Ray's tensor extension types:
    embedding   list<float32>  the (tokens, D) embedding flattened row-major (or the (D,) mean with pool="mean")
    shape       list<int64>    [tokens, D] (or [D])
    grid_thw    list<int64>    the image's patch grid [t, h, w]
    error       string         null, or why the row failed (on_error="null"; with on_error="raise" it raises)
plus the input's other columns (e.g. `path`) except the raw image bytes, which are dropped to keep the output
small (keep_input=True keeps them).
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import numpy as np

from ..pipeline import GLM4VEmbeddingPipeline, create_glm4v_vision_encoder
from ..validation import one_of, positive_int

logger = logging.getLogger("glm4v_fast.integrations.ray")

# Input columns tried, in order, when `column` is not given: read_binary_files' bytes, read_images' decoded
# arrays (or a user's own "image" column), then file paths.
_AUTO_COLUMNS = ("bytes", "image", "path")


class GLM4VEmbedder:
    """Images in a Ray Data batch -> GLM-4V vision embeddings.

    Args:
        checkpoint: a dir written by VisionModel.save_pretrained or a GLM-4.1V/4.5V/4.6V checkpoint; its
            processor config (preprocessor_config.json or processor_config.json) is used when present.
        config: with no checkpoint, the architecture (VisionConfig, HF vision_config dict, or config.json path)
            to run with seeded random weights (tests, load tests). Neither given: GLM-4.1V with random weights.
        device: torch device; default CUDA when `torch.cuda.is_available()` (give the actors `num_gpus=1`), else CPU.
        dtype: torch dtype or its name; default "auto", as create_glm4v_vision_encoder chooses.
        batch_size: images per forward pass (Ray's own batch_size sets rows per call; they are encoded in chunks
            of this many to bound activation memory).
        column: input column (bytes, a path string, or an HWC uint8 array per row); default: the first of
            "bytes", "image", "path" the batch has.
        pool: "none" (all tokens) or "mean" (one (D,) vector per image).
        on_error: "raise" (fail the task on a bad image, with a ValueError naming its `path` when the batch has
            that column, else its row) or "null" (null embedding, the reason in `error`).
        keep_input: keep the input image column in the output.
        attn_backend, kernels, compile, seed: VisionModel options (compile: "auto" as in create_glm4v_vision_encoder);
            seed of the random weights.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, config: Any = None, device: Any = None,
                 dtype: Any = None, batch_size: int = 16, column: str | None = None, pool: str = "none",
                 on_error: str = "raise", keep_input: bool = False, attn_backend: str = "auto",
                 kernels: str = "auto", seed: int = 0, compile: str = "auto"):
        one_of(pool, ("none", "mean"), "pool")
        one_of(on_error, ("raise", "null"), "on_error")
        self.batch_size, self.column, self.pool = positive_int(batch_size, "batch_size"), column, pool
        self.on_error, self.keep_input = on_error, keep_input
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # logged below, once per actor
            _, self.model, self.processor = create_glm4v_vision_encoder(
                config=config, checkpoint=checkpoint, device=device, dtype=dtype, attn_backend=attn_backend,
                kernels=kernels, seed=seed, compile=compile)
        self.device = self.model.device
        self.pipeline = GLM4VEmbeddingPipeline(self.model, self.processor)
        if checkpoint is None:
            logger.warning("GLM4VEmbedder without a checkpoint: RANDOM weights (seed %d); embeddings are "
                           "meaningless", seed)

    # ---------------------------------------------------------------- per batch
    def _input_column(self, batch: dict) -> str:
        if self.column is not None:
            if self.column not in batch:
                raise ValueError(f"column {self.column!r} is not in the batch (columns: {sorted(batch)})")
            return self.column
        for name in _AUTO_COLUMNS:
            if name in batch:
                return name
        raise ValueError(f"no image column in the batch (columns: {sorted(batch)}); expected one of "
                         f"{_AUTO_COLUMNS} or pass column=")

    @staticmethod
    def _as_image(value: Any):
        """A row's value as something VisionProcessor accepts. Encoded bytes stay bytes: the processor loads them
        as it loads files (EXIF orientation applied, RGB, its pixel limit checked before decoding)."""
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        return value

    def _encode_rows(self, values: list, names: list[str]
                     ) -> list[tuple[np.ndarray | None, list[int] | None, str | None]]:
        """(embedding, grid, error) per row, in order. The pipeline packs `batch_size` rows per forward and, when
        a chunk fails, encodes its rows one by one, so that a bad row costs only itself."""
        results: list = []
        images = [self._as_image(v) for v in values]
        for result in self.pipeline.iter_image_embeddings(images, self.batch_size, skip_bad=True):
            if result.error is not None:
                if self.on_error == "raise":
                    raise ValueError(f"GLM4VEmbedder: cannot encode {names[result.index]}: {result.error}")
                results.append((None, None, result.error))
                continue
            emb = result.embedding.float()
            if self.pool == "mean":
                emb = emb.mean(0)
            results.append((emb.cpu().numpy(), result.grid_thw.tolist(), None))
        return results

    def __call__(self, batch: dict[str, Any]):
        """A batch (dict of columns: numpy arrays or lists) -> a pyarrow Table (schema in the module docstring)."""
        import pyarrow as pa

        if hasattr(batch, "to_pydict"):            # batch_format="pyarrow"
            batch = batch.to_pydict()
        elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # batch_format="pandas"
            batch = {c: batch[c].to_numpy() for c in batch.columns}
        column = self._input_column(batch)
        values = list(batch[column])
        if "path" in batch:
            names = [repr(str(p)) for p in batch["path"]]
        else:
            names = [f"row {i} of a {len(values)}-row batch" for i in range(len(values))]
        results = self._encode_rows(values, names)

        table = {}
        for name, col in batch.items():
            if name == column and not self.keep_input:
                continue
            if name in ("embedding", "shape", "grid_thw", "error"):
                continue  # replaced by this step's outputs
            table[name] = _arrow_column(pa, col)
        table["embedding"] = pa.array([None if e is None else e.reshape(-1) for e, _, _ in results],
                                      type=pa.list_(pa.float32()))
        table["shape"] = pa.array([None if e is None else list(e.shape) for e, _, _ in results],
                                  type=pa.list_(pa.int64()))
        table["grid_thw"] = pa.array([g for _, g, _ in results], type=pa.list_(pa.int64()))
        table["error"] = pa.array([err for _, _, err in results], type=pa.string())
        return pa.table(table)


def plan_actor_pool(cpus: float, gpus: float, actors: int | None = None) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for a cluster with these totals.

    With GPUs: one actor per GPU (or `actors`), each holding one GPU. Without: one actor (or `actors`). The actors
    share all CPUs but one, which stays free for Ray Data's read tasks (each asks for a whole CPU): a pool that
    holds every CPU stalls the read step for ever. Each actor gets at most 8 CPUs, the processor's resize threads.
    """
    if actors is not None and (isinstance(actors, bool) or not isinstance(actors, int) or actors < 1):
        raise ValueError(f"actors must be a positive int, got {actors!r}")
    if gpus >= 1:
        size = actors or int(gpus)
        num_gpus = 1.0 if size <= gpus else gpus / size
    else:
        size, num_gpus = actors or 1, 0.0
    num_cpus = min(8.0, max(cpus - 1, 0) / size)
    return size, round(num_cpus, 3), round(num_gpus, 3)


def actor_pool(actors: int | None = None, num_gpus: float | None = None) -> dict[str, Any]:
    """`map_batches` keyword arguments for GLM4VEmbedder sized to the running Ray cluster (see plan_actor_pool):
    compute=ray.data.ActorPoolStrategy(size=n), num_cpus and num_gpus per actor. `num_gpus` overrides the GPUs
    per actor (0: run on CPU even where there are GPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init()              # what Ray Data would do on first use anyway
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0) if num_gpus is None or num_gpus > 0 else 0.0
    size, cpus_each, gpus_each = plan_actor_pool(resources.get("CPU", 1.0), gpus, actors)
    if num_gpus is not None:
        gpus_each = float(num_gpus)
    return {"compute": ray.data.ActorPoolStrategy(size=size), "num_cpus": cpus_each, "num_gpus": gpus_each}


def _arrow_column(pa, col):
    """A passed-through input column as an Arrow array; multi-dimensional rows become nested lists."""
    if isinstance(col, np.ndarray) and col.ndim == 1:
        return pa.array(col)
    try:
        return pa.array(list(col))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([np.asarray(v).tolist() for v in col])


def embeddings_from_table(table) -> list[np.ndarray | None]:
    """Rows of an output table (pyarrow Table, or pandas DataFrame read from the Parquet) as (tokens, D) arrays."""
    if hasattr(table, "to_pydict"):
        table = table.to_pydict()
    elif hasattr(table, "columns"):
        table = {c: list(table[c]) for c in table.columns}
    return [None if e is None else np.asarray(e, dtype=np.float32).reshape(tuple(s))
            for e, s in zip(table["embedding"], table["shape"])]


__all__ = ["GLM4VEmbedder", "embeddings_from_table", "actor_pool", "plan_actor_pool"]
