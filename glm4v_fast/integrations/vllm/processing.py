"""The plugin's multimodal processing: vLLM's GLM-4V processing that also takes precomputed embeddings.

Images: vLLM 0.32/0.33's GLM-4V data parser does not accept `{"image_embeds", "image_grid_thw"}`; GLM-4V lays its
fields out as Qwen2-VL does, so the parser here extends Qwen2-VL's, which does (with `enable_mm_embeds=True`). From
0.34 on, vLLM's GLM-4V has its own such parser (`Glm4vMultiModalDataParser`), which this one then extends. Either
way it gets vLLM's `allow_missing_mm_embeddings` (an EC consumer's requests carry the grids, not the embeddings).

Videos: GLM-4V's video prompt is, per temporal slice, `<|begin_of_image|>` + the slice's tokens +
`<|end_of_image|>` + the slice's time, which vLLM computes from the frames' metadata; an embeddings item has no
frames, so it must carry the times: `{"video_embeds", "video_grid_thw", "timestamps"}`, `timestamps` one row per
video with one entry (seconds of the slice's first frame) per temporal slice, as glm4v-fast's pipeline and server
return them. The prompt is then built by vLLM's own placeholder code from those times, so it is the prompt the
pixel route builds for the same frames. (vLLM 0.34 reads an embeddings item's `timestamps` itself; before, the
processor below routes them to the placeholder code. vLLM writes a frame's time as whole seconds; given times are
floored likewise, so the prompt is the pixel route's.)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.glm4_1v import Glm4vMultiModalProcessor, Glm4vProcessingInfo
from vllm.multimodal.parse import DictEmbeddingItems, EmbeddingItems
from vllm.multimodal.processing import PromptUpdateDetails

try:    # vLLM >= 0.34: GLM-4V's own parser, with our embedding fields plus row-count and hidden-size checks
    from vllm.model_executor.models.glm4_1v import Glm4vMultiModalDataParser as _VllmDataParser
except ImportError:     # 0.32, 0.33: Qwen2-VL's, whose field layout GLM-4V shares
    from vllm.model_executor.models.qwen2_vl import Qwen2VLMultiModalDataParser as _VllmDataParser

#: vLLM >= 0.34 builds a video's placeholder from the item's `timestamps` field itself (embeddings items included);
#: before, only from frames' metadata, so the processor below serves embeddings items.
VLLM_PLACES_GIVEN_TIMESTAMPS = hasattr(Glm4vProcessingInfo, "_placeholder_from_timestamps")

#: The key of a video embeddings item that holds its slices' times (Qwen2-VL's field layout already has it, and
#: vLLM's Qwen3-VL parser declares it as placeholder metadata the same way).
TIMESTAMPS = "timestamps"
#: The metadata key that hands an embeddings item's times to vLLM's placeholder code (a name no video loader uses,
#: so frames' metadata never takes this path).
_GIVEN_TIMES = "glm4v_fast_slice_timestamps"


def _video_timestamps(data: Mapping[str, Any]) -> torch.Tensor | list[torch.Tensor]:
    """`data["timestamps"]` checked against `data["video_grid_thw"]`: one entry per temporal slice of each video."""
    if TIMESTAMPS not in data:
        raise ValueError("a video given as embeddings needs its slices' times: pass {'video_embeds', "
                         "'video_grid_thw', 'timestamps'} with 'timestamps' one list per video of the seconds of "
                         "each temporal slice's first frame (extract_video_embeddings(..., return_dict=True) and "
                         "glm4v-fast serve return them); GLM-4V writes them into the video prompt")
    if "video_grid_thw" not in data:
        raise ValueError("a video given as embeddings needs 'video_grid_thw' (videos, 3)")
    grid = torch.as_tensor(data["video_grid_thw"])
    grid = grid[None] if grid.dim() == 1 else grid
    stamps = data[TIMESTAMPS]
    if isinstance(stamps, torch.Tensor):
        stamps = stamps[None] if stamps.dim() == 1 else stamps
        rows = list(stamps)
    else:
        rows = [torch.as_tensor(row, dtype=torch.float64) for row in stamps]
    if len(rows) != grid.shape[0]:
        raise ValueError(f"'timestamps' has {len(rows)} rows for {grid.shape[0]} videos (one row per video)")
    for i, (row, (t, _, _)) in enumerate(zip(rows, grid.tolist())):
        if row.dim() != 1 or row.shape[0] != t:
            raise ValueError(f"video {i}: 'timestamps' has {list(row.shape)} entries, its grid {grid[i].tolist()} "
                             f"has {t} temporal slices (one time per slice)")
        if not bool(torch.isfinite(row.double()).all()) or bool((row < 0).any()):
            raise ValueError(f"video {i}: 'timestamps' must be finite seconds >= 0, got {row.tolist()}")
    if isinstance(stamps, torch.Tensor):
        return stamps.to(torch.float64)
    return torch.stack(rows) if len({r.shape[0] for r in rows}) == 1 else rows


class Glm4vFastDataParser(_VllmDataParser):
    """vLLM's parser for GLM-4V embeddings dicts (Qwen2-VL's before 0.34) with a video embeddings item whose
    timestamps are checked against its grid, and a bare video embeddings tensor refused by name."""

    embedding_fields = {
        "image": {"image_embeds": "values", "image_grid_thw": "metadata"},
        # the timestamps size the prompt like the grid does: required, and kept by an EC consumer
        "video": {"video_embeds": "values", "video_grid_thw": "metadata", TIMESTAMPS: "metadata"},
    }

    def _parse_video_data(self, data):
        if isinstance(data, dict):
            data = {**data, TIMESTAMPS: _video_timestamps(data)}
        items = super()._parse_video_data(data)
        if isinstance(items, EmbeddingItems):
            raise ValueError("a video given as a bare embeddings tensor has no grid or timestamps: pass "
                             "{'video_embeds', 'video_grid_thw', 'timestamps'}")
        return items


class Glm4vFastProcessingInfo(Glm4vProcessingInfo):
    """vLLM's GLM-4V processing info with glm4v-fast's data parser; a video's metadata may give its timestamps.

    vLLM derives a video's slice times from its frame metadata in one of three methods (GLM-4.1V/4.5V, GLM-4.6V,
    GLM-GA processors), all returning whole seconds; given an embeddings item's times (under `_GIVEN_TIMES`) each
    returns those, floored to whole seconds likewise, so `_construct_video_placeholder` formats them as for frames.
    """

    def get_data_parser(self):
        return Glm4vFastDataParser(self.get_hf_config().vision_config.spatial_merge_size,
                                   video_needs_metadata=True,
                                   expected_hidden_size=self._get_expected_hidden_size(),
                                   allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def _placeholder_from_timestamps(self, timestamps, grid_thw):
        """vLLM >= 0.34 only: its placeholder from an item's times, given times floored to whole seconds as vLLM
        computes a frame's (a no-op for the pixel route's times; GLM-4.1V prints them with "{}", so 0.0 != 0)."""
        values = timestamps.flatten().tolist() if isinstance(timestamps, torch.Tensor) else list(timestamps)
        return super()._placeholder_from_timestamps([int(float(t)) for t in values], grid_thw)

    @staticmethod
    def _given_seconds(metadata: Mapping[str, Any]) -> list[int] | None:
        stamps = metadata.get(_GIVEN_TIMES) if isinstance(metadata, Mapping) else None
        if stamps is None:
            return None
        return [int(float(s)) for s in torch.as_tensor(stamps).reshape(-1).tolist()]

    def _get_video_second_idx_glm4v(self, metadata, total_frames):
        given = self._given_seconds(metadata)
        return given if given is not None else super()._get_video_second_idx_glm4v(metadata, total_frames)

    def _get_video_second_idx_glm46v(self, metadata, total_frames):
        given = self._given_seconds(metadata)
        return given if given is not None else super()._get_video_second_idx_glm46v(metadata, total_frames)

    def _get_video_second_idx_glmga(self, metadata, total_frames):
        given = self._given_seconds(metadata)
        return given if given is not None else super()._get_video_second_idx_glmga(metadata, total_frames)


class Glm4vFastMultiModalProcessor(Glm4vMultiModalProcessor):
    """vLLM's GLM-4V processor whose video prompt update also serves embeddings items (from their timestamps)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs) -> Sequence:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if VLLM_PLACES_GIVEN_TIMESTAMPS or not isinstance(mm_items.get("video"), DictEmbeddingItems):
            return updates          # vLLM's replacement reads the frames' metadata (or, from 0.34, the item's times)
        image_token_id = self.info.get_hf_processor(**hf_processor_mm_kwargs).image_token_id

        def embeds_replacement(item_idx: int):
            item = out_mm_kwargs["video"][item_idx]
            grid_thw, stamps = item["video_grid_thw"].data, item[TIMESTAMPS].data
            placeholder = self.info._construct_video_placeholder(stamps, {_GIVEN_TIMES: stamps}, grid_thw)
            return PromptUpdateDetails.select_token_id(placeholder, embed_token_id=image_token_id)

        return [dataclasses.replace(u, replacement=embeds_replacement) if u.modality == "video" else u
                for u in updates]
