"""Precomputed image embeddings for vLLM: glm4v-fast's output (or its server's answer) as vLLM's inputs.

A GLM-4V model served with the plugin and `enable_mm_embeds=True` (`--enable-mm-embeds`) takes, per prompt,
`multi_modal_data={"image": {"image_embeds": (tokens, D), "image_grid_thw": (images, 3)}}`, the images'
embeddings concatenated in order (Qwen2-VL's layout, which GLM-4V shares); the grid sizes the placeholders
(t*h*w / merge**2 tokens per image). Offline:

    emb = gf.encode_images(["a.jpg", "b.jpg"], model=model, processor=processor)         # or the server's answer
    llm.generate({"prompt": prompt, "multi_modal_data": embeds_to_multi_modal_data(emb, grids)})

OpenAI chat API: `image_embeds_content_part(emb, grid)` is a content part
`{"type": "image_embeds", "image_embeds": {"image_embeds": <b64 .npy>, "image_grid_thw": <b64 .npy>}}`.
Tensors travel as NumPy .npy files (vLLM reads them without unpickling); bfloat16 goes as float32, exactly.
"""
from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
import torch


def _grid_tensor(grid_thw) -> torch.Tensor:
    grid = torch.as_tensor(np.asarray(grid_thw), dtype=torch.int64)
    if grid.dim() == 1:
        grid = grid[None]
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must be (images, 3) [t, h, w] rows, got shape {tuple(grid.shape)}")
    return grid


def embeds_to_multi_modal_data(embeddings, grid_thw, modality: str = "image", merge_size: int = 2) -> dict:
    """`multi_modal_data` for vLLM from per-image embeddings (a tensor per image, or one concatenated tensor).

    Checks that each image's token count is t*h*w / merge_size**2 of its grid row.
    """
    if modality != "image":
        raise ValueError(f"modality must be 'image' (video embeddings are not supported), got {modality!r}")
    grid = _grid_tensor(grid_thw)
    items = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
    items = [torch.as_tensor(e) for e in items]
    if any(e.dim() != 2 for e in items):
        raise ValueError(f"embeddings must be 2-D (tokens, D), got shapes {[tuple(e.shape) for e in items]}")
    flat = torch.cat(items) if len(items) > 1 else items[0]
    tokens = (grid.prod(-1) // merge_size**2).tolist()
    if len(items) > 1 and [e.shape[0] for e in items] != tokens:
        raise ValueError(f"per-image token counts {[e.shape[0] for e in items]} do not match grid_thw "
                         f"{grid.tolist()} (t*h*w/{merge_size**2} = {tokens})")
    if flat.shape[0] != sum(tokens):
        raise ValueError(f"embeddings have {flat.shape[0]} tokens, grid_thw {grid.tolist()} needs {sum(tokens)}")
    return {"image": {"image_embeds": flat, "image_grid_thw": grid}}


def _npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_embeds_content_part(embedding, grid_thw) -> dict:
    """One image as an OpenAI chat content part for a vLLM server started with `--enable-mm-embeds`."""
    data = embeds_to_multi_modal_data([embedding], grid_thw)["image"]
    if data["image_grid_thw"].shape[0] != 1:
        raise ValueError("image_embeds_content_part takes one image: one grid_thw row")
    emb = data["image_embeds"].detach().to("cpu", torch.float32).numpy()
    return {"type": "image_embeds",
            "image_embeds": {"image_embeds": _npy_b64(emb), "image_grid_thw": _npy_b64(data["image_grid_thw"][0].numpy())}}


def embeddings_from_server_response(response) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per-image embeddings, grid_thw (images, 3)) from a `glm4v-fast serve` /v1/embeddings answer.

    `response`: an httpx/requests response, its bytes (a safetensors answer), or its parsed JSON dict.
    """
    content_type, body = "", response
    if hasattr(response, "content") and hasattr(response, "headers"):
        content_type, body = response.headers.get("content-type", ""), response.content
    if isinstance(body, (bytes, bytearray)) and (content_type.startswith("application/vnd.safetensors")
                                                 or not content_type):
        from safetensors.torch import load

        tensors = load(bytes(body))
        if "grid_thw" not in tensors:
            raise ValueError("the safetensors answer has no 'grid_thw' tensor (an answer without images?)")
        grid = tensors["grid_thw"].to(torch.int64)
        return [tensors[f"embedding.{i}"] for i in range(grid.shape[0])], grid
    if isinstance(body, (bytes, bytearray)):
        import json

        body = json.loads(body)
    if not isinstance(body, dict) or "data" not in body:
        raise ValueError("not a /v1/embeddings answer: expected a safetensors body or JSON with 'data'")
    from ...serving import embeddings_from_response

    items = sorted(body["data"], key=lambda item: item["index"])
    embs = [torch.from_numpy(np.ascontiguousarray(embeddings_from_response(item))) for item in items]
    return embs, torch.tensor([item["grid_thw"] for item in items], dtype=torch.int64)


def server_request_body(images: Sequence, dtype: str = "float32") -> dict:
    """The JSON body asking `glm4v-fast serve` for these images (PNG/JPEG bytes or base64 strings)."""
    encoded = [img if isinstance(img, str) else base64.b64encode(bytes(img)).decode("ascii") for img in images]
    return {"images": encoded, "dtype": dtype}
