"""Precomputed image embeddings for SGLang: glm4v-fast's output (or its server's answer) as SGLang's input.

A GLM-4V model served by SGLang with this plugin takes, per request, one preprocessed item for all its images:

    item = image_item(embeddings, grid_thw)                       # {"format": "precomputed_embedding", ...}
    item = image_item(embeddings, grid_thw, "processor_output")   # {"format": "processor_output", ...}
    prompt = expand_image_tokens("... <|begin_of_image|><|image|><|end_of_image|> ...", grid_thw)
    engine.generate(prompt=prompt, image_data=[item], sampling_params=...)

`embeddings`: one (tokens, D) tensor per image (`encode_images`; `extract_image_embeddings(...,
return_dict=True)` also gives the grids), or them concatenated; `grid_thw`: (images, 3). SGLang does not run
transformers' processor on such an item, so the prompt must already hold each image's placeholder repeated once
per embedding row, as the processor would have written it: `expand_image_tokens` does that.

Over SGLang's HTTP API (`/generate`), the item travels as JSON: `json_item(item)` turns its tensors into lists.
`image_item_from_server_response` reads a `glm4v-fast serve` /v1/embeddings answer (JSON or safetensors).

Videos (`video_data=[item]`): `video_item(embeddings, grid_thw)` and `expand_video_tokens(prompt, grid_thw,
timestamps)`, which writes each video's placeholder as transformers' processor does: per temporal slice,
`<|begin_of_image|>`, the slice's image tokens, `<|end_of_image|>` and the slice's first second.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

FORMATS = ("precomputed_embedding", "processor_output")
IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"


def _grid(grid_thw) -> torch.Tensor:
    grid = torch.as_tensor(np.asarray(grid_thw), dtype=torch.int64)
    if grid.dim() == 1:
        grid = grid[None]
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must be (images, 3) [t, h, w] rows, got shape {tuple(grid.shape)}")
    return grid


def tokens_per_image(grid_thw, merge_size: int = 2) -> list[int]:
    """The number of embedding rows (and prompt placeholders) of each image: t*h*w / merge_size**2."""
    return (_grid(grid_thw).prod(-1) // merge_size**2).tolist()


def _flat_embeddings(embeddings, grid_thw, merge_size: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if grid_thw is None:
        raise ValueError(f"grid_thw is needed: one [t, h, w] row per {what} (extract_{what}_embeddings(..., "
                         "return_dict=True)['grid_thw'], or the server answer's grid_thw)")
    grid = _grid(grid_thw)
    items = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
    items = [torch.as_tensor(e) for e in items]
    if not items or any(e.dim() != 2 for e in items):
        raise ValueError(f"embeddings must be 2-D (tokens, D) tensors, got shapes {[tuple(e.shape) for e in items]}")
    tokens = tokens_per_image(grid, merge_size)
    if len(items) > 1 and [e.shape[0] for e in items] != tokens:
        raise ValueError(f"per-{what} token counts {[e.shape[0] for e in items]} do not match grid_thw "
                         f"{grid.tolist()} (t*h*w/{merge_size**2} = {tokens})")
    flat = torch.cat(items) if len(items) > 1 else items[0]
    if flat.shape[0] != sum(tokens):
        raise ValueError(f"embeddings have {flat.shape[0]} tokens, grid_thw {grid.tolist()} needs {sum(tokens)}")
    return flat.detach().cpu(), grid


def _item(modality: str, embeddings, grid_thw, format: str, merge_size: int) -> dict:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if isinstance(embeddings, dict):                  # extract_*_embeddings(..., return_dict=True)
        grid_thw = embeddings.get("grid_thw") if grid_thw is None else grid_thw
        embeddings = embeddings.get("embeddings")
    flat, grid = _flat_embeddings(embeddings, grid_thw, merge_size, modality)
    if format == "precomputed_embedding":
        return {"format": format, "feature": flat, f"{modality}_grid_thw": grid}
    return {"format": format, "modality": modality, "precomputed_embeddings": flat, f"{modality}_grid_thw": grid}


def image_item(embeddings, grid_thw=None, format: str = "precomputed_embedding", merge_size: int = 2) -> dict:
    """SGLang's preprocessed image item (for `image_data=[item]`) holding precomputed embeddings.

    embeddings: a tensor per image, one concatenated (tokens, D) tensor, or the dict of
    `extract_image_embeddings(..., return_dict=True)` (which brings its grid_thw). Token counts are checked
    against the grids. The embeddings keep their dtype (SGLang casts them to the model's).
    """
    return _item("image", embeddings, grid_thw, format, merge_size)


def video_item(embeddings, grid_thw=None, format: str = "precomputed_embedding", merge_size: int = 2) -> dict:
    """SGLang's preprocessed video item (for `video_data=[item]`): as `image_item`, with video grids
    (`extract_video_embeddings(..., return_dict=True)` gives embeddings, grid_thw and timestamps)."""
    return _item("video", embeddings, grid_thw, format, merge_size)


def expand_image_tokens(prompt: str, grid_thw, merge_size: int = 2, image_token: str = IMAGE_TOKEN) -> str:
    """The prompt with its i-th image placeholder repeated tokens_per_image(grid_thw)[i] times."""
    tokens = tokens_per_image(grid_thw, merge_size)
    parts = re.split(re.escape(image_token), prompt)
    if len(parts) - 1 != len(tokens):
        raise ValueError(f"the prompt has {len(parts) - 1} {image_token} placeholder(s), grid_thw has "
                         f"{len(tokens)} image(s)")
    out = [parts[0]]
    for count, part in zip(tokens, parts[1:]):
        out.append(image_token * count)
        out.append(part)
    return "".join(out)


def expand_video_tokens(prompt: str, grid_thw, timestamps, merge_size: int = 2,
                        video_token: str = VIDEO_TOKEN) -> str:
    """The prompt with its i-th video placeholder written out as transformers' GLM-4V processor does: per temporal
    slice of the video, `<|begin_of_image|>`, h*w/merge_size**2 image tokens, `<|end_of_image|>` and the whole
    seconds of the slice's first frame (`timestamps[i]`: one value per slice)."""
    grid = _grid(grid_thw)
    rows = timestamps.tolist() if hasattr(timestamps, "tolist") else list(timestamps)
    if rows and not isinstance(rows[0], (list, tuple)) and not hasattr(rows[0], "tolist"):
        rows = [rows]                                                    # one video's flat list
    rows = [list(r.tolist() if hasattr(r, "tolist") else r) for r in rows]
    if [len(r) for r in rows] != grid[:, 0].tolist():
        raise ValueError(f"timestamps have {[len(r) for r in rows]} entries per video, grid_thw {grid.tolist()} has "
                         f"{grid[:, 0].tolist()} temporal slices (one time per slice)")
    parts = re.split(re.escape(video_token), prompt)
    if len(parts) - 1 != grid.shape[0]:
        raise ValueError(f"the prompt has {len(parts) - 1} {video_token} placeholder(s), grid_thw has "
                         f"{grid.shape[0]} video(s)")
    out = [parts[0]]
    for (_, h, w), stamps, part in zip(grid.tolist(), rows, parts[1:]):
        tokens = h * w // merge_size**2
        out.extend(f"<|begin_of_image|>{IMAGE_TOKEN * tokens}<|end_of_image|>{int(s)}" for s in stamps)
        out.append(part)
    return "".join(out)


def json_item(item: dict) -> dict:
    """The item with its tensors as (nested) lists, for SGLang's HTTP API; embeddings as float32 values."""
    out = {}
    for key, value in item.items():
        if isinstance(value, torch.Tensor):
            value = value.float() if value.is_floating_point() else value
            value = value.tolist()
        out[key] = value
    return out


def image_item_from_server_response(response, format: str = "precomputed_embedding", merge_size: int = 2) -> dict:
    """SGLang's item from a `glm4v-fast serve` /v1/embeddings answer (an httpx/requests response, its safetensors
    bytes or its parsed JSON) to a request with images."""
    from ..vllm.embeds import embeddings_from_server_response     # a reader of our server's answers; no vLLM

    embeddings, grid = embeddings_from_server_response(response)
    return image_item(embeddings, grid, format=format, merge_size=merge_size)


def video_item_from_server_response(response, format: str = "precomputed_embedding",
                                    merge_size: int = 2) -> tuple[dict, list[list[float]]]:
    """(SGLang's video item, per-video slice timestamps for `expand_video_tokens`) from a `glm4v-fast serve`
    /v1/embeddings answer to a request with videos (JSON or safetensors)."""
    from ..vllm.embeds import video_embeddings_from_server_response       # a reader of our server's answers

    embeddings, grid, timestamps = video_embeddings_from_server_response(response)
    return video_item(embeddings, grid, format=format, merge_size=merge_size), timestamps


def server_request_body(images: Sequence, dtype: str = "float32") -> dict:
    """The JSON body asking `glm4v-fast serve` for these images (PNG/JPEG bytes or base64 strings)."""
    from ..vllm.embeds import server_request_body as body

    return body(images, dtype)
