"""Embed every image of a directory with GLM-4V on Ray Data and write the embeddings to Parquet.

    pip install "glm4v-fast[ray]"
    python examples/ray_embed_dir.py IMAGES_DIR OUT_DIR --checkpoint GLM-4.1V-9B-Thinking

The actor pool is sized to the Ray cluster (glm4v_fast.integrations.ray.actor_pool): one actor per GPU when
there are GPUs, else one CPU actor, and one CPU always left for reading files; --actors and --num-gpus override
it. Each actor loads the model once and encodes the batches Ray streams to it. The output has one row per image:
path, embedding (flattened float32), shape, grid_thw, error. Read it back with
`glm4v_fast.integrations.ray.embeddings_from_table(pyarrow.parquet.read_table(OUT_DIR))`.

A bad image (corrupt, truncated, not an image) stops the job with an error naming its path (exit status 1);
with --skip-bad it becomes a row with a null embedding and the reason in `error`, the rest is written, the bad
paths are listed, and the exit status is still 1. An OUT_DIR that already holds files is refused (exit status 2)
unless --overwrite is given, which deletes it first: Ray would otherwise add a second copy of every row.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]


def _root_cause(exc: BaseException) -> str:
    """The embedder's own message from under Ray's wrappers, which carry whole remote tracebacks as text."""
    texts, seen, e = [], set(), exc
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        texts.append(str(e))
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    # The line "ValueError: GLM4VEmbedder: cannot encode '<path>': <reason>" of the remote traceback.
    found = re.findall(r"^\w*Error: (GLM4VEmbedder: .*)$", "\n".join(texts), flags=re.MULTILINE)
    if found:
        return found[-1]
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", help="directory of images (searched recursively)")
    parser.add_argument("output_dir", help="Parquet output directory (a new or empty one, or use --overwrite)")
    parser.add_argument("--checkpoint", help="vision checkpoint dir; without it: random weights (smoke tests only)")
    parser.add_argument("--config-json", help="architecture for the random-weights model")
    parser.add_argument("--actors", type=int, default=None,
                        help="model actors (default: one per GPU, else one)")
    parser.add_argument("--num-gpus", type=float, default=None,
                        help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per actor call (default: 16)")
    parser.add_argument("--forward-batch", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--pool", choices=("none", "mean"), default="none",
                        help="store all tokens, or one mean vector per image")
    parser.add_argument("--skip-bad", action="store_true", help="write bad images as rows with an error "
                                                                "instead of failing the job")
    parser.add_argument("--overwrite", action="store_true", help="delete a non-empty output_dir first "
                                                                 "(default: refuse it)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    args = parser.parse_args(argv)

    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        if not args.overwrite:
            print(f"ray_embed_dir: error: {args.output_dir} is not empty; pass --overwrite to replace it",
                  file=sys.stderr)
            return 2
        shutil.rmtree(args.output_dir)
    elif os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        print(f"ray_embed_dir: error: {args.output_dir} is a file, not a directory", file=sys.stderr)
        return 2

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from glm4v_fast.integrations.ray import GLM4VEmbedder, actor_pool

    ray.init(address=args.address, ignore_reinit_error=True)
    pool = actor_pool(args.actors, args.num_gpus)
    print(f"actors: {pool['compute'].min_size}, each with {pool['num_cpus']} CPUs and {pool['num_gpus']} GPUs")
    ds = ray.data.read_binary_files(args.input_dir, include_paths=True, file_extensions=IMAGE_EXTENSIONS)
    ds = ds.map_batches(
        GLM4VEmbedder,
        fn_constructor_kwargs=dict(checkpoint=args.checkpoint, config=args.config_json, dtype=args.dtype,
                                   batch_size=args.forward_batch, pool=args.pool,
                                   on_error="null" if args.skip_bad else "raise"),
        batch_size=args.batch_size,
        **pool,
    )
    try:
        ds.write_parquet(args.output_dir)
    except Exception as exc:        # Ray wraps the embedder's ValueError, which names the file
        print(f"ray_embed_dir: error: {_root_cause(exc)}", file=sys.stderr)
        return 1
    table = pq.read_table(args.output_dir, columns=["path", "error"])
    bad = table.filter(pc.is_valid(table["error"])).to_pylist()
    for row in bad:
        print(f"ray_embed_dir: failed: {row['path']}: {row['error']}", file=sys.stderr)
    print(f"wrote embeddings of {table.num_rows - len(bad)} images of {args.input_dir} to {args.output_dir}"
          f"{f'; {len(bad)} failed' if bad else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
