"""The two encoders side by side: ours and transformers' Glm4vVisionModel with identical seeded weights."""
from __future__ import annotations

import importlib.util

import torch

from ..config import VisionConfig


def import_transformers():
    """transformers' (Glm4vVisionConfig, Glm4vVisionModel), imported lazily: only the bench needs them.

    Not installed: a ValueError saying how to install it. Installed but failing to import (a broken or
    too old install, a module shadowing one of its dependencies): a ValueError with the real error.
    """
    if importlib.util.find_spec("transformers") is None:
        raise ValueError("comparing with transformers needs it installed: pip install 'glm4v-fast[test]' "
                         "(or pass --no-hf to time glm4v-fast alone)")
    try:
        from transformers.models.glm4v.modeling_glm4v import Glm4vVisionConfig, Glm4vVisionModel
    except Exception as e:  # noqa: BLE001 - any import-time failure is reported as it is
        raise ValueError(f"transformers is installed but its GLM-4V model failed to import: {type(e).__name__}: {e} "
                         "(pass --no-hf to time glm4v-fast alone)") from e
    return Glm4vVisionConfig, Glm4vVisionModel


@torch.no_grad()
def seeded_init_(model: torch.nn.Module, seed: int, std: float) -> None:
    """Overwrite every parameter from a seeded generator on the model's device: matrices and biases
    N(0, std), norm weights 1 + N(0, 0.1) (non-trivial, so a misplaced norm weight would show)."""
    for name, p in model.named_parameters():
        gen = torch.Generator(device=p.device).manual_seed(seed)
        seed += 1
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        if p.dim() == 1 and not name.endswith("bias"):
            noise = 1.0 + 0.1 * noise
        else:
            noise = std * noise
        p.copy_(noise.to(p.dtype))


def build_models(config: VisionConfig, device: torch.device, dtype: torch.dtype, attn_backend: str = "auto",
                 kernels: str = "auto", with_hf: bool = True, seed: int = 0):
    """(ours, hf or None) on `device` in `dtype`, with identical seeded weights.

    transformers' Glm4vVisionModel (attention "sdpa") is built with `dtype` as the default dtype, as its
    from_pretrained(dtype=...) does, so its rotary inv_freq buffer stays fp32; it is seeded, and its
    state_dict (transformers' keys) is loaded into ours. Without transformers, ours is seeded directly.
    """
    from ..model import VisionModel

    with torch.device("meta"):
        ours = VisionModel(config, attn_backend=attn_backend, kernels=kernels)
    ours = ours.to(dtype).to_empty(device=device).eval()
    ours.resolved()   # raises now, with a clear message, if the kernels or backend cannot run here

    hf = None
    if with_hf:
        hf_config_cls, hf_model_cls = import_transformers()
        hf_dict = config.to_dict()
        hf_dict.pop("model_type")
        hf_config = hf_config_cls(**hf_dict)
        hf_config._attn_implementation = "sdpa"
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                hf = hf_model_cls(hf_config).eval()
        finally:
            torch.set_default_dtype(default)
        seeded_init_(hf, seed, config.initializer_range)
        ours.load_state_dict(hf.state_dict(), strict=True)
    else:
        seeded_init_(ours, seed, config.initializer_range)
    return ours, hf


def hf_embeddings(out) -> torch.Tensor:
    """The merged embeddings from transformers' tower output (a ModelOutput, or a tensor in older releases)."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (the tests' measure), in float64."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()
