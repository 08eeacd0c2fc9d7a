"""SGLang's GLM-4.1V and GLM-4.5V models with glm4v-fast's vision tower.

The plugin (plugin.py) puts these classes into SGLang's model registry under the architecture names, which they
also bear as class names: SGLang finds a model's multimodal processor by the class's `__name__`, so its GLM-4V
processor (with our fixes for precomputed embeddings: processing.py) stays in charge. Everything but `visual` is
SGLang's own: the language model, the multimodal merge, the weight loading of everything else.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable

import torch
from sglang.srt.models import glm4v as sglang_glm4v
from sglang.srt.models import glm4v_moe as sglang_glm4v_moe

from ...config import VisionConfig
from ._version import check_sglang_version
from .selection import choose_tower, log_choice_once
from .tower import SglangVisionTower

check_sglang_version()

_construction_lock = threading.Lock()
_TOWER_PREFIXES = ("model.visual.", "visual.")


def _blockers(quant_config) -> list[str]:
    """Options of this model that glm4v-fast's tower does not implement."""
    if quant_config is not None:
        return [f"a quantized checkpoint ({quant_config.get_name()}): the tower loads unquantized weights only"]
    return []


@contextlib.contextmanager
def _fast_tower_factory(built: list):
    """While a parent __init__ runs, make its tower constructor build glm4v-fast's tower instead.

    Both parents build `self.visual` by calling the module-level name `Glm4vVisionModel` (glm4v_moe.py imports it
    from glm4v.py); replacing that name for the duration of the call builds our tower in its place, on the device
    and in the dtype SGLang's loader has set, without first allocating SGLang's.
    """
    def build(vision_config, quant_config=None, prefix="", use_data_parallel=False):
        del quant_config, prefix                  # SGLang-tower-only arguments
        tower = SglangVisionTower(VisionConfig.from_dict(vision_config.to_dict()))
        tower.use_data_parallel = use_data_parallel
        built.append(tower)
        return tower

    modules = (sglang_glm4v, sglang_glm4v_moe)
    with _construction_lock:
        originals = [module.Glm4vVisionModel for module in modules]
        for module in modules:
            module.Glm4vVisionModel = build
        try:
            yield
        finally:
            for module, original in zip(modules, originals):
                module.Glm4vVisionModel = original


def _tower_name(name: str) -> str | None:
    for prefix in _TOWER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


class _FastTowerMixin:
    """Builds glm4v-fast's tower in place of SGLang's when `choose_tower` says so, and loads its weights."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        choice = choose_tower(_blockers(quant_config))
        arch = type(self).__mro__[2].__name__
        if not choice.use_fast:
            super().__init__(config, quant_config=quant_config, prefix=prefix)
            self.glm4v_fast_tower = False
            log_choice_once(arch, choice)
            return
        built: list[SglangVisionTower] = []
        with _fast_tower_factory(built):
            super().__init__(config, quant_config=quant_config, prefix=prefix)
        self.glm4v_fast_tower = True
        self._glm4v_fast_weights_loaded = False
        # SGLang builds the model inside a `torch.device(...)` context: the default device is the target one.
        kernels, attention = self.visual.resolved(torch.get_default_device())
        log_choice_once(arch, choice, kernels, attention)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *args, **kwargs):
        """The tower's tensors to the tower (by transformers' names, strictly), the rest to SGLang's loader.

        The first load must provide every tensor of the tower; later calls (weight updates) may bring a subset.
        """
        if not self.glm4v_fast_tower:
            return super().load_weights(weights, *args, **kwargs)
        loaded: set[str] = set()

        def rest():
            for name, tensor in weights:
                tower_name = _tower_name(name)
                if tower_name is None:
                    yield name, tensor
                else:
                    loaded.update(self.visual.load_weights([(tower_name, tensor)]))

        result = super().load_weights(rest(), *args, **kwargs)
        if not self._glm4v_fast_weights_loaded and not kwargs.get("is_nextn", False):
            self.visual.check_all_loaded(loaded)
            self._glm4v_fast_weights_loaded = True
        return result


class Glm4vForConditionalGeneration(_FastTowerMixin, sglang_glm4v.Glm4vForConditionalGeneration):
    """GLM-4.1V (SGLang's `Glm4vForConditionalGeneration`) with glm4v-fast's vision tower."""


class Glm4vMoeForConditionalGeneration(_FastTowerMixin, sglang_glm4v_moe.Glm4vMoeForConditionalGeneration):
    """GLM-4.5V (SGLang's `Glm4vMoeForConditionalGeneration`) with glm4v-fast's vision tower."""


MODELS = (Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration)
