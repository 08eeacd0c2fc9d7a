"""SGLang's HTTP server admits the preprocessed image and video items its engine takes.

SGLang 0.5.23 checks each `/generate` body against its API schema (`generate_contract_error`) before the engine
sees it, and that schema knows media items as URLs or `{"url": ...}` objects only: an item
`{"format": "precomputed_embedding" | "processor_output", ...}`, which the engine and its Python request type take,
is refused with 400 ("unknown field `format`"). This hook (installed by the plugin in the server process) checks
the rest of the body as before and lets such image and video items through to the engine, where the GLM-4V
processor (processing.py) reads them.
"""
from __future__ import annotations

FORMATS = ("precomputed_embedding", "processor_output")


def _is_preprocessed(item) -> bool:
    return isinstance(item, dict) and item.get("format") in FORMATS


def _placeholder(value):
    """image_data with each preprocessed item replaced by an empty URL string (same shape, schema-valid)."""
    if _is_preprocessed(value):
        return ""
    if isinstance(value, list):
        return [_placeholder(item) for item in value]
    return value


def admit_preprocessed_images(original, body, *args, **kwargs):
    """An AROUND hook of `sglang.srt.entrypoints.api_contract.generate_contract_error`."""
    if isinstance(body, dict):
        body = {**body, **{key: _placeholder(body[key]) for key in ("image_data", "video_data")
                           if body.get(key) is not None}}
    return original(body, *args, **kwargs)
