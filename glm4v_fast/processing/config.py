"""Processor configs on disk: transformers' ``preprocessor_config.json`` / ``video_preprocessor_config.json``
(or the ``processor_config.json`` of transformers 5 that nests both), read and written.

transformers records no backend in these files (``AutoImageProcessor`` picks torchvision when it is installed),
so a config without one means the torchvision backend. The choice is written under :data:`BACKEND_KEY`, a key
transformers keeps as a plain attribute and otherwise ignores (a key named ``backend`` would break its loading:
that is a read-only property there).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

IMAGE_CONFIG_NAME = "preprocessor_config.json"
VIDEO_CONFIG_NAME = "video_preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"  # transformers 5 may nest both configs in this file
BACKEND_KEY = "glm4v_fast_backend"

#: Keys of the image config, and of the video config with the processor's argument each one sets.
IMAGE_KEYS = ("size", "min_pixels", "max_pixels", "resample", "do_resize", "do_rescale", "rescale_factor",
              "do_normalize", "image_mean", "image_std", "do_convert_rgb", "patch_size", "temporal_patch_size",
              "merge_size")
VIDEO_KEYS = {"size": "video_size", "min_pixels": "video_min_pixels", "max_pixels": "video_max_pixels",
              "fps": "fps", "max_duration": "max_duration", "do_sample_frames": "do_sample_frames"}


def options_from_dicts(image_config: Mapping[str, Any], video_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """VisionProcessor arguments from the two configs' contents. Unknown keys are ignored."""
    if not isinstance(image_config, Mapping):
        raise ValueError(f"image processor config must be a JSON object, got {type(image_config).__name__}")
    options = {k: image_config[k] for k in IMAGE_KEYS if image_config.get(k) is not None}
    if image_config.get(BACKEND_KEY) is not None:
        options["backend"] = image_config[BACKEND_KEY]
    if video_config is not None:
        if not isinstance(video_config, Mapping):
            raise ValueError(f"video processor config must be a JSON object, got {type(video_config).__name__}")
        for src, dst in VIDEO_KEYS.items():
            if video_config.get(src) is not None:
                options[dst] = video_config[src]
    return options


def read_configs(path: str | os.PathLike) -> tuple[Any, Any]:
    """(image config, video config or None) from a directory or a ``preprocessor_config.json`` path.

    Raises:
        FileNotFoundError: no such directory or no processor config in it.
        ValueError: invalid JSON.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        directory, image_file = os.path.dirname(path), path
    elif os.path.isdir(path):
        directory, image_file = path, os.path.join(path, IMAGE_CONFIG_NAME)
    else:
        raise FileNotFoundError(f"no such processor directory or file: {path!r}")
    video_file = os.path.join(directory, VIDEO_CONFIG_NAME)
    video_config = read_json(video_file) if os.path.isfile(video_file) else None
    nested_file = os.path.join(directory, PROCESSOR_CONFIG_NAME)
    nested = read_json(nested_file) if os.path.isfile(nested_file) else None
    if video_config is None and isinstance(nested, Mapping) and isinstance(nested.get("video_processor"), Mapping):
        # A checkpoint may hold transformers 4's preprocessor_config.json beside transformers 5's nested file:
        # the video options are then only in the latter.
        video_config = nested["video_processor"]
    if os.path.isfile(image_file):
        return read_json(image_file), video_config
    if nested is not None:
        if not isinstance(nested, Mapping) or not isinstance(nested.get("image_processor"), Mapping):
            raise FileNotFoundError(f"{directory!r} has no {IMAGE_CONFIG_NAME} and its "
                                    f"{PROCESSOR_CONFIG_NAME} has no image_processor entry")
        return nested["image_processor"], video_config
    raise FileNotFoundError(f"{IMAGE_CONFIG_NAME} not found in {directory!r}")


def write_configs(directory: str | os.PathLike, image_config: Mapping[str, Any],
                  video_config: Mapping[str, Any]) -> None:
    """Write both configs into ``directory`` (created when missing)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for name, config in ((IMAGE_CONFIG_NAME, image_config), (VIDEO_CONFIG_NAME, video_config)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path!r} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path!r} is not UTF-8 text: {exc}") from exc


__all__ = ["IMAGE_CONFIG_NAME", "VIDEO_CONFIG_NAME", "PROCESSOR_CONFIG_NAME", "BACKEND_KEY", "options_from_dicts",
           "read_configs", "write_configs", "read_json"]
