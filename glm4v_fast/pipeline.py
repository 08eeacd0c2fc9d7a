"""The seeds' high-level API: images and videos in, GLM-4V embeddings out.

    config, model, processor = create_glm4v_vision_encoder(checkpoint="path/to/GLM-4.1V-9B-Thinking")
    pipe = GLM4VEmbeddingPipeline(model, processor)
    embeddings = pipe.extract_image_embeddings(["a.jpg", "b.png"])      # [(tokens_a, 4096), (tokens_b, 4096)]

Without a checkpoint the model is the full GLM-4.1V architecture with seeded random weights: right shapes
and speed, meaningless values (a warning says so).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .config import VisionConfig
from .model import VisionModel
from .processing import VisionProcessor

RANDOM_WEIGHTS_SEED = 0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (what the checkpoints hold); fp32 on CPU, where bf16 GEMMs are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """The device (default: cuda when available) and dtype (default or "auto": bf16 on GPU, fp32 on CPU)."""
    device = torch.device(device) if device is not None else default_device()
    if dtype is None or dtype == "auto":
        return device, default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return device, dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return device, DTYPES[name]


def create_glm4v_vision_encoder(config: VisionConfig | dict | str | os.PathLike | None = None, checkpoint=None,
                                device=None, dtype=None, *, attn_backend: str = "auto", kernels: str = "auto",
                                seed: int = RANDOM_WEIGHTS_SEED, max_image_pixels: int | None = None,
                                token_buckets: Sequence[int] | None = None, cuda_graphs: bool = False
                                ) -> tuple[VisionConfig, VisionModel, VisionProcessor]:
    """(config, model, processor), ready for inference. The one place a model is built from user options.

    checkpoint: a directory written by save_pretrained or a full GLM-4V checkpoint (its preprocessor_config.json
    is used when present). Without one, `config` (a VisionConfig, an HF vision_config dict, or a path to a
    config.json; GLM-4.1V defaults when None) gets random weights seeded with `seed`, and a warning says so.
    max_image_pixels: the processor's decompression-bomb limit (default: its own).
    attn_backend, kernels, token_buckets, cuda_graphs: VisionModel's options.
    """
    device, dtype = resolve_device_dtype(device, dtype)
    if checkpoint is not None:
        model = VisionModel.from_pretrained(checkpoint, dtype=dtype, device=device, attn_backend=attn_backend,
                                            kernels=kernels, token_buckets=token_buckets, cuda_graphs=cuda_graphs)
    else:
        if isinstance(config, dict):
            config = VisionConfig.from_dict(config)
        elif isinstance(config, (str, os.PathLike)):
            config = VisionConfig.from_pretrained(config)
        config = config or VisionConfig()
        warnings.warn(f"glm4v-fast: no checkpoint given, so the encoder has RANDOM weights (seed {seed}): the "
                      "embeddings have the right shapes but no meaning", stacklevel=2)
        with torch.device("meta"):
            model = VisionModel(config, attn_backend=attn_backend, kernels=kernels, token_buckets=token_buckets,
                                cuda_graphs=cuda_graphs)
        model = model.to(dtype).to_empty(device=device)
        model.reset_parameters(seed=seed)
    return model.config, model.eval(), _processor_for(model.config, checkpoint, max_image_pixels)


def _processor_for(config: VisionConfig, checkpoint, max_image_pixels: int | None) -> VisionProcessor:
    """The checkpoint's preprocessor config when it has one, else transformers' defaults; patching must agree."""
    from .processing import IMAGE_CONFIG_NAME

    limit = {} if max_image_pixels is None else {"max_image_pixels": max_image_pixels}
    if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, IMAGE_CONFIG_NAME)):
        processor = VisionProcessor.from_pretrained(checkpoint, **limit)
    else:
        processor = VisionProcessor(patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
                                    merge_size=config.spatial_merge_size, **limit)
    if (processor.patch_size, processor.temporal_patch_size, processor.merge_size) != \
            (config.patch_size, config.temporal_patch_size, config.spatial_merge_size):
        raise ValueError("the checkpoint's preprocessor config patches images differently from its vision config")
    return processor


class GLM4VEmbeddingPipeline:
    """Preprocess, pack and encode; one varlen forward per batch, one tensor per input back."""

    def __init__(self, model: VisionModel | None = None, processor: VisionProcessor | None = None,
                 config: VisionConfig | None = None, device=None, dtype=None):
        if model is None:
            _, model, default_processor = create_glm4v_vision_encoder(config=config, device=device, dtype=dtype)
            processor = processor or default_processor
        else:
            if device is not None:
                model = model.to(torch.device(device))
            if dtype is not None:
                model = model.to(resolve_device_dtype(model.device, dtype)[1])
        self.model = model.eval()
        self.processor = processor or _processor_for(model.config, None, None)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _to_device(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            pixel_values = pixel_values.pin_memory()
        return pixel_values.to(self.device, self.model.dtype, non_blocking=True)

    @torch.inference_mode()
    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.get_image_features(self._to_device(pixel_values), grid_thw))

    def _image_batches(self, images: Sequence[Any], batch_size: int) -> Iterator[dict]:
        """Preprocessed batches; the next batch is decoded and resized while the current one encodes."""
        chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4v-preprocess") as pool:
            pending = pool.submit(self.processor, images=chunks[0]) if chunks else None
            for i in range(len(chunks)):
                batch = pending.result()
                pending = pool.submit(self.processor, images=chunks[i + 1]) if i + 1 < len(chunks) else None
                yield batch

    def extract_image_embeddings(self, images: Any, return_dict: bool = False, batch_size: int = 8,
                                 progress: bool = False):
        """One (tokens_i, out_hidden_size) tensor per image.

        images: one image or a list (PIL, numpy HWC, torch CHW, or a path). With return_dict, a dict with
        embeddings, num_patches (patches before the 2x2 merge), num_tokens, embedding_dim and grid_thw.
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no images given")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        embeddings, grids = [], []
        batches: Iterable[dict] = self._image_batches(images, batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=-(-len(images) // batch_size), unit="batch", desc="encoding images")
        for batch in batches:
            embeddings += self._encode(batch["pixel_values"], batch["image_grid_thw"])
            grids.append(batch["image_grid_thw"])
        if not return_dict:
            return embeddings
        grid = torch.cat(grids)
        return {"embeddings": embeddings, "num_patches": grid.prod(-1).tolist(),
                "num_tokens": [e.shape[0] for e in embeddings], "embedding_dim": self.model.config.out_hidden_size,
                "grid_thw": grid}

    @torch.inference_mode()
    def extract_video_embeddings(self, videos: Any, video_metadata: Any = None, return_dict: bool = False):
        """One (T/2 * h/2 * w/2, out_hidden_size) tensor per video; the dict form adds per-slice timestamps.

        videos: one video or a list (a (T, H, W, C) array, a list of frames, or a file path); video_metadata
        as VisionProcessor takes it ({"fps", "duration", "total_num_frames"}, one per video).
        """
        out = self.processor(videos=videos, video_metadata=video_metadata)
        grid = out["video_grid_thw"]
        embeddings = list(self.model.get_video_features(self._to_device(out["pixel_values_videos"]), grid))
        if not return_dict:
            return embeddings
        return {"embeddings": embeddings, "num_patches": grid.prod(-1).tolist(),
                "num_tokens": [e.shape[0] for e in embeddings], "embedding_dim": self.model.config.out_hidden_size,
                "grid_thw": grid, "timestamps": out["video_timestamps"]}


# ------------------------------------------------------------------------------------------- one-call helpers
_DEFAULT: GLM4VEmbeddingPipeline | None = None


def _pipeline(model: VisionModel | None, processor: VisionProcessor | None) -> GLM4VEmbeddingPipeline:
    global _DEFAULT
    if model is not None:
        return GLM4VEmbeddingPipeline(model=model, processor=processor)
    if _DEFAULT is None:
        _DEFAULT = GLM4VEmbeddingPipeline()
    if processor is not None:
        return GLM4VEmbeddingPipeline(model=_DEFAULT.model, processor=processor)
    return _DEFAULT


def encode_image(image_or_path: Any, model: VisionModel | None = None,
                 processor: VisionProcessor | None = None) -> torch.Tensor:
    """(tokens, out_hidden_size) embeddings of one image. Without a model: the random-weights default."""
    return _pipeline(model, processor).extract_image_embeddings([image_or_path])[0]


def encode_images(images_or_paths: Sequence[Any], batch_size: int = 8, model: VisionModel | None = None,
                  processor: VisionProcessor | None = None) -> list[torch.Tensor]:
    """One tensor per image; `batch_size` images are packed into each forward."""
    return _pipeline(model, processor).extract_image_embeddings(list(images_or_paths), batch_size=batch_size)
