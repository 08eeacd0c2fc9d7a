"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts.

It replaces vLLM's GLM-4.1V and GLM-4.5V architectures with the classes in models.py (by "module:Class"
strings, so nothing of vLLM's model code is imported until a GLM-4V model is built). Calling it twice is
harmless. A vLLM outside the tested range is refused with a RuntimeError naming both versions, unless
GLM4V_FAST_VLLM=0 (vLLM's tower wanted anyway): then nothing is registered and vLLM runs as shipped.
"""
from __future__ import annotations

import os

from ._version import check_vllm_version

ARCHITECTURES = {
    "Glm4vForConditionalGeneration": "glm4v_fast.integrations.vllm.models:Glm4vFastForConditionalGeneration",
    "Glm4vMoeForConditionalGeneration": "glm4v_fast.integrations.vllm.models:Glm4vMoeFastForConditionalGeneration",
}


def register() -> None:
    from .selection import ENV_VAR, _parse_flag

    try:
        check_vllm_version()
    except RuntimeError:
        if _parse_flag(os.environ.get(ENV_VAR), ENV_VAR) is False:
            return
        raise
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
