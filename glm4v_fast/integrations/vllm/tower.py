"""glm4v-fast's VisionModel with the interface vLLM's GLM-4V models expect of their `visual` module.

vLLM 0.32's `Glm4vForConditionalGeneration` calls `visual(pixel_values, grid_thw=...)` with `grid_thw` a tensor
or a list of [t, h, w] lists, and reads `visual.dtype`, `visual.device`, `visual.spatial_merge_size` and
`visual.out_hidden_size`; the data-parallel encoder mode (`mm_encoder_tp_mode="data"`) calls
`visual(pixel_values, grid_list)` on each rank's share and also reads `next(visual.parameters()).dtype`.

Input contract: with `mm_device_do_normalize` (vLLM's default for GLM-4V), the processor neither rescales nor
normalizes, and the pixels arrive as 0-255 values (uint8); vLLM's tower applies `input_norm` (built by
`build_mm_input_norm`: `x * rescale / std - mean / std` per channel, in float32, then cast to the tower's dtype)
before its patch embedding. This tower applies the same module at the same place. With the option off, that
module is vLLM's identity, which only casts.

Weights load by transformers' names (`blocks.0.attn.qkv.weight`, ...), which are this tower's own: vLLM hands
`load_weights` the checkpoint's `model.visual.*` tensors with the prefix stripped.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ...config import VisionConfig
from ...model import VisionModel
from ...weights import copy_named_tensors


class VllmVisionTower(VisionModel):
    """A VisionModel that normalizes vLLM's raw pixels first and loads from vLLM's weight iterator."""

    def __init__(self, config: VisionConfig, input_norm: nn.Module, attn_backend: str = "auto",
                 kernels: str = "auto", compile: str = "auto"):
        # compile="auto": the compiled CPU path where it was measured faster (VisionModel's `compile`).
        super().__init__(config, attn_backend=attn_backend, kernels=kernels, compile=compile)
        self.input_norm = input_norm
        self.spatial_merge_size = config.spatial_merge_size
        self.out_hidden_size = config.out_hidden_size
        self.hidden_size = config.hidden_size
        self.patch_size = config.patch_size

    def forward(self, pixel_values: torch.Tensor, grid_thw, *, encoder_metadata: dict | None = None) -> torch.Tensor:
        """(sum(t*h*w) / merge**2, out_hidden_size) merged embeddings of all items, concatenated."""
        if encoder_metadata is not None:
            raise ValueError("glm4v-fast's tower does not take vLLM's encoder_metadata (vLLM's encoder CUDA "
                             "graphs); it computes its own layout from grid_thw")
        if isinstance(grid_thw, torch.Tensor) and grid_thw.device.type != "cpu":
            grid_thw = grid_thw.cpu()               # the layout is computed on the host
        x = self.input_norm(pixel_values.to(device=self.device), self.dtype)
        return super().forward(x, grid_thw)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors named as in transformers' Glm4vVisionModel; return the names loaded.

        vLLM may call this more than once (a sharded checkpoint gives the tower's tensors in several runs) and
        checks afterwards that every parameter was loaded.
        """
        return copy_named_tensors(self, weights)
