"""The `sglang.srt.plugins` entry point: SGLang calls `register()` in each of its processes (`load_plugins`).

It puts the classes of models.py into SGLang's model registry under the GLM-4.1V and GLM-4.5V architecture
names, and hooks SGLang's choice of multimodal processor so that these architectures get processing.py's
processor (precomputed embeddings that work); SGLang's HTTP server then also admits such items at /generate
(http_contract.py). Calling it twice is harmless.

An SGLang outside the tested range is refused with a RuntimeError naming both versions (SGLang logs a plugin's
error and starts without it), unless GLM4V_FAST_SGLANG=0: then nothing is registered and SGLang runs as shipped.
With GLM4V_FAST_SGLANG=0 on a tested SGLang, the classes and the processor are registered but keep SGLang's tower.
"""
from __future__ import annotations

from ..engines import plugin_may_register
from ._version import check_sglang_version
from .selection import ENV_VAR

_PROCESSOR_TARGET = "sglang.srt.managers.multimodal_processor.get_mm_processor_cls"
_CONTRACT_TARGET = "sglang.srt.entrypoints.api_contract.generate_contract_error"
_registered = False


def _glm4v_fast_processor(result, hf_config, model_config=None):
    """An AFTER hook of `get_mm_processor_cls`: our processor for the architectures we registered."""
    del model_config
    from sglang.srt.multimodal.processors.glm4v import Glm4vImageProcessor

    from .models import MODELS
    from .processing import Glm4vFastProcessor

    names = {model.__name__ for model in MODELS}
    if result is Glm4vImageProcessor and names & set(getattr(hf_config, "architectures", None) or ()):
        return Glm4vFastProcessor
    return result


def register() -> None:
    global _registered
    if not plugin_may_register(check_sglang_version, ENV_VAR) or _registered:
        return
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .http_contract import admit_preprocessed_images
    from .models import MODELS

    for model in MODELS:
        ModelRegistry.models[model.__name__] = model
    HookRegistry.register(_PROCESSOR_TARGET, _glm4v_fast_processor, HookType.AFTER)
    HookRegistry.register(_CONTRACT_TARGET, admit_preprocessed_images, HookType.AROUND)
    _registered = True
