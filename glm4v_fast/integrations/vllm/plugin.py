"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts.

It replaces vLLM's GLM-4.1V and GLM-4.5V architectures with the classes in models.py (by "module:Class"
strings, so nothing of vLLM's model code is imported until a GLM-4V model is built). Calling it twice is
harmless. A vLLM outside the tested range is refused with a RuntimeError naming both versions, unless
GLM4V_FAST_VLLM=0 (vLLM's tower wanted anyway): then nothing is registered and vLLM runs as shipped.
"""
from __future__ import annotations

from ..engines import plugin_may_register
from ._version import check_vllm_version
from .selection import ENV_VAR

ARCHITECTURES = {
    "Glm4vForConditionalGeneration": "glm4v_fast.integrations.vllm.models:Glm4vFastForConditionalGeneration",
    "Glm4vMoeForConditionalGeneration": "glm4v_fast.integrations.vllm.models:Glm4vMoeFastForConditionalGeneration",
}


def register() -> None:
    if not plugin_may_register(check_vllm_version, ENV_VAR):
        return
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
