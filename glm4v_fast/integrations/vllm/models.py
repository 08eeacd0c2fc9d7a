"""vLLM's GLM-4.1V and GLM-4.5V models with glm4v-fast's vision tower, and the processing that takes embeddings.

The plugin (plugin.py) registers these classes under vLLM's architecture names, so `vllm serve` on a GLM-4.1V /
GLM-4.5V checkpoint builds them. Everything but `visual` is vLLM's own: the language model, the processor, the
multimodal merge, weight loading (the tower's tensors reach `VllmVisionTower.load_weights` by transformers' names).

Processing (processing.py): vLLM's GLM-4V processing that, with `enable_mm_embeds=True`, also takes precomputed
image embeddings and video embeddings with their slices' timestamps.
"""
from __future__ import annotations

import contextlib
import threading

from vllm.model_executor.models import glm4_1v
from vllm.model_executor.models.glm4_1v import (Glm4vDummyInputsBuilder, Glm4vForConditionalGeneration,
                                                Glm4vMoeForConditionalGeneration)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...config import VisionConfig
from ._version import check_vllm_version
from .processing import Glm4vFastMultiModalProcessor, Glm4vFastProcessingInfo
from .selection import choose_tower, log_choice_once
from .tower import VllmVisionTower

check_vllm_version()

_construction_lock = threading.Lock()


def _blockers(vllm_config) -> list[str]:
    """Options of this vLLM config that glm4v-fast's tower does not implement."""
    reasons = []
    if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
        reasons.append("vLLM's encoder CUDA graphs (cudagraph_mm_encoder) replay vLLM's tower with its own "
                       "encoder metadata")
    lora = getattr(vllm_config, "lora_config", None)
    if lora is not None and getattr(lora, "enable_tower_connector_lora", False):
        reasons.append("LoRA on the vision tower (enable_tower_connector_lora) wraps vLLM's linear layers, which "
                       "glm4v-fast's tower does not use")
    if vllm_config.quant_config is not None:
        reasons.append(f"a quantized checkpoint ({vllm_config.quant_config.get_name()}): the tower loads "
                       "unquantized weights only")
    return reasons


@contextlib.contextmanager
def _fast_tower_factory(built: list):
    """While a parent __init__ runs, make glm4_1v's tower constructor build glm4v-fast's tower instead.

    The parent builds `self.visual` inside vLLM's `_mark_tower_model` context (which tracks the tower for
    multimodal limits and offloading) by calling the module-level `Glm4vVisionTransformer`; replacing that name
    for the duration of the call is the one way to build our tower there without first allocating vLLM's.
    """
    def build(text_config, vision_config, norm_eps=1e-5, quant_config=None, input_norm=None, prefix=""):
        del text_config, norm_eps, quant_config, prefix          # vLLM-tower-only arguments
        tower = VllmVisionTower(VisionConfig.from_dict(vision_config.to_dict()), input_norm=input_norm)
        built.append(tower)
        return tower

    with _construction_lock:
        original = glm4_1v.Glm4vVisionTransformer
        glm4_1v.Glm4vVisionTransformer = build
        try:
            yield
        finally:
            glm4_1v.Glm4vVisionTransformer = original


class _FastTowerMixin:
    """Builds glm4v-fast's tower in place of vLLM's when `choose_tower` says so."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        import torch

        device = vllm_config.device_config.device
        device_type = torch.device(device).type if device is not None else "cpu"
        choice = choose_tower(device_type, vllm_config.model_config.dtype, vllm_config.additional_config,
                              _blockers(vllm_config))
        arch = type(self).__mro__[2].__name__
        if not choice.use_fast:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.glm4v_fast_tower = False
            log_choice_once(arch, choice)
            return
        built: list[VllmVisionTower] = []
        with _fast_tower_factory(built):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.glm4v_fast_tower = True
        if built:
            kernels, attention = built[0].resolved(torch.device(device_type))
            log_choice_once(arch, choice, kernels, attention)
        else:   # the tower was skipped (all image/video limits 0): nothing to encode
            log_choice_once(arch, choice, "none", "none (no vision tower built)")


_register = MULTIMODAL_REGISTRY.register_processor(Glm4vFastMultiModalProcessor, info=Glm4vFastProcessingInfo,
                                                    dummy_inputs=Glm4vDummyInputsBuilder)


@_register
class Glm4vFastForConditionalGeneration(_FastTowerMixin, Glm4vForConditionalGeneration):
    """GLM-4.1V (vLLM's `Glm4vForConditionalGeneration`) with glm4v-fast's vision tower."""


@_register
class Glm4vMoeFastForConditionalGeneration(_FastTowerMixin, Glm4vMoeForConditionalGeneration):
    """GLM-4.5V (vLLM's `Glm4vMoeForConditionalGeneration`) with glm4v-fast's vision tower."""
