"""Tiny GLM-4V configurations and transformers oracles shared by the tests."""
from __future__ import annotations

import base64
import io
import socket

import numpy as np
import torch
from PIL import Image

import glm4v_fast as gf

# Two tiny towers: different head dims, grid sides and merger widths; one with the qkv bias.
TINY = dict(depth=2, hidden_size=64, num_heads=4, out_hidden_size=48, intermediate_size=80, image_size=56,
            patch_size=14, attention_bias=False)
TINY_BIAS = dict(depth=3, hidden_size=96, num_heads=3, out_hidden_size=64, intermediate_size=72, image_size=84,
                 patch_size=14, attention_bias=True)
CONFIGS = {"tiny": TINY, "tiny_bias": TINY_BIAS}

# Several images of different sizes (in patches, merge-size multiples) packed together.
IMAGE_GRIDS = [[1, 4, 6], [1, 2, 2], [1, 10, 8], [1, 6, 4], [1, 2, 2]]
VIDEO_GRIDS = [[3, 4, 4], [2, 2, 6]]


def hf_vision_model(kwargs: dict, attn: str = "sdpa", std: float = 0.2, seed: int = 0):
    """transformers' Glm4vVisionModel with random weights large enough to make every term matter."""
    from transformers.models.glm4v.modeling_glm4v import Glm4vVisionConfig, Glm4vVisionModel

    torch.manual_seed(seed)
    config = Glm4vVisionConfig(**kwargs)
    config._attn_implementation = attn
    model = Glm4vVisionModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def random_inputs(grids, patch_dim: int = 1176, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids, dtype=torch.int64)
    return torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen), grid


def split_video_grid(grid: torch.Tensor) -> torch.Tensor:
    """What transformers' get_video_features does before calling the tower: one (1, h, w) row per slice."""
    hw = torch.repeat_interleave(grid[:, 1:], grid[:, 0], dim=0)
    return torch.cat([hw.new_ones(hw.shape[0], 1), hw], 1)


def rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64; tensors, numpy arrays or nested lists."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_config(name: str = "tiny") -> gf.VisionConfig:
    return gf.VisionConfig(**CONFIGS[name])


def save_tiny_checkpoint(path, name: str = "tiny", seed: int = 0, std: float = 0.2):
    """Write a tiny VisionModel checkpoint; weights wider than the 0.02 init so that every layer visibly matters."""
    model = gf.VisionModel(tiny_config(name))
    model.reset_parameters(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(path)
    return path


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A random RGB image of width x height, encoded as PNG."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (tests serve on loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
