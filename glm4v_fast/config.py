"""VisionConfig: the GLM-4V vision tower's configuration, with transformers' field names.

Defaults are GLM-4.1V-9B's (Glm4vVisionConfig). GLM-4.5V differs only in `intermediate_size` (10944), which
sizes the merger's SwiGLU; the in-block MLP is `out_hidden_size` wide (docs/reference.md §2.8).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .validation import boolean, positive_int, positive_number

SUPPORTED_ACTIVATIONS = ("silu",)

# transformers' attribute_map aliases (T5) and keys of the full GLM-4V config that hold the vision config.
_ALIASES = {"num_hidden_layers": "depth", "num_attention_heads": "num_heads"}
_VISION_KEYS = ("vision_config",)


def _positive_size(name: str, value: Any) -> int:
    if isinstance(value, (list, tuple)):
        # HF allows image_size/patch_size as a pair; the tower is square-only.
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"VisionConfig.{name} must be a positive integer or a square pair, got {value!r}")
        value = value[0]
    return positive_int(value, f"VisionConfig.{name}")


@dataclass
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_heads: int = 12
    in_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    rms_norm_eps: float = 1e-5
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 4096
    intermediate_size: int = 13696
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    model_type: str = field(default="glm4v_vision")

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_grid_per_side(self) -> int:
        """Side of the learned position-embedding grid (24 for 336 / 14)."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Width of one pixel_values row: C * T * P * P (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("depth", "hidden_size", "num_heads", "in_channels", "image_size", "patch_size",
                     "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "intermediate_size"):
            setattr(self, name, _positive_size(name, getattr(self, name)))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VisionConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.head_dim % 4:
            # The 2D rotary splits each half of the head between the h and w axes.
            raise ValueError(f"VisionConfig head_dim = hidden_size / num_heads = {self.head_dim} must be a multiple of 4")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"VisionConfig.hidden_act {self.hidden_act!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")
        for name in ("rms_norm_eps", "rope_theta"):
            setattr(self, name, positive_number(getattr(self, name), f"VisionConfig.{name}"))
        self.attention_bias = boolean(self.attention_bias, "VisionConfig.attention_bias")
        if not isinstance(self.attention_dropout, (int, float)) or not 0 <= self.attention_dropout < 1:
            raise ValueError(f"VisionConfig.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        """Build from an HF vision_config dict (or a full GLM-4V config holding one). Unknown keys are ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"VisionConfig.from_dict expects a dict, got {type(d).__name__}")
        for key in _VISION_KEYS:
            if isinstance(d.get(key), dict):
                d = d[key]
                break
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            key = _ALIASES.get(key, key)
            if key in known and key != "model_type":
                kwargs[key] = value
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        if isinstance(rope, dict):
            rope_type = rope.get("rope_type", rope.get("type", "axial"))
            if rope_type not in ("axial", "default"):
                raise ValueError(f"VisionConfig.rope_parameters: rope_type {rope_type!r} is not supported (only 'axial')")
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "VisionConfig":
        """Read config.json from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json at {path!r}")
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The HF Glm4vVisionConfig dict (transformers' Glm4vVisionModel.from_pretrained reads it)."""
        d = dataclasses.asdict(self)
        d.pop("rope_theta")
        d["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        d["model_type"] = "glm4v_vision"
        return d

    def to_json_file(self, file: str | os.PathLike) -> None:
        with open(file, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
