"""The slow, obvious GLM-4V vision tower: pure PyTorch, transformers' module names and numerics.

Written to read like docs/reference.md §2, not to be fast: per-segment attention in a Python loop, the
position embedding through `F.grid_sample` exactly as transformers does. Tests use it as the oracle the fast
`VisionModel` is held to, and check it against transformers' `Glm4vVisionModel` itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .packing import block_major_positions, check_inputs, rotary_cos_sin, rotary_inv_freq, split_temporal


class RMSNorm(nn.Module):
    """Glm4vRMSNorm: statistics in fp32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """2D rotary over the whole head (NeoX rotate_half layout), math in fp32. x (N, H, D), cos/sin (N, D)."""
    dtype = x.dtype
    x = x.float()
    cos, sin = cos[:, None].float(), sin[:, None].float()
    return (x * cos + rotate_half(x) * sin).to(dtype)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal_patch, patch, patch): one linear map per flattened patch."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = pixel_values.view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        return self.proj(x.to(self.proj.weight.dtype)).view(-1, c.hidden_size)


class Embeddings(nn.Module):
    """The learned 24x24 position table, bicubically resampled to each item's patch grid (docs/reference.md §2.7)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.grid_side = config.num_grid_per_side
        self.position_embedding = nn.Embedding(self.grid_side**2, config.hidden_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, target_hw: torch.Tensor) -> torch.Tensor:
        weight = self.position_embedding.weight
        table = weight.view(self.grid_side, self.grid_side, -1).permute(2, 0, 1)[None].float()
        h_coord, w_coord = positions[:, 0].float(), positions[:, 1].float()
        target_h, target_w = target_hw[:, 0].float(), target_hw[:, 1].float()
        norm_w = ((w_coord + 0.5) / target_w) * 2 - 1
        norm_h = ((h_coord + 0.5) / target_h) * 2 - 1
        grid = torch.stack((norm_w, norm_h), dim=-1)[None, :, None, :]      # x (width) first
        sampled = F.grid_sample(table, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return x + sampled[0, :, :, 0].T.to(weight.dtype)


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scale = self.head_dim**-0.5
        outputs = []
        for qs, ks, vs in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens)):
            # Eager attention as transformers computes it: fp32 softmax, cast back before @ v.
            qs, ks, vs = (t.transpose(0, 1) for t in (qs, ks, vs))          # (H, L, D)
            scores = torch.matmul(qs, ks.transpose(1, 2)) * scale
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qs.dtype)
            outputs.append(torch.matmul(probs, vs).transpose(0, 1))
        return self.proj(torch.cat(outputs, 0).reshape(n, -1))


class Mlp(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        # The in-block MLP is out_hidden_size wide (docs/reference.md §2.8), not intermediate_size.
        self.mlp = Mlp(config.hidden_size, config.out_hidden_size)

    def forward(self, x, seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, context_dim, bias=False)
        self.up_proj = nn.Linear(dim, context_dim, bias=False)
        self.down_proj = nn.Linear(context_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))       # exact (erf) GELU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReferenceVisionModel(nn.Module):
    """GLM-4V vision tower, the obvious way. Same state_dict keys and call as the fast VisionModel."""

    def __init__(self, config: VisionConfig | None = None):
        super().__init__()
        self.config = config = config or VisionConfig()
        self.embeddings = Embeddings(config)
        self.patch_embed = PatchEmbed(config)
        self.post_conv_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.post_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        m = config.spatial_merge_size
        self.downsample = nn.Conv2d(config.hidden_size, config.out_hidden_size, kernel_size=m, stride=m)
        self.merger = PatchMerger(config.out_hidden_size, config.intermediate_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def forward_features(self, pixel_values: torch.Tensor, grid_thw) -> tuple[torch.Tensor, torch.Tensor]:
        """(downsample output, merger output), both (N/4, out_hidden_size): transformers'
        last_hidden_state and pooler_output."""
        c = self.config
        grid = check_inputs(pixel_values, grid_thw, c)
        segments = split_temporal(grid)                   # videos: one (1, h, w) segment per temporal slice
        seqlens = [int(h * w) for _, h, w in segments.tolist()]
        positions = torch.cat([torch.from_numpy(block_major_positions(int(h), int(w), c.spatial_merge_size))
                               for _, h, w in segments.tolist()]).to(self.device)
        target_hw = torch.repeat_interleave(segments[:, 1:], torch.tensor(seqlens), dim=0).to(self.device)
        cos, sin = rotary_cos_sin(positions, rotary_inv_freq(c.head_dim, c.rope_theta))

        x = self.patch_embed(pixel_values.to(self.device))
        x = self.post_conv_layernorm(x)
        x = self.embeddings(x, positions, target_hw)
        for block in self.blocks:
            x = block(x, seqlens, cos, sin)
        x = self.post_layernorm(x)
        m = c.spatial_merge_size
        x = x.view(-1, m, m, c.hidden_size).permute(0, 3, 1, 2)     # each run of m*m tokens is one block
        features = self.downsample(x).view(-1, c.out_hidden_size)
        return features, self.merger(features)

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """Merged embeddings (sum(t*h*w)/4, out_hidden_size) for a packed mix of images and videos."""
        return self.forward_features(pixel_values, grid_thw)[1]

    def _split(self, embeddings: torch.Tensor, grid_thw) -> tuple[torch.Tensor, ...]:
        grid = torch.as_tensor(grid_thw).reshape(-1, 3).cpu()
        return torch.split(embeddings, (grid.prod(-1) // self.config.merge_unit).tolist())

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw) -> tuple[torch.Tensor, ...]:
        return self._split(self(pixel_values.to(self.dtype), image_grid_thw), image_grid_thw)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw) -> tuple[torch.Tensor, ...]:
        return self._split(self(pixel_values_videos.to(self.dtype), video_grid_thw), video_grid_thw)
