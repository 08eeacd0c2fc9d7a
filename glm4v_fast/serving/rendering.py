"""The /v1/embeddings answer: JSON (float lists or base64 of a dtype) or a safetensors body.

JSON is built in small pieces: each C-level step (one json.dumps, one base64 call) covers at most about
FLOATS_PER_PIECE floats, so the thread rendering an answer never holds the GIL (and stalls the event loop) for
long, however big the answer: a whole 12k x 1536 embedding in one json.dumps takes seconds.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .protocol import ANSWER_DTYPES

FLOATS_PER_PIECE = 1 << 15
#: A video's answer: (embedding (tokens, D), grid_thw row, timestamps of its temporal slices).
VideoAnswer = tuple


def raw_bytes(emb: torch.Tensor, dtype: str) -> bytes:
    """Little-endian raw values of `emb` in `dtype` (bfloat16: its 16-bit pattern, round-to-nearest-even)."""
    if dtype == "float32":
        return emb.numpy().astype("<f4", copy=False).tobytes()
    if dtype == "float16":
        return emb.numpy().astype("<f2").tobytes()
    return emb.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2", copy=False).tobytes()


def _float_pieces(array: np.ndarray) -> Iterator[bytes]:
    """`array` (2-D) as JSON nested lists, in pieces of about FLOATS_PER_PIECE floats."""
    rows = max(1, FLOATS_PER_PIECE // max(1, array.shape[-1]))
    yield b"["
    for start in range(0, array.shape[0], rows):
        if start:
            yield b","
        yield json.dumps(array[start:start + rows].tolist(), separators=(",", ":"))[1:-1].encode()
    yield b"]"


def _base64_pieces(raw: bytes) -> Iterator[bytes]:
    step = 3 * FLOATS_PER_PIECE  # a multiple of 3 bytes: the pieces' base64 concatenate to the whole's
    yield b'"'
    for start in range(0, len(raw), step):
        yield base64.b64encode(raw[start:start + step])
    yield b'"'


def json_pieces(model_name: str, embeddings: Sequence[torch.Tensor], grid_thw: torch.Tensor, fmt: str,
                dtype: str = "float32", videos: Sequence[VideoAnswer] | None = None) -> Iterator[bytes]:
    """The JSON answer as the pieces it is built from (each the output of one bounded C-level step)."""
    yield b'{"object":"list","model":' + json.dumps(model_name).encode() + b',"data":['

    def item(head: dict, emb: torch.Tensor) -> Iterator[bytes]:
        if fmt == "base64":
            head["dtype"] = dtype
        yield json.dumps(head, separators=(",", ":"))[:-1].encode() + b',"embedding":'
        if fmt == "base64":
            yield from _base64_pieces(raw_bytes(emb, dtype))
        else:
            yield from _float_pieces(emb.numpy())
        yield b"}"

    for i, emb in enumerate(embeddings):
        if i:
            yield b","
        yield from item({"object": "embedding", "index": i, "grid_thw": grid_thw[i].tolist(),
                         "shape": list(emb.shape)}, emb)
    yield b"]"
    if videos:
        yield b',"videos":['
        for j, (emb, grid, stamps) in enumerate(videos):
            if j:
                yield b","
            yield from item({"object": "video_embedding", "index": j, "grid_thw": list(grid),
                             "timestamps": list(stamps), "shape": list(emb.shape)}, emb)
        yield b"]"
    tokens = int(sum(e.shape[0] for e in embeddings) + sum(v[0].shape[0] for v in videos or ()))
    usage = {"images": len(embeddings), "tokens": tokens}
    if videos:
        usage["videos"] = len(videos)
    yield b',"usage":' + json.dumps(usage, separators=(",", ":")).encode() + b"}"


def render_json(model_name: str, embeddings: Sequence[torch.Tensor], grid_thw: torch.Tensor, fmt: str,
                dtype: str = "float32", videos: Sequence[VideoAnswer] | None = None) -> bytes:
    """The JSON answer: `data` per image (and `videos` per video) in request order, and `usage`."""
    return b"".join(json_pieces(model_name, embeddings, grid_thw, fmt, dtype, videos))


def render_safetensors(model_name: str, embeddings: Sequence[torch.Tensor], grid_thw: torch.Tensor,
                       dtype: str = "float32", videos: Sequence[VideoAnswer] | None = None) -> bytes:
    """The answer as a safetensors file: `embedding.{i}` (tokens, D) per image in `dtype`, `grid_thw` (K, 3)
    int64; for videos `video_embedding.{j}`, `video_grid_thw` (V, 3) and the timestamps in the metadata."""
    from safetensors.torch import save

    tensors = {f"embedding.{i}": emb.to(ANSWER_DTYPES[dtype]).contiguous() for i, emb in enumerate(embeddings)}
    tensors["grid_thw"] = grid_thw.to(torch.int64).contiguous()
    metadata = {"model": model_name, "images": str(len(embeddings)), "dtype": dtype}
    if videos:
        for j, (emb, _, _) in enumerate(videos):
            tensors[f"video_embedding.{j}"] = emb.to(ANSWER_DTYPES[dtype]).contiguous()
        tensors["video_grid_thw"] = torch.tensor([list(g) for _, g, _ in videos], dtype=torch.int64)
        metadata["videos"] = str(len(videos))
        metadata["video_timestamps"] = json.dumps([list(t) for _, _, t in videos])
    return save(tensors, metadata)
