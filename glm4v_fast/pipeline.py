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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch

from .config import VisionConfig
from .isolation import isolate_failures, reason
from .model import VisionModel
from .precision import auto_dtype, choose_dtype, log_choice
from .processing import VisionProcessor
from .progress import ProgressBar, block_progress, forward_only
from .validation import positive_int

RANDOM_WEIGHTS_SEED = 0


class ImageResult(NamedTuple):
    """One image's outcome in GLM4VEmbeddingPipeline.iter_image_embeddings."""
    index: int                          # position in the input list
    embedding: torch.Tensor | None      # (tokens, out_hidden_size) in the model's dtype and device; None if failed
    grid_thw: torch.Tensor | None       # (3,) int64 patch grid; None if failed
    error: str | None                   # why it failed ("ValueError: ..."), else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """What "auto" gives random weights: bf16 (the released checkpoints' dtype) where the device computes it
    natively (CUDA, CPUs with AMX or AVX512-BF16), else fp32 (see precision.choose_dtype)."""
    return choose_dtype(device, None).dtype


# The dtype names a user may give (CLI, API, Ray); the server's answer dtypes are serving.protocol.ANSWER_DTYPES.
DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device=None) -> torch.device:
    """A torch device from a user's option ("gpu" means "cuda"); one that this machine lacks is a ValueError.

    Default: cuda when available, else cpu.
    """
    if device is None or device == "auto":
        return default_device()
    asked = device
    if isinstance(device, str) and device.strip().lower().split(":")[0] == "gpu":
        device = "cuda" + device.strip()[3:]
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {asked!r}; expected cpu, cuda, cuda:N, gpu (or another torch device "
                         "type)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(asked)!r} asked for, but no CUDA device is available here (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use --device cpu "
                             "or device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """The device (default: cuda when available) and dtype (default or "auto": `default_dtype`)."""
    device = resolve_device(device)
    if dtype is None or dtype == "auto":
        return device, default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return device, dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_ALIASES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_ALIASES)} or 'auto', got {dtype!r}")
    return device, DTYPE_ALIASES[name]


def create_glm4v_vision_encoder(config: VisionConfig | dict | str | os.PathLike | None = None, checkpoint=None,
                                device=None, dtype=None, *, attn_backend: str = "auto", kernels: str = "auto",
                                seed: int = RANDOM_WEIGHTS_SEED, max_image_pixels: int | None = None,
                                token_buckets: Sequence[int] | None = None, cuda_graphs: bool = False,
                                compile: str = "auto") -> tuple[VisionConfig, VisionModel, VisionProcessor]:
    """(config, model, processor), ready for inference. The one place a model is built from user options.

    checkpoint: a directory written by save_pretrained or a full GLM-4V checkpoint (its processor config,
    preprocessor_config.json or transformers 5's processor_config.json, is used when present). Without one, `config` (a VisionConfig, an HF vision_config dict, or a path to a
    config.json; GLM-4.1V defaults when None) gets random weights seeded with `seed`, and a warning says so.
    dtype: None or "auto" (the default) is the checkpoint's stored dtype (bf16 for random weights) where the
    device computes it natively, else float32; the choice and its reason are logged (logger "glm4v_fast", INFO).
    max_image_pixels: the processor's decompression-bomb limit (default: its own).
    attn_backend, kernels, token_buckets, cuda_graphs, compile: VisionModel's options; compile defaults to "auto"
    here (the compiled CPU path where it was measured faster; VisionModel itself defaults to "off").
    """
    if dtype is None or dtype == "auto":
        device = resolve_device(device)
        choice = auto_dtype(device, checkpoint)
        log_choice(choice)
        dtype = choice.dtype
    else:
        device, dtype = resolve_device_dtype(device, dtype)
    if checkpoint is not None:
        model = VisionModel.from_pretrained(checkpoint, dtype=dtype, device=device, attn_backend=attn_backend,
                                            kernels=kernels, token_buckets=token_buckets, cuda_graphs=cuda_graphs,
                                            compile=compile)
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
                                cuda_graphs=cuda_graphs, compile=compile)
        model = model.to(dtype).to_empty(device=device)
        model.reset_parameters(seed=seed)
    return model.config, model.eval(), _processor_for(model.config, checkpoint, max_image_pixels)


def _processor_for(config: VisionConfig, checkpoint, max_image_pixels: int | None) -> VisionProcessor:
    """The checkpoint's processor config when it has one (preprocessor_config.json, or the processor_config.json
    transformers 5 writes), else transformers' defaults; patching must agree."""
    limit = {} if max_image_pixels is None else {"max_image_pixels": max_image_pixels}
    processor = None
    if checkpoint is not None and os.path.isdir(checkpoint):
        try:
            processor = VisionProcessor.from_pretrained(checkpoint, **limit)
        except FileNotFoundError:       # no processor config in the checkpoint: the defaults below
            pass
    if processor is None:
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

    def _preprocess(self, items: Sequence[tuple[int, Any, str | None]]) -> dict:
        """The processor's output for (index, image, name) triples; messages call each image by its name, or
        number it as in the caller's list (another processor, such as transformers' own, is called plainly)."""
        images = [image for _, image, _ in items]
        image_inputs = getattr(self.processor, "image_inputs", None)
        if image_inputs is not None:
            names = [name for _, _, name in items]
            return image_inputs(images, first_index=items[0][0], names=None if None in names else names)
        return self.processor(images=images)

    def _prepare(self, images: list, names: list | None, first_index: int, skip_bad: bool
                 ) -> tuple[dict | None, list[int], dict]:
        """(batch of the good images, their indices, {index: error}). Without skip_bad, any error is raised."""
        items = [(index, image, names[index] if names is not None else None)
                 for index, image in enumerate(images, first_index)]
        if not skip_bad:
            return self._preprocess(items), [index for index, _, _ in items], {}
        batch, alone = isolate_failures(items, self._preprocess, lambda exc, item: reason(exc))
        if alone is None:
            return batch, [index for index, _, _ in items], {}
        good = [(index, o.value) for (index, _, _), o in zip(items, alone) if o.ok]
        errors = {index: o.error for (index, _, _), o in zip(items, alone) if not o.ok}
        if not good:
            return None, [], errors
        batch = {key: torch.cat([b[key] for _, b in good]) for key in ("pixel_values", "image_grid_thw")}
        return batch, [index for index, _ in good], errors

    def iter_image_embeddings(self, images: Sequence[Any], batch_size: int = 8, skip_bad: bool = False,
                              progress: Callable[[float], None] | None = None,
                              names: Sequence[str] | None = None) -> Iterator[ImageResult]:
        """One ImageResult(index, embedding, grid_thw, error) per image, in order, yielded as each batch finishes.

        The next batch is decoded and resized in a thread while the current one encodes. skip_bad=False raises
        the first error (its message names the image's index, and its path for files); skip_bad=True reports a
        bad image (undecodable, too large, wrong shape, failed forward) as a result with embedding None and
        `error` set, and encodes the rest. progress: called with the number of images done so far, fractional
        inside a forward (each finished block of the tower moves it on by the forward's images / depth), rising.
        names: how error messages call each image (one per image; default: its index, and its path for files).
        """
        images = list(images)
        positive_int(batch_size, "batch_size")
        if names is not None and len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        starts = list(range(0, len(images), batch_size))
        progress = forward_only(progress) if progress is not None else None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4v-preprocess") as pool:
            def submit(i):
                return pool.submit(self._prepare, images[starts[i]:starts[i] + batch_size], names, starts[i], skip_bad)

            pending = submit(0) if starts else None
            for i in range(len(starts)):
                batch, good, errors = pending.result()
                pending = submit(i + 1) if i + 1 < len(starts) else None
                end = min(starts[i] + batch_size, len(images))
                results = {}
                if batch is not None:
                    with self._reporting(progress, end - len(good), len(good)):
                        results = dict(self._encode_batch(batch, good, skip_bad))
                if progress is not None:
                    progress(end)
                for index in range(starts[i], end):
                    if index in errors:
                        yield ImageResult(index, None, None, errors[index])
                    else:
                        yield ImageResult(index, *results[index])

    def _reporting(self, progress: Callable[[float], None] | None, done: int, images: int):
        """While `images` images encode after `done` others: report each finished block of the tower."""
        if progress is None:
            return nullcontext()
        return block_progress(self.model, lambda fraction: progress(done + fraction * images))

    def _encode_batch(self, batch: dict, indices: list[int], skip_bad: bool) -> Iterator[tuple[int, tuple]]:
        """(index, (embedding, grid, error)) for each image of a preprocessed batch."""
        grid = batch["image_grid_thw"]
        if not skip_bad:
            for index, emb, g in zip(indices, self._encode(batch["pixel_values"], grid), grid):
                yield index, (emb, g, None)
            return
        # A failed packed forward is redone image by image, so that only the failing images are lost.
        offsets = [0] + grid.prod(-1).cumsum(0).tolist()

        def encode(ks: Sequence[int]) -> list[torch.Tensor]:
            rows = slice(offsets[ks[0]], offsets[ks[-1] + 1])
            return self._encode(batch["pixel_values"][rows], grid[ks[0]:ks[-1] + 1])

        embeddings, alone = isolate_failures(range(len(indices)), encode, lambda exc, k: reason(exc))
        for k, index in enumerate(indices):
            if alone is None:
                yield index, (embeddings[k], grid[k], None)
            elif alone[k].ok:
                yield index, (alone[k].value[0], grid[k], None)
            else:
                yield index, (None, None, alone[k].error)

    def extract_image_embeddings(self, images: Any, return_dict: bool = False, batch_size: int = 8,
                                 progress: bool = False):
        """One (tokens_i, out_hidden_size) tensor per image.

        images: one image or a list (PIL, numpy HWC, torch CHW, or a path). With return_dict, a dict with
        embeddings, num_patches (patches before the 2x2 merge), num_tokens, embedding_dim and grid_thw.
        progress: a progress bar counting images, moved on by each block of the tower. A bad image raises
        ValueError (FileNotFoundError for a missing file) naming its index in `images` and its path;
        iter_image_embeddings(skip_bad=True) encodes the rest.
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no images given")
        embeddings, grids = [], []
        with ProgressBar(len(images), "image", "encoding images", disable=not progress) as bar:
            for result in self.iter_image_embeddings(images, batch_size, progress=bar.to if progress else None):
                embeddings.append(result.embedding)
                grids.append(result.grid_thw)
        if not return_dict:
            return embeddings
        grid = torch.stack(grids)
        return {"embeddings": embeddings, "num_patches": grid.prod(-1).tolist(),
                "num_tokens": [e.shape[0] for e in embeddings], "embedding_dim": self.model.config.out_hidden_size,
                "grid_thw": grid}

    @torch.inference_mode()
    def extract_video_embeddings(self, videos: Any, video_metadata: Any = None, return_dict: bool = False,
                                 do_sample_frames: bool | None = None):
        """One (T/2 * h/2 * w/2, out_hidden_size) tensor per video; the dict form adds per-slice timestamps.

        videos: one video or a list of videos. A video is a file path (decoded with PyAV, `pip install
        'glm4v-fast[video]'`), a (T, H, W, C) uint8 array or tensor, or a list of frames.
        video_metadata: a dict {"fps", "duration", "total_num_frames"} or a list with one per video. Files carry
            their own (the dict's entries override them); an in-memory video needs at least "fps" to be sampled
            at the processor's rate (2 frames per second by default), e.g. video_metadata={"fps": 30}.
        do_sample_frames: False uses every frame as given (no fps needed); None: the processor's setting (True).
        """
        out = self.processor(videos=videos, video_metadata=video_metadata, do_sample_frames=do_sample_frames)
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
