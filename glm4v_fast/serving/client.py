"""Client side of the embedding server: reading its answers (no server dependencies: numpy only)."""
from __future__ import annotations

import base64

import numpy as np


def embeddings_from_response(item: dict) -> np.ndarray:
    """One `data` (or `videos`) entry of a JSON response as a (tokens, D) float32 array, any encoding and dtype."""
    value = item["embedding"]
    if isinstance(value, str):
        raw = base64.b64decode(value)
        dtype = item.get("dtype", "float32")
        if dtype == "bfloat16":  # the upper half of a float32
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype={"float32": "<f4", "float16": "<f2"}[dtype]).astype(np.float32)
        return array.reshape(item["shape"])
    return np.asarray(value, dtype=np.float32).reshape(item["shape"])
