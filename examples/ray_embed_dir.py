"""Embed every image of a directory with GLM-4V on Ray Data and write the embeddings to Parquet.

    pip install "glm4v-fast[ray]"
    python examples/ray_embed_dir.py IMAGES_DIR OUT_DIR --checkpoint zai-org/GLM-4.1V-9B-Thinking-dir \
        --concurrency 4 --num-gpus 1

Each Ray actor loads the model once (GLM4VEmbedder.__init__) and encodes the batches Ray streams to it; with
--num-gpus 1 every actor gets its own GPU. The output has one row per image: path, embedding (flattened
float32), shape, grid_thw, error (see glm4v_fast.integrations.ray). Read it back with
`glm4v_fast.integrations.ray.embeddings_from_table(pyarrow.parquet.read_table(OUT_DIR))`.
"""
from __future__ import annotations

import argparse
import sys

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", help="directory of images (searched recursively)")
    parser.add_argument("output_dir", help="Parquet output directory")
    parser.add_argument("--checkpoint", help="vision checkpoint dir; without it: random weights (smoke tests only)")
    parser.add_argument("--config-json", help="architecture for the random-weights model")
    parser.add_argument("--concurrency", type=int, default=1, help="number of model actors (default: 1)")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (default: 0, CPU)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per actor call (default: 16)")
    parser.add_argument("--forward-batch", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--pool", choices=("none", "mean"), default="none",
                        help="store all tokens, or one mean vector per image")
    parser.add_argument("--skip-bad", action="store_true", help="write bad images as rows with an error "
                                                                "instead of failing the job")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    args = parser.parse_args(argv)

    import ray

    from glm4v_fast.integrations.ray import GLM4VEmbedder

    ray.init(address=args.address, ignore_reinit_error=True)
    ds = ray.data.read_binary_files(args.input_dir, include_paths=True, file_extensions=IMAGE_EXTENSIONS)
    ds = ds.map_batches(
        GLM4VEmbedder,
        fn_constructor_kwargs=dict(checkpoint=args.checkpoint, config=args.config_json, dtype=args.dtype,
                                   batch_size=args.forward_batch, pool=args.pool,
                                   on_error="null" if args.skip_bad else "raise"),
        concurrency=args.concurrency,
        num_gpus=args.num_gpus,
        batch_size=args.batch_size,
    )
    ds.write_parquet(args.output_dir)
    print(f"wrote embeddings of {args.input_dir} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
