"""Images → ``pixel_values`` and ``image_grid_thw``, as transformers' GLM-4V image processors compute them.

Two backends, named as transformers names them, each equal bit for bit to its transformers counterpart:

* ``"torchvision"`` (the default, as in transformers): ``Glm4vImageProcessor``. The resize is torchvision's v2
  ``resize`` of a uint8 tensor (bicubic, antialiased), which on the CPU is torch's own uint8 kernel
  (:func:`glm4v_fast.transforms.resize_uint8` calls it as torchvision does, without torchvision), then its
  fused rescale + normalize in float32.
* ``"pil"``: ``Glm4vImageProcessorPil``: ``PIL.Image.resize`` (bicubic), then rescale in float64 and normalize in
  float32.

Either way the resized image is uint8, so rescale + normalize is a lookup table computed with that backend's
arithmetic and applied while gathering pixels into patch order (:mod:`.values`); images are loaded and resized
in parallel threads (PIL and torch's resize release the GIL), each resize then single-threaded inside torch
(:mod:`.threads`) so that the threads do not multiply. On another torch device (``device="cuda"``) the torchvision backend runs the
tensor path of transformers there instead (resize, fused normalize, patchify on the device).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..imageio import DEFAULT_MAX_IMAGE_PIXELS, ImageLimits, decode_opened, open_checked, to_rgb_uint8
from ..transforms import normalize_fused, patchify, resize_uint8
from ..validation import positive_int
from .arguments import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TORCH_RESAMPLE, PixelOptions, backend_name
from .sizing import DEFAULT_IMAGE_SIZE, check_size_dict, smart_resize
from .threads import in_single_threaded_torch
from .values import gather_patches, pil_value_table, torchvision_value_table


def describe_image(image: Any, index: int) -> str:
    """How error messages name an input: its position, and its path when it is a file."""
    if isinstance(image, (str, os.PathLike)):
        return f"image {index} ({os.fspath(image)!r})"
    return f"image {index}"


def is_image_like(obj: Any) -> bool:
    return isinstance(obj, (Image.Image, str, os.PathLike, bytes, bytearray)) or (
        isinstance(obj, (np.ndarray, torch.Tensor)) and obj.ndim in (2, 3))


def as_image_list(images: Any) -> list[Any]:
    """One image, a list of images or a 4-D batch array as a list of images."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        return list(images)
    if is_image_like(images) or isinstance(images, (np.ndarray, torch.Tensor)):
        return [images]  # arrays of other ranks are refused with a message about their dimensions
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list")
        return list(images)
    raise ValueError(f"images has unsupported type {type(images).__name__}; expected an image or a list of images")


class ImageProcessor(PixelOptions):
    """Images → GLM-4V ``pixel_values`` (float32, one row per patch) and ``image_grid_thw``.

    Args:
        size: pixel budget ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``.
        min_pixels, max_pixels: override the two entries of ``size``.
        resample: PIL resampling code or name (bicubic); the torchvision backend supports nearest, bilinear and
            bicubic.
        do_resize, do_rescale, rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb,
        patch_size, temporal_patch_size, merge_size: as in transformers' ``Glm4vImageProcessor``.
        backend: ``"torchvision"`` (default; alias ``"torch"``) or ``"pil"``: which transformers processor to equal.
        device: torch device for the torchvision backend (None: the CPU).
        max_image_pixels: refuse images with more pixels (decompression bombs); None: no limit.
        num_workers: threads loading and resizing images in parallel (default: up to 8, one per CPU).
    """

    DEFAULT_SIZE, SIZE_NAME = DEFAULT_IMAGE_SIZE, "size"

    def __init__(self, size: Mapping[str, int] | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, resample: int | str = 3, do_resize: bool = True,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
                 do_convert_rgb: bool = True, patch_size: int = 14, temporal_patch_size: int = 2,
                 merge_size: int = 2, backend: str | None = None, device: Any = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, num_workers: int | None = None):
        super().__init__(size, min_pixels, max_pixels, resample, do_resize, do_rescale, rescale_factor,
                         do_normalize, image_mean, image_std, do_convert_rgb, patch_size, temporal_patch_size,
                         merge_size, max_image_pixels)
        self.backend = backend_name(backend)
        if self.backend == "pil" and device is not None and str(device) != "cpu":
            raise ValueError(f"device={device!r} needs backend='torchvision'; the PIL backend runs on the CPU")
        if self.backend == "torchvision" and self.resample not in TORCH_RESAMPLE:
            raise ValueError(f"backend='torchvision' supports resample 0, 2 or 3 (nearest, bilinear, bicubic), "
                             f"got {self.resample}; use backend='pil' for the others")
        self.device = device
        self.num_workers = positive_int(num_workers, "num_workers") if num_workers is not None else \
            max(1, min(8, os.cpu_count() or 1))
        table = pil_value_table if self.backend == "pil" else torchvision_value_table
        self._table = table(self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                            self.image_std)

    # ----------------------------------------------------------------------------------------------------------
    # sizes

    @property
    def min_pixels(self) -> int:
        return self.size["shortest_edge"]

    @property
    def max_pixels(self) -> int:
        return self.size["longest_edge"]

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        if not self.do_resize:
            return height, width
        return smart_resize(self.temporal_patch_size, height, width, temporal_factor=self.temporal_patch_size,
                            factor=self.factor, min_pixels=self.size["shortest_edge"],
                            max_pixels=self.size["longest_edge"])

    @property
    def max_image_patches(self) -> int:
        """The most patches (rows of ``pixel_values``) one image resizes to: the pixel budget ``longest_edge``
        holds ``temporal_patch_size`` copies of the frame, ``patch_size**2`` pixels per patch."""
        return self.size["longest_edge"] // (self.temporal_patch_size * self.patch_size ** 2)

    def get_number_of_image_patches(self, height: int, width: int,
                                    images_kwargs: Mapping[str, Any] | None = None) -> int:
        """Patches (rows of ``pixel_values``) for an image of ``height`` x ``width``; merged tokens are a
        ``merge_size**2`` fraction of this. ``images_kwargs`` may override patch_size, merge_size and size,
        as in transformers."""
        images_kwargs = dict(images_kwargs or {})
        patch_size = images_kwargs.get("patch_size", self.patch_size)
        merge_size = images_kwargs.get("merge_size", self.merge_size)
        size = check_size_dict(images_kwargs.get("size", self.size), "size")
        h, w = smart_resize(self.temporal_patch_size, height, width, temporal_factor=self.temporal_patch_size,
                            factor=patch_size * merge_size, min_pixels=size["shortest_edge"],
                            max_pixels=size["longest_edge"])
        return (h // patch_size) * (w // patch_size)

    def target_size(self, height: int, width: int, what: str) -> tuple[int, int]:
        """:meth:`resized_size`, with errors that name the input."""
        try:
            h, w = self.resized_size(height, width)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if h % self.factor or w % self.factor:
            raise ValueError(f"{what} is {height}x{width}; with do_resize=False both sides must be multiples of "
                             f"patch_size*merge_size={self.factor}")
        return h, w

    # ----------------------------------------------------------------------------------------------------------
    # processing

    def __call__(self, images: Any, first_index: int = 0, names: Sequence[str] | None = None) -> tuple[Any, Any]:
        """``(pixel_values, image_grid_thw)`` of one image or a list of them: numpy arrays, or torch tensors on
        ``device`` for the tensor path. Error messages number images from ``first_index``, or call them by
        ``names`` (one per image)."""
        images = as_image_list(images)
        if names is None:
            names = [describe_image(image, first_index + i) for i, image in enumerate(images)]
        elif len(names) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names)} names")
        if self.backend == "torchvision" and self.device is not None and torch.device(self.device).type != "cpu":
            return self._on_device(images, names)
        # Pass 1 (cheap): decode/convert and work out every output size, so that pass 2 can write each image's
        # patches straight into its rows of one preallocated batch array instead of concatenating afterwards.
        rgbs = self._map(self.load_rgb, images, names)
        sizes = [self.target_size(rgb.shape[0], rgb.shape[1], name) for rgb, name in zip(rgbs, names)]
        counts = [(h // self.patch_size) * (w // self.patch_size) for h, w in sizes]
        dim = 3 * self.temporal_patch_size * self.patch_size ** 2
        pixel_values = np.empty((sum(counts), dim), dtype=np.float32)
        offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        blocks = [pixel_values[offsets[i]:offsets[i + 1]] for i in range(len(rgbs))]
        self._map(self._resize_and_gather, rgbs, sizes, blocks)
        grid = np.array([[1, h // self.patch_size, w // self.patch_size] for h, w in sizes], dtype=np.int64)
        return pixel_values, grid.reshape(-1, 3)

    def _map(self, fn: Any, *columns: list) -> list:
        """``map`` over images, in threads when there are several (PIL, numpy and torch's resize release the GIL
        in bulk work)."""
        count = len(columns[0])
        if count > 1 and self.num_workers > 1:
            with ThreadPoolExecutor(min(self.num_workers, count)) as pool:
                return list(pool.map(in_single_threaded_torch(fn), *columns))
        return [fn(*row) for row in zip(*columns)]

    def load_rgb(self, image: Any, what: str) -> np.ndarray:
        """Any accepted input as RGB uint8 (H, W, 3), converted as the backend's transformers processor does."""
        if isinstance(image, (str, os.PathLike, bytes, bytearray)):
            # A file's size is in its header: refuse an aspect ratio over 200 before decoding (a 65500x320
            # progressive JPEG of 93 KB takes seconds to decode only to be refused afterwards).
            name = f"image file {os.fspath(image)!r}" if isinstance(image, (str, os.PathLike)) else what
            opened, _ = open_checked(image, ImageLimits(self.max_image_pixels), name,
                                     check_size=lambda height, width: self.target_size(height, width, what))
            image = decode_opened(opened, name, self.max_image_pixels)
        return to_rgb_uint8(image, self.max_image_pixels, what=what, do_convert_rgb=self.do_convert_rgb,
                            blend=self.backend)

    def _resize_and_gather(self, rgb: np.ndarray, size: tuple[int, int], out: np.ndarray) -> None:
        """Resize one RGB uint8 image with the backend's resize and write its patches into ``out``."""
        h, w = size
        channels_first = False
        if (h, w) != rgb.shape[:2]:
            if self.backend == "pil":
                rgb = np.asarray(Image.fromarray(rgb).resize((w, h), resample=self.resample))
            else:
                if not rgb.flags.writeable:  # arrays viewing PIL memory are read-only; torch wants writable memory
                    rgb = rgb.copy()
                resized = resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1)[None], h, w, self.resample)
                rgb, channels_first = resized[0].numpy(), True
        gather_patches(rgb, self._table, self.patch_size, self.merge_size, self.temporal_patch_size, out,
                       channels_first=channels_first)

    def _on_device(self, images: list[Any], names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' torchvision tensor path on ``device``: resize, fused normalize, patchify there."""
        patches, grids = [], []
        for image, name in zip(images, names):
            rgb = self.load_rgb(image, name)
            h, w = self.target_size(rgb.shape[0], rgb.shape[1], name)
            if not rgb.flags.writeable:
                rgb = rgb.copy()
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(self.device).contiguous()
            x = resize_uint8(x, h, w, self.resample)
            x = normalize_fused(x, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                                self.image_std)
            # One frame; patchify repeats it to fill the temporal patch, like transformers' image path.
            image_patches, (_, gh, gw) = patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)
            patches.append(image_patches)
            grids.append([1, gh, gw])
        return torch.cat(patches, dim=0), torch.tensor(grids, dtype=torch.int64)

    def to_dict(self) -> dict[str, Any]:
        """The options in transformers' ``preprocessor_config.json`` layout."""
        return {"image_processor_type": "Glm4vImageProcessor", **self.options_dict()}


__all__ = ["ImageProcessor", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "as_image_list", "describe_image",
           "is_image_like"]
