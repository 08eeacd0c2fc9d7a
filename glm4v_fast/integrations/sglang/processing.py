"""SGLang's GLM-4V multimodal processor, made to take precomputed embeddings.

SGLang 0.5.23 accepts preprocessed items (images, videos) in two formats, and its GLM-4V mishandles both:

- `{"format": "precomputed_embedding", "feature": (tokens, D), "image_grid_thw": (images, 3)}`: the base processor
  puts the embeddings into the item's `feature`, which GLM-4V's model feeds to the vision tower as pixels.
  Here such an item's feature becomes its `precomputed_embeddings`, which SGLang's multimodal merge uses as the
  encoder output (with either tower).
- `{"format": "processor_output", "precomputed_embeddings": ..., "image_grid_thw": ...}` (and any dict passed as
  processor output): the GLM-4V processor reads the grids with `getattr` on the processor result, which for such
  an input is the plain dict, and falls back to text-only M-RoPE positions. Here the result gets attribute access.

SGLang does not expand a preprocessed item's placeholder: a prompt whose image placeholders do not number the
embedding rows is refused here with a ValueError saying so (SGLang itself fails later on a shape mismatch).

In both, tensors that arrived as JSON lists (SGLang's HTTP API) become tensors: embeddings in float32, grids in
int64.
"""
from __future__ import annotations

import torch
from sglang.srt.managers.schedule_batch import MultimodalInputFormat
from sglang.srt.multimodal.processors.glm4v import Glm4vImageProcessor

_GRID_KEYS = ("image_grid_thw", "video_grid_thw")


def _as_grid(value):
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value, dtype=torch.int64).reshape(-1, 3)


def _as_embeddings(value):
    if value is None or isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        return value
    if value and isinstance(value[0], torch.Tensor):
        return torch.cat(list(value))
    return torch.as_tensor(value, dtype=torch.float32)


class ProcessorResult(dict):
    """A preprocessed input dict that also answers attribute reads, as transformers' BatchFeature does
    (missing keys read as None); its grids are tensors."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = self.get(name)
        return _as_grid(value) if name in _GRID_KEYS else value


class Glm4vFastProcessor(Glm4vImageProcessor):
    """SGLang's GLM-4V processor with working precomputed-embedding inputs (both formats)."""

    def process_and_combine_mm_data(self, base_output, mm_tokens, processor=None, **kwargs):
        items, input_ids, ret = super().process_and_combine_mm_data(base_output, mm_tokens, processor, **kwargs)
        if isinstance(ret, dict) and not isinstance(ret, ProcessorResult):
            ret = ProcessorResult(ret)
        self._check_placeholders(items, input_ids)
        return items, input_ids, ret

    def _check_placeholders(self, items, input_ids) -> None:
        """Image-only requests whose images are all precomputed: one placeholder token per embedding row."""
        if not items or not all(item.is_image() for item in items):
            return
        embeddings = [item.precomputed_embeddings for item in items]
        if not all(isinstance(e, torch.Tensor) for e in embeddings):
            return
        rows = sum(e.shape[0] for e in embeddings)
        placeholders = int((torch.as_tensor(input_ids) == self.IM_TOKEN_ID).sum())
        if placeholders != rows:
            raise ValueError(f"the prompt holds {placeholders} image placeholder token(s), the precomputed image "
                             f"embeddings have {rows} rows: repeat each image's {self.IMAGE_TOKEN} once per row of "
                             "its embedding (glm4v_fast.integrations.sglang.expand_image_tokens), or pass input_ids")

    def _postprocess_mm_items_before_transport(self, mm_items, *, images):
        mm_items = super()._postprocess_mm_items_before_transport(mm_items, images=images)
        for item in mm_items:
            if item.format == MultimodalInputFormat.PRECOMPUTED_EMBEDDING and item.feature is not None:
                item.precomputed_embeddings, item.feature = item.feature, None
            if item.format in (MultimodalInputFormat.PRECOMPUTED_EMBEDDING, MultimodalInputFormat.PROCESSOR_OUTPUT):
                item.precomputed_embeddings = _as_embeddings(item.precomputed_embeddings)
                for key in _GRID_KEYS:
                    if key in item.model_specific_data:
                        item.model_specific_data[key] = _as_grid(item.model_specific_data[key])
        return mm_items
