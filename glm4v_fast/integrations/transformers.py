"""Drop-in replacement of the vision tower inside a transformers GLM-4V model.

    from glm4v_fast.integrations.transformers import patch_glm4v
    model = Glm4vForConditionalGeneration.from_pretrained(...)
    patch_glm4v(model)                     # model.model.visual is now a glm4v_fast VisionModel
    model.generate(**inputs)               # same tokens, faster vision encoding

    unpatch = patch_glm4v_classes()        # or: every GLM-4V model built from now on (from_pretrained included)
    model = Glm4vForConditionalGeneration.from_pretrained(...)   # loads straight into the fast tower

This is the only module of the package that imports transformers (it is an optional, test-time dependency of
glm4v_fast itself), so it is imported only when a user asks for the integration.

What transformers reads from `visual` (GLM-4.1V `Glm4vModel`, GLM-4.5V `Glm4vMoeModel`, GLM-4.6V `Glm46VModel`,
transformers 5.x): `get_image_features` / `get_video_features` call `visual(pixel_values, grid_thw=...,
return_dict=True, **kwargs)` (kwargs: `output_hidden_states`, `output_attentions`, precomputed layout tensors) and
read `.pooler_output`; they read `visual.dtype` and `visual.spatial_merge_size`. Training adds
`gradient_checkpointing_enable()` (which sets `gradient_checkpointing` and `_gradient_checkpointing_func` on every
module that has the flag: our blocks), PEFT (which finds modules by transformers' names: the tower has them) and
the parent's `post_init`, which collects `_no_split_modules` from its children.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..config import VisionConfig
from ..model import VisionModel

# The inner (non-generation) model classes whose `visual` attribute is a GLM-4V vision tower, by class name so
# that transformers versions lacking one of them (GLM-4.6V arrived later) still work.
SUPPORTED_MODELS = ("Glm4vModel", "Glm4vMoeModel", "Glm46VModel")
SUPPORTED_VISION_TYPES = ("glm4v_vision", "glm4v_moe_vision")


class _BridgedConfig(VisionConfig):
    """A VisionConfig that answers the attributes it lacks from the transformers vision config it came from.

    transformers reads its own attributes off a tower's `config` (`_attn_implementation`, `output_hidden_states`,
    `return_dict` ...); they come live from that config object, which is the parent model's `vision_config`, so
    `set_attn_implementation()` on the parent shows here too. (Our tower picks its attention kernel by
    `attn_backend`; every implementation computes the same exact attention.)
    """

    def __getattr__(self, name):
        hf = self.__dict__.get("_hf_config")
        if hf is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(hf, name)


def _bridged(config: VisionConfig, hf_config) -> VisionConfig:
    if hf_config is None:
        return config
    bridged = _BridgedConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(VisionConfig)})
    bridged._hf_config = hf_config
    return bridged


class FastGlm4vVisionModel(VisionModel):
    """A glm4v_fast VisionModel with transformers' Glm4vVisionModel call signature, outputs and training hooks.

    It *is* a VisionModel (not a wrapper holding one), so its parameters and modules keep transformers' names
    under the parent model (`model.visual.blocks.0.attn.qkv.weight`, `...mlp.gate_proj`, `patch_embed.proj` ...):
    the parent's `state_dict()` / `save_pretrained()` still produce a checkpoint transformers can load, and
    `from_pretrained` and PEFT find the same modules as in the stock tower.

    Gradients flow through every path: the Triton kernels have backward kernels, and under grad `auto` picks an
    attention backend that has a backward (the forward-only Triton attention refuses, never drops gradients).
    """

    # What transformers' Glm4vPreTrainedModel declares and its parent reads from a vision sub-model. Blocks are
    # never split across devices (the fused residual add reads the next block's norm); attention dispatch is ours.
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # The packing step reads grid_thw on the host: a graph break, so no fullgraph torch.compile.
    _can_compile_fullgraph = False

    def __init__(self, config: VisionConfig, hf_config=None, **vision_model_kwargs):
        super().__init__(_bridged(config, hf_config), **vision_model_kwargs)
        # The transformers vision config of the tower this replaced: its output_hidden_states /
        # output_attentions / return_dict defaults apply, as they do in transformers' tower.
        self.hf_config = hf_config

    @property
    def spatial_merge_size(self) -> int:
        return self.config.spatial_merge_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    # ---------------------------------------------------------------- activation checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint every block in training (as transformers' `gradient_checkpointing_enable()` on the parent
        model does; this is the same for the tower alone). Default: `torch.utils.checkpoint` non-reentrant."""
        func = functools.partial(checkpoint, **(gradient_checkpointing_kwargs or {"use_reentrant": False}))
        for block in self.blocks:
            block.gradient_checkpointing, block._gradient_checkpointing_func = True, func

    def gradient_checkpointing_disable(self) -> None:
        for block in self.blocks:
            block.gradient_checkpointing = False

    # ---------------------------------------------------------------- transformers' call
    def _flag(self, kwargs: dict, name: str, default):
        value = kwargs.get(name)
        return value if value is not None else getattr(self.hf_config, name, default)

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs
                ) -> BaseModelOutputWithPooling | tuple:
        """transformers' `Glm4vVisionModel.forward`: pixel rows (N, C*T*P*P) and grid_thw (K, 3) in,
        `BaseModelOutputWithPooling(last_hidden_state=downsample output, pooler_output=merger output)` out.

        `output_hidden_states` / `output_attentions` (keyword or vision-config default) add what transformers
        records: `hidden_states`, the residual stream before the first block and after each block but the last,
        then `last_hidden_state` (depth + 1 tensors); `attentions`, each block's attention output (N, hidden).
        `return_dict=False` gives the tuple. Precomputed layout tensors (position_ids, cu_seqlens, max_seqlen) and
        the text model's keyword arguments that transformers forwards here are derived from grid_thw or ignored.
        """
        want_hidden = bool(self._flag(kwargs, "output_hidden_states", False))
        want_attentions = bool(self._flag(kwargs, "output_attentions", False))
        record = {} if (want_hidden or want_attentions) else None
        out = self.forward_features(hidden_states, grid_thw, record=record)
        result = BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output)
        if want_hidden:
            hidden = record["hidden_states"]
            if getattr(self.hf_config, "tie_last_hidden_states", None) is not False:
                hidden = hidden[:-1] + [out.last_hidden_state]   # transformers' capture_outputs does the same
            result.hidden_states = tuple(hidden)
        if want_attentions:
            result.attentions = tuple(record["attentions"])
        if not self._flag(kwargs, "return_dict", True):
            return result.to_tuple()
        return result


def _inner_model(model):
    """The Glm4v*Model that owns `visual`: `model` itself or its `.model` (the *ForConditionalGeneration case)."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and type(candidate).__name__ in SUPPORTED_MODELS:
            return candidate
    raise ValueError(
        f"patch_glm4v supports transformers' Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration and "
        f"Glm46VForConditionalGeneration (or their inner {', '.join(SUPPORTED_MODELS)}); got {type(model).__name__}"
    )


def _swap_tower(owners, inner, vision_model_kwargs: dict, allow_meta: bool) -> None:
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
    if first is None or (first.is_meta and not allow_meta):
        raise ValueError("the vision tower's weights are not loaded (meta device); load the model before patching")
    device, dtype = first.device, first.dtype

    # Build on the meta device and materialise once on the target device: no throw-away random init. A tower on
    # the meta device (a model being built by from_pretrained) stays there: the loader fills it by name.
    with torch.device("meta"):
        fast = FastGlm4vVisionModel(config, hf_config=hf_config, **vision_model_kwargs)
    fast = fast.to(dtype)
    if not first.is_meta:
        fast = fast.to_empty(device=device)
        fast.load_state_dict(visual.state_dict(), strict=True)
    fast.train(visual.training)
    # transformers' rotary module has no parameters: it is kept, under its own name, for code that inspects the
    # tower's axial-RoPE parameters (transformers' tests do). Its tables equal the ones our packing builds.
    rotary = getattr(visual, "rotary_pos_emb", None)
    if isinstance(rotary, torch.nn.Module):
        fast.rotary_pos_emb = rotary
    stock_block = next(iter(getattr(visual, "blocks", [])), None)
    if getattr(stock_block, "gradient_checkpointing", False):     # enabled on the stock tower: keep it on
        for block in fast.blocks:
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = stock_block._gradient_checkpointing_func
    inner.visual = fast
    for owner in owners:                       # device_map="auto" must not split our blocks either
        if isinstance(getattr(owner, "_no_split_modules", None), set):
            owner._no_split_modules.update(FastGlm4vVisionModel._no_split_modules)


def patch_glm4v(model, **vision_model_kwargs):
    """Replace the vision tower of a transformers GLM-4V model with glm4v_fast's, in place; returns `model`.

    Args:
        model: a Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration or Glm46VForConditionalGeneration
            (or the inner Glm4vModel / Glm4vMoeModel / Glm46VModel), with its weights loaded.
        **vision_model_kwargs: passed to `VisionModel` (`attn_backend=`, `kernels=`, `token_buckets=`,
            `cuda_graphs=`).

    The new tower holds the same weights, on the same device, in the same dtype and train/eval mode, with
    gradient checkpointing as it was. Patching an already patched model rebuilds the tower with the new
    keyword arguments.

    Raises:
        ValueError: the model is not a supported GLM-4V model, or its vision weights are not materialised
            (meta device), or its vision config is one glm4v_fast cannot run.
    """
    inner = _inner_model(model)
    _swap_tower({id(m): m for m in (model, inner)}.values(), inner, vision_model_kwargs, allow_meta=False)
    return model


def patch_glm4v_classes(**vision_model_kwargs):
    """Give every GLM-4V model that transformers builds from now on glm4v_fast's vision tower; returns `unpatch`.

    Wraps `__init__` of transformers' Glm4vModel, Glm4vMoeModel and Glm46VModel (those this transformers has), so
    `*ForConditionalGeneration(config)`, `from_pretrained` (which builds on the meta device and then loads the
    checkpoint into the fast tower by transformers' names) and `from_config` all get the fast tower.
    `unpatch()` restores the original constructors (models already built keep their tower).

    Args:
        **vision_model_kwargs: passed to `VisionModel` (`attn_backend=`, `kernels=`, `token_buckets=`,
            `cuda_graphs=`).
    """
    import transformers

    originals = {}
    for name in SUPPORTED_MODELS:
        cls = getattr(transformers, name, None)
        if cls is None or name in originals:
            continue
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            if not isinstance(getattr(self, "visual", None), FastGlm4vVisionModel):
                _swap_tower([self], self, vision_model_kwargs, allow_meta=True)

        cls.__init__ = __init__
        originals[name] = (cls, original)

    def unpatch() -> None:
        for cls, original in originals.values():
            cls.__init__ = original
        originals.clear()

    return unpatch


__all__ = ["SUPPORTED_MODELS", "FastGlm4vVisionModel", "patch_glm4v", "patch_glm4v_classes"]
