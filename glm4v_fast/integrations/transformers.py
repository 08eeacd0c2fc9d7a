"""Drop-in replacement of the vision tower inside a transformers GLM-4V model.

    from glm4v_fast.integrations.transformers import patch_glm4v
    model = Glm4vForConditionalGeneration.from_pretrained(...)
    patch_glm4v(model)                     # model.model.visual is now a glm4v_fast VisionModel
    model.generate(**inputs)               # same tokens, faster vision encoding

This is the only module of the package that imports transformers (it is an optional, test-time dependency of
glm4v_fast itself), so it is imported only when a user asks for the integration.

What transformers reads from `visual` (GLM-4.1V `Glm4vModel`, GLM-4.5V `Glm4vMoeModel`, GLM-4.6V `Glm46VModel`,
transformers 5.x): `get_image_features` / `get_video_features` call `visual(pixel_values, grid_thw=...,
return_dict=True, **kwargs)` and read `.pooler_output` of the result, and they read `visual.dtype` (to cast the
pixel values) and `visual.spatial_merge_size` (to split the embeddings per item). Nothing else: generation only
sees the embeddings spliced into the text sequence. `FastGlm4vVisionModel` answers exactly that call.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..config import VisionConfig
from ..model import VisionModel

# The inner (non-generation) model classes whose `visual` attribute is a GLM-4V vision tower, by class name so
# that transformers versions lacking one of them (GLM-4.6V arrived later) still work.
SUPPORTED_MODELS = ("Glm4vModel", "Glm4vMoeModel", "Glm46VModel")
SUPPORTED_VISION_TYPES = ("glm4v_vision", "glm4v_moe_vision")

# Keyword arguments transformers may pass to the vision tower that carry layout tensors it can precompute
# (`image_cu_seqlens` etc., see transformers.utils.generic.accepts_precomputed_kwargs). They are pure functions
# of grid_thw, which the fast model derives itself in one packing step, so they are accepted and not used.
_DERIVED_FROM_GRID = ("position_ids", "cu_seqlens", "max_seqlen")


class FastGlm4vVisionModel(VisionModel):
    """A glm4v_fast VisionModel with transformers' Glm4vVisionModel call signature and outputs.

    It *is* a VisionModel (not a wrapper holding one), so its parameters keep transformers' names under the
    parent model (`model.visual.blocks.0.attn.qkv.weight` ...), and the parent's `state_dict()` /
    `save_pretrained()` still produce a checkpoint transformers can load.

    Inference only: the fast kernels have no backward pass, so do not fine-tune through it.
    """

    def __init__(self, config: VisionConfig, hf_config=None, attn_backend: str = "auto", kernels: str = "auto"):
        super().__init__(config, attn_backend=attn_backend, kernels=kernels)
        # The transformers vision config of the tower this replaced, kept for callers that inspect it.
        self.hf_config = hf_config

    @property
    def spatial_merge_size(self) -> int:
        return self.config.spatial_merge_size

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutputWithPooling | tuple[torch.Tensor, torch.Tensor]:
        """transformers' `Glm4vVisionModel.forward`: pixel rows (N, C*T*P*P) and grid_thw (K, 3) in,
        `BaseModelOutputWithPooling(last_hidden_state=downsample output, pooler_output=merger output)` out.

        Precomputed layout tensors (position_ids, cu_seqlens, max_seqlen) and the text model's keyword
        arguments that transformers forwards here are ignored; per-layer hidden states and attention maps are
        not recorded (`hidden_states` and `attentions` of the output are None).
        """
        out = self.forward_features(hidden_states, grid_thw)
        if return_dict is False:
            return out.last_hidden_state, out.pooler_output
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output)


def _inner_model(model):
    """The Glm4v*Model that owns `visual`: `model` itself or its `.model` (the *ForConditionalGeneration case)."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and type(candidate).__name__ in SUPPORTED_MODELS:
            return candidate
    raise ValueError(
        f"patch_glm4v supports transformers' Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration and "
        f"Glm46VForConditionalGeneration (or their inner {', '.join(SUPPORTED_MODELS)}); got {type(model).__name__}"
    )


def patch_glm4v(model, **vision_model_kwargs):
    """Replace the vision tower of a transformers GLM-4V model with glm4v_fast's, in place; returns `model`.

    Args:
        model: a Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration or Glm46VForConditionalGeneration
            (or the inner Glm4vModel / Glm4vMoeModel / Glm46VModel), with its weights loaded.
        **vision_model_kwargs: passed to `VisionModel` (`attn_backend=`, `kernels=`).

    The new tower holds the same weights, on the same device, in the same dtype and train/eval mode. Patching an
    already patched model rebuilds the tower with the new keyword arguments.

    Raises:
        ValueError: the model is not a supported GLM-4V model, or its vision weights are not materialised
            (meta device), or its vision config is one glm4v_fast cannot run.
    """
    inner = _inner_model(model)
    visual = getattr(inner, "visual", None)
    if not isinstance(visual, torch.nn.Module):
        raise ValueError(f"{type(inner).__name__} has no vision tower (`visual`) to replace")

    if isinstance(visual, FastGlm4vVisionModel):
        config, hf_config = visual.config, visual.hf_config
    else:
        hf_config = getattr(visual, "config", None)
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_VISION_TYPES:
            raise ValueError(f"the vision tower of {type(inner).__name__} has config type {model_type!r}; "
                             f"patch_glm4v supports {SUPPORTED_VISION_TYPES}")
        config = VisionConfig.from_dict(hf_config.to_dict())

    first = next(visual.parameters(), None)
    if first is None or first.is_meta:
        raise ValueError("the vision tower's weights are not loaded (meta device); load the model before patching")
    device, dtype = first.device, first.dtype

    # Build on the meta device and materialise once on the target device: no throw-away random init.
    with torch.device("meta"):
        fast = FastGlm4vVisionModel(config, hf_config=hf_config, **vision_model_kwargs)
    fast = fast.to(dtype).to_empty(device=device)
    fast.load_state_dict(visual.state_dict(), strict=True)
    fast.train(visual.training)
    inner.visual = fast
    return model


__all__ = ["SUPPORTED_MODELS", "FastGlm4vVisionModel", "patch_glm4v"]
