"""Checkpoints: read the vision tower out of GLM-4V checkpoints, write transformers-loadable ones.

Reads safetensors only (single file or sharded with `model.safetensors.index.json`), tensor by tensor, so
a full GLM-4.1V/4.5V/4.6V checkpoint's text-model tensors are never loaded. Pickled weights (`*.bin`,
`*.pt`) are refused: unpickling can execute code from the file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

from .config import VisionConfig

# Where released checkpoints and transformers' model classes keep the tower (docs/reference.md §3).
VISION_PREFIXES = ("model.visual.", "visual.", "vision_tower.", "")
# Non-persistent buffers that some exporters still wrote; they carry no weights.
IGNORED_SUFFIXES = ("rotary_pos_emb.inv_freq", "rotary_pos_emb.original_inv_freq", "embeddings.position_ids")
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _safetensors_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint dir and, when sharded, its key -> file map."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must be an object")
        files = sorted(set(weight_map.values()))
        for name in files:
            if os.path.basename(name) != name or not name.endswith(".safetensors"):
                raise ValueError(f"{index}: shard name {name!r} is not a safetensors file in the checkpoint dir")
            if not os.path.exists(os.path.join(path, name)):
                raise FileNotFoundError(f"{index} names shard {name!r}, which is missing from {path}")
        return [os.path.join(path, n) for n in files], weight_map
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        pickled = sorted(n for n in os.listdir(path) if n.endswith(PICKLED_SUFFIXES))
        if pickled:
            raise ValueError(f"{path} holds only pickled weights ({', '.join(pickled)}); glm4v-fast does not unpickle "
                             "checkpoints (unpickling can run code). Convert them to safetensors first.")
        raise ValueError(f"{path} has no weights: no *.safetensors file and no {INDEX_FILE}")
    return files, None


def _hub_hint(path: str) -> str:
    """For a missing path that reads like a Hugging Face Hub id ("org/name"): how to get a local copy."""
    parts = path.split("/")
    if len(parts) != 2 or not all(parts) or path.startswith(("~", ".")) or os.path.isabs(path):
        return ""
    return ("; glm4v-fast reads local folders only and does not download from the Hugging Face Hub: download it "
            f"first (pip install huggingface_hub; hf download {path} --local-dir {parts[1]}), then pass the folder "
            f"{parts[1]!r}")


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
# A tensor every GLM-4V tower has, under any of VISION_PREFIXES: its dtype is the tower's stored dtype.
_PROBE_KEY = "blocks.0.attn.qkv.weight"


def stored_dtype(path) -> torch.dtype | None:
    """The dtype a checkpoint stores its vision tower in (from a safetensors header; else config.json's
    `dtype` / `torch_dtype`), without reading any tensor; None when neither says (the loader then reports what
    is wrong with the checkpoint)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        files, weight_map = _safetensors_files(path)
        if weight_map is not None:
            located = [(k, os.path.join(path, f)) for k, f in weight_map.items() if k.endswith(_PROBE_KEY)]
        else:
            located = []
            for file in files:
                with safe_open(file, framework="pt") as f:
                    located += [(k, file) for k in f.keys() if k.endswith(_PROBE_KEY)]
        for key, file in located:
            if key[:-len(_PROBE_KEY)] in VISION_PREFIXES:
                with safe_open(file, framework="pt") as f:
                    return _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
    except (OSError, ValueError, SafetensorError):
        pass
    return _config_dtype(path)


def _config_dtype(path: str) -> torch.dtype | None:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for section in (config.get("vision_config"), config):
        if isinstance(section, dict):
            name = section.get("dtype") or section.get("torch_dtype")
            dtype = getattr(torch, name, None) if isinstance(name, str) else None
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                return dtype
    return None


def _detect_prefix(keys: list[str], expected: dict[str, tuple[int, ...]]) -> str:
    for prefix in VISION_PREFIXES:
        if any(k[len(prefix):] in expected for k in keys if k.startswith(prefix)):
            return prefix
    raise ValueError("the checkpoint holds no GLM-4V vision tensors (looked for keys like "
                     f"'model.visual.blocks.0.attn.qkv.weight' or 'blocks.0.attn.qkv.weight'; found e.g. {keys[:3]})")


def load_vision_checkpoint(path, expected_shapes: Callable[[VisionConfig], dict[str, tuple[int, ...]]]
                           ) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """(config, vision state_dict with transformers' tower keys) from a checkpoint directory.

    `expected_shapes(config)` gives the tower's keys and shapes; anything missing, extra (under the vision
    prefix) or mis-shaped raises ValueError naming the tensors.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist{_hub_hint(path)}")
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} is not a directory (expected config.json + *.safetensors)")
    config = VisionConfig.from_pretrained(path)
    expected = expected_shapes(config)
    files, weight_map = _safetensors_files(path)

    # key -> file, without reading any tensor data
    located: dict[str, str] = {}
    if weight_map is not None:
        located = {k: os.path.join(path, f) for k, f in weight_map.items()}
    else:
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    located.update({k: file for k in f.keys()})
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None

    prefix = _detect_prefix(list(located), expected)
    vision = {k[len(prefix):]: file for k, file in located.items()
              if k.startswith(prefix) and not k[len(prefix):].endswith(IGNORED_SUFFIXES)}
    # With a prefix (a full checkpoint) the text model's keys are ignored; every key under the prefix, or
    # every key at all for a vision-only checkpoint, must belong to the tower.
    missing = sorted(set(expected) - set(vision))
    unexpected = sorted(set(vision) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(prefix + k for k in missing[:10])}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(prefix + k for k in unexpected[:10])}"
                         + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
        raise ValueError(f"{path}: the vision weights do not match the config ({'; '.join(parts)})")

    state_dict: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for key, file in vision.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    shape = tuple(f.get_slice(prefix + key).get_shape())
                    if shape != expected[key]:
                        raise ValueError(f"{path}: tensor {prefix + key} has shape {shape}, the config expects "
                                         f"{expected[key]}")
                    state_dict[key] = f.get_tensor(prefix + key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    bad = sorted(k for k, v in state_dict.items() if not v.is_floating_point())
    if bad:
        raise ValueError(f"{path}: non-floating-point vision tensors: {', '.join(bad[:5])}")
    return config, state_dict


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file through a temporary file in the same folder (a crash never leaves a half-written
    file), with the permissions the user's umask gives a new file: safetensors (0.8) writes its files mode 0600,
    which a server or container running as another user cannot read."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)      # set and restore: the portable way, briefly racy with other threads
    os.umask(mask)
    return mask


def save_vision_checkpoint(model: torch.nn.Module, path) -> None:
    """Write config.json (a Glm4vVisionConfig) and model.safetensors with transformers' keys."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = ["Glm4vVisionModel"]
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    # clone(): views of stacked weights (gate/up) share storage, which safetensors refuses to write.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_safetensors(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})


def copy_named_tensors(module: torch.nn.Module, weights, source_prefix: str = "model.visual.") -> set[str]:
    """Copy (name, tensor) pairs into `module`'s parameters of the same names; return the names copied.

    The serving engines hand the tower its checkpoint tensors by transformers' names (without `source_prefix`,
    which only names them in errors). A name the module does not have, or a tensor of another shape, raises a
    ValueError naming it: an engine that skips unknown names silently would otherwise serve random weights.
    """
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        param = params.get(name)
        if param is None:
            raise ValueError(f"glm4v-fast's vision tower has no parameter {name!r} (from the checkpoint's "
                             f"{source_prefix}{name})")
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {source_prefix}{name} has shape {tuple(tensor.shape)}, the "
                             f"tower expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    return loaded
