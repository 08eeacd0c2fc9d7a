"""glm4v-fast's VisionModel with the interface SGLang's GLM-4V models expect of their `visual` module.

SGLang 0.5.23's `Glm4vForConditionalGeneration.get_image_feature` / `get_video_feature` cast the items' pixels to
`visual.dtype` and call `visual(pixel_values, grid_thw=tensor)`; its data-parallel encoder
(`run_dp_sharded_mrope_vision_model`) calls `visual(pixels, grid_thw=tensor)` or `visual(pixels, tensor)` and
reads `spatial_merge_size`, `out_hidden_size` and `device`. The pixels are already normalized (transformers'
image processor runs in SGLang's tokenizer process), which is what VisionModel takes.

Weights load by transformers' names (`blocks.0.attn.qkv.weight`, `blocks.0.mlp.gate_proj.weight`, ...), this
tower's own: SGLang's loader renames the tower's tensors for its fused layers and skips names it does not know
without a word, so the model (models.py) hands them here first, with the checkpoint's `model.visual.` stripped.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ...config import VisionConfig
from ...model import VisionModel
from ...weights import copy_named_tensors


class SglangVisionTower(VisionModel):
    """A VisionModel taking SGLang's call forms and loading, strictly, from SGLang's weight iterator."""

    def __init__(self, config: VisionConfig, attn_backend: str = "auto", kernels: str = "auto",
                 compile: str = "auto"):
        # compile="auto": the compiled CPU path where it was measured faster (VisionModel's `compile`).
        super().__init__(config, attn_backend=attn_backend, kernels=kernels, compile=compile)
        self.spatial_merge_size = config.spatial_merge_size
        self.out_hidden_size = config.out_hidden_size
        self.hidden_size = config.hidden_size
        self.patch_size = config.patch_size

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """(sum(t*h*w) / merge**2, out_hidden_size) merged embeddings of all items, concatenated.

        grid_thw: a (items, 3) tensor (on any device) or a list of [t, h, w] rows.
        """
        if isinstance(grid_thw, torch.Tensor) and grid_thw.device.type != "cpu":
            grid_thw = grid_thw.cpu()               # the layout is computed on the host
        return super().forward(pixel_values.to(device=self.device, dtype=self.dtype), grid_thw)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors named as in transformers' Glm4vVisionModel; return the names loaded.

        A name the tower does not have, or a tensor of another shape, raises a ValueError naming it.
        """
        return copy_named_tensors(self, weights)

    def check_all_loaded(self, loaded: set[str]) -> None:
        """Raise a ValueError naming the tower's parameters the checkpoint did not provide."""
        missing = sorted(set(dict(self.named_parameters())) - loaded)
        if missing:
            shown = ", ".join(f"model.visual.{name}" for name in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) of the vision tower: {shown}{more}")
