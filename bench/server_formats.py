"""Size and serialisation time of the embedding server's answer formats for one image.

    python bench/server_formats.py --tokens 324 --width 4096

Renders one (tokens, width) embedding (normal random values, float32 as the model returns them) with the server's
own code (glm4v_fast.serving.rendering: render_json / render_safetensors) in every format, and decodes it as a client would
(json.loads + embeddings_from_response, or safetensors.torch.load). Prints a Markdown table: body bytes, server
serialisation time, client decoding time (median of --repeat runs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=324)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from safetensors.torch import load

    from glm4v_fast.serving.client import embeddings_from_response
    from glm4v_fast.serving.rendering import render_json, render_safetensors

    emb = torch.randn(args.tokens, args.width, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([[1, 18, 72]])

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeat):
            started = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - started)
        return out, statistics.median(times)

    rows = []
    for label, fmt, dtype in (("JSON float", "float", "float32"), ("JSON base64 float32", "base64", "float32"),
                              ("JSON base64 float16", "base64", "float16"),
                              ("JSON base64 bfloat16", "base64", "bfloat16")):
        body, t_render = timed(lambda: render_json("glm4v-vision", [emb], grid, fmt, dtype))
        _, t_decode = timed(lambda: embeddings_from_response(json.loads(body)["data"][0]))
        rows.append((label, len(body), t_render, t_decode))
    for dtype in ("float32", "float16", "bfloat16"):
        body, t_render = timed(lambda: render_safetensors("glm4v-vision", [emb], grid, dtype))
        _, t_decode = timed(lambda: load(body)["embedding.0"].float())
        rows.append((f"safetensors {dtype}", len(body), t_render, t_decode))

    print(f"one {args.tokens} x {args.width} embedding; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| format | body | server: serialise | client: decode |")
    print("|---|---|---|---|")
    for label, size, t_render, t_decode in rows:
        print(f"| {label} | {size / 1e6:.2f} MB | {t_render * 1e3:.1f} ms | {t_decode * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
