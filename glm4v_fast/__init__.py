"""glm4v-fast: a standalone, exact and GPU-fast GLM-4V vision encoder.

Public names are imported lazily so that `import glm4v_fast` stays light (no triton, no PIL decoding
machinery, no server stack) until a name is used.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "VisionConfig": "glm4v_fast.config",
    "VisionModel": "glm4v_fast.model",
    "VisionProcessor": "glm4v_fast.processing",
    "smart_resize": "glm4v_fast.processing",
    "GLM4VEmbeddingPipeline": "glm4v_fast.pipeline",
    "create_glm4v_vision_encoder": "glm4v_fast.pipeline",
    "encode_image": "glm4v_fast.pipeline",
    "encode_images": "glm4v_fast.pipeline",
}
_SUBMODULES = {"reference", "kernels", "packing", "attention", "weights", "processing", "video", "pipeline",
               "cli", "integrations", "serving", "config", "model", "bench", "options", "precision", "progress"}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .config import VisionConfig
    from .model import VisionModel
    from .pipeline import GLM4VEmbeddingPipeline, create_glm4v_vision_encoder, encode_image, encode_images
    from .processing import VisionProcessor, smart_resize


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"glm4v_fast.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'glm4v_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
