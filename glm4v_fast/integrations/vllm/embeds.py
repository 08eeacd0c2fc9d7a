"""Precomputed image and video embeddings for vLLM: glm4v-fast's output (or its server's answer) as vLLM's inputs.

A GLM-4V model served with the plugin and `enable_mm_embeds=True` (`--enable-mm-embeds`) takes, per prompt,
`multi_modal_data={"image": {"image_embeds": (tokens, D), "image_grid_thw": (images, 3)}}`, the images'
embeddings concatenated in order (Qwen2-VL's layout, which GLM-4V shares); the grid sizes the placeholders
(t*h*w / merge**2 tokens per image). A video also needs its slices' timestamps (GLM-4V's video prompt shows them):
`{"video": {"video_embeds", "video_grid_thw", "timestamps": (videos, t)}}`. Offline:

    emb = gf.encode_images(["a.jpg", "b.jpg"], model=model, processor=processor)         # or the server's answer
    llm.generate({"prompt": prompt, "multi_modal_data": embeds_to_multi_modal_data(emb, grids)})

OpenAI chat API: `image_embeds_content_part(emb, grid)` is a content part
`{"type": "image_embeds", "image_embeds": {"image_embeds": <b64 .npy>, "image_grid_thw": <b64 .npy>}}`;
`video_embeds_content_part(emb, grid, timestamps)` likewise, with the timestamps as a JSON list.
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


def _timestamp_rows(timestamps, grid: torch.Tensor) -> list[list[float]]:
    """One list of floats per video, one entry per temporal slice of its grid row."""
    if timestamps is None:
        raise ValueError("video embeddings need timestamps: one list per video of the seconds of each temporal "
                         "slice's first frame (extract_video_embeddings(..., return_dict=True)['timestamps'], or "
                         "the server answer's 'timestamps'); GLM-4V writes them into the video prompt")
    rows = timestamps.tolist() if isinstance(timestamps, (torch.Tensor, np.ndarray)) else list(timestamps)
    if rows and not isinstance(rows[0], (list, tuple, np.ndarray, torch.Tensor)):
        rows = [rows]                                                   # one video's flat list
    rows = [[float(s) for s in (r.tolist() if hasattr(r, "tolist") else r)] for r in rows]
    slices = grid[:, 0].tolist()
    if [len(r) for r in rows] != slices:
        raise ValueError(f"timestamps have {[len(r) for r in rows]} entries per video, grid_thw {grid.tolist()} "
                         f"has {slices} temporal slices (one time per slice)")
    return rows


def embeds_to_multi_modal_data(embeddings, grid_thw, modality: str = "image", merge_size: int = 2,
                               timestamps=None) -> dict:
    """`multi_modal_data` for vLLM from per-item embeddings (a tensor per image or video, or one concatenated tensor).

    Checks that each item's token count is t*h*w / merge_size**2 of its grid row. Videos (`modality="video"`) need
    `timestamps`: per video, the seconds of each temporal slice's first frame (GLM-4V's video prompt shows them).
    """
    if modality not in ("image", "video"):
        raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
    if modality == "image" and timestamps is not None:
        raise ValueError("timestamps are for videos (modality='video'); images have none")
    grid = _grid_tensor(grid_thw)
    items = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
    items = [torch.as_tensor(e) for e in items]
    if any(e.dim() != 2 for e in items):
        raise ValueError(f"embeddings must be 2-D (tokens, D), got shapes {[tuple(e.shape) for e in items]}")
    flat = torch.cat(items) if len(items) > 1 else items[0]
    tokens = (grid.prod(-1) // merge_size**2).tolist()
    if len(items) > 1 and [e.shape[0] for e in items] != tokens:
        raise ValueError(f"per-{modality} token counts {[e.shape[0] for e in items]} do not match grid_thw "
                         f"{grid.tolist()} (t*h*w/{merge_size**2} = {tokens})")
    if flat.shape[0] != sum(tokens):
        raise ValueError(f"embeddings have {flat.shape[0]} tokens, grid_thw {grid.tolist()} needs {sum(tokens)}")
    if modality == "image":
        return {"image": {"image_embeds": flat, "image_grid_thw": grid}}
    rows = _timestamp_rows(timestamps, grid)
    stamps = (torch.tensor(rows, dtype=torch.float64) if len({len(r) for r in rows}) == 1
              else [torch.tensor(r, dtype=torch.float64) for r in rows])
    return {"video": {"video_embeds": flat, "video_grid_thw": grid, "timestamps": stamps}}


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


def video_embeds_content_part(embedding, grid_thw, timestamps) -> dict:
    """One video as an OpenAI chat content part (`video_embeds`) for a vLLM server started with `--enable-mm-embeds`:
    its embedding and grid as base64 .npy, its slices' timestamps as a JSON list (`timestamps` of this video)."""
    data = embeds_to_multi_modal_data([embedding], grid_thw, modality="video", timestamps=timestamps)["video"]
    if data["video_grid_thw"].shape[0] != 1:
        raise ValueError("video_embeds_content_part takes one video: one grid_thw row")
    emb = data["video_embeds"].detach().to("cpu", torch.float32).numpy()
    return {"type": "video_embeds",
            "video_embeds": {"video_embeds": _npy_b64(emb),
                             "video_grid_thw": _npy_b64(data["video_grid_thw"][0].numpy()),
                             "timestamps": data["timestamps"][0].tolist()}}


def _answer_body(response) -> bytes | dict:
    """The safetensors bytes or the parsed JSON of a `glm4v-fast serve` /v1/embeddings answer.

    An HTTP response with an error status raises a ValueError naming the status and the server's message."""
    content_type, body = "", response
    if hasattr(response, "content") and hasattr(response, "headers"):
        content_type, body = response.headers.get("content-type", ""), response.content
        status = getattr(response, "status_code", 200)
        if not 200 <= status < 300:
            raise ValueError(f"glm4v-fast serve answered {status}: {_error_message(body)}"
                             + (" (send the server's key: headers={'Authorization': 'Bearer <key>'})"
                                if status == 401 else ""))
    if isinstance(body, (bytes, bytearray)) and (content_type.startswith("application/vnd.safetensors")
                                                 or not content_type):
        return bytes(body)
    if isinstance(body, (bytes, bytearray)):
        import json

        body = json.loads(body)
    if not isinstance(body, dict) or "data" not in body:
        raise ValueError("not a /v1/embeddings answer: expected a safetensors body or JSON with 'data'")
    return body


def _error_message(body: bytes) -> str:
    """The server's JSON `error.message`, else the start of the body."""
    import json

    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except (ValueError, AttributeError):
        pass
    return bytes(body[:500]).decode("utf-8", "replace") or "(empty body)"


def _json_items(items: list) -> tuple[list[torch.Tensor], torch.Tensor]:
    from ...serving import embeddings_from_response

    items = sorted(items, key=lambda item: item["index"])
    embs = [torch.from_numpy(np.ascontiguousarray(embeddings_from_response(item))) for item in items]
    return embs, torch.tensor([item["grid_thw"] for item in items], dtype=torch.int64).reshape(-1, 3)


def embeddings_from_server_response(response) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per-image embeddings, grid_thw (images, 3)) from a `glm4v-fast serve` /v1/embeddings answer.

    `response`: an httpx/requests response, its bytes (a safetensors answer), or its parsed JSON dict.
    """
    body = _answer_body(response)
    if isinstance(body, bytes):
        from safetensors.torch import load

        tensors = load(body)
        if "grid_thw" not in tensors:
            raise ValueError("the safetensors answer has no 'grid_thw' tensor (an answer without images?)")
        grid = tensors["grid_thw"].to(torch.int64)
        return [tensors[f"embedding.{i}"] for i in range(grid.shape[0])], grid
    return _json_items(body["data"])


def _safetensors_metadata(body: bytes) -> dict:
    """The `__metadata__` of a safetensors file (an 8-byte little-endian header length, then the JSON header)."""
    import json

    size = int.from_bytes(body[:8], "little")
    return json.loads(body[8:8 + size]).get("__metadata__") or {}


def video_embeddings_from_server_response(response) -> tuple[list[torch.Tensor], torch.Tensor, list[list[float]]]:
    """(per-video embeddings, video grid_thw (videos, 3), per-video slice timestamps) from a `glm4v-fast serve`
    /v1/embeddings answer to a request with videos: `embeds_to_multi_modal_data(embs, grid, "video",
    timestamps=stamps)` makes vLLM's input of them. `response` as for `embeddings_from_server_response`."""
    import json

    body = _answer_body(response)
    if isinstance(body, bytes):
        from safetensors.torch import load

        tensors, metadata = load(body), _safetensors_metadata(body)
        if "video_grid_thw" not in tensors or "video_timestamps" not in metadata:
            raise ValueError("the safetensors answer has no videos ('video_grid_thw' and the 'video_timestamps' "
                             "metadata are missing)")
        grid = tensors["video_grid_thw"].to(torch.int64)
        embs = [tensors[f"video_embedding.{j}"] for j in range(grid.shape[0])]
        return embs, grid, [[float(s) for s in row] for row in json.loads(metadata["video_timestamps"])]
    if not body.get("videos"):
        raise ValueError("the answer has no 'videos' (the request had no videos?)")
    items = sorted(body["videos"], key=lambda item: item["index"])
    embs, grid = _json_items(items)
    return embs, grid, [[float(s) for s in item["timestamps"]] for item in items]


def server_request_body(images: Sequence, dtype: str = "float32") -> dict:
    """The JSON body asking `glm4v-fast serve` for these images (PNG/JPEG bytes or base64 strings)."""
    encoded = [img if isinstance(img, str) else base64.b64encode(bytes(img)).decode("ascii") for img in images]
    return {"images": encoded, "dtype": dtype}
