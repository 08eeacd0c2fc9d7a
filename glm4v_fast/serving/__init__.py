"""GLM-4V embedding server: Starlette + uvicorn, dynamic batching, Prometheus metrics.

    glm4v-fast serve --checkpoint DIR          # or: python -m glm4v_fast.serving --checkpoint DIR
    curl -s localhost:8000/v1/embeddings -d '{"images": ["<base64 PNG/JPEG>"], "encoding_format": "base64"}'
    # binary: "dtype": "bfloat16" with base64, or `-H 'Accept: application/vnd.safetensors'` for a safetensors body;
    # videos: "videos": ["<base64 mp4>", {"frames": ["<base64 PNG>", ...], "fps": 2}]

Routes: POST /v1/embeddings (behind `--api-key` / GLM4V_FAST_API_KEY when set), GET /health, GET /metrics.
Needs the `serve` extra (starlette, uvicorn, prometheus-client); `add_serve_arguments`, `ServeSettings` and
`EmbeddingClient` work without it. Names are imported lazily for that reason.

Rooms: protocol (the request), decoding (within its budget), rendering (the answer), service (routes and
batching), auth (the API key), app (Starlette), server (CLI and uvicorn), client (calling a server).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "add_serve_arguments": "glm4v_fast.serving.server",
    "run_server": "glm4v_fast.serving.server",
    "ServeSettings": "glm4v_fast.serving.settings",
    "EmbeddingService": "glm4v_fast.serving.service",
    "create_app": "glm4v_fast.serving.app",
    "embeddings_from_response": "glm4v_fast.serving.client",
    "EmbeddingClient": "glm4v_fast.serving.client",
    "DynamicBatcher": "glm4v_fast.serving.batcher",
    "EmbeddingCache": "glm4v_fast.serving.cache",
    "EmbeddingRequest": "glm4v_fast.serving.protocol",
    "parse_request": "glm4v_fast.serving.protocol",
    "SAFETENSORS_MEDIA_TYPE": "glm4v_fast.serving.protocol",
}

__all__ = tuple(sorted(_LAZY))


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'glm4v_fast.serving' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
