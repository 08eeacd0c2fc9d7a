"""The torch transforms of transformers' torchvision processors (images with ``backend="torchvision"``, and
videos): resize, rescale + normalize, patchify, with torch alone.

* :func:`resize_uint8` is ``torchvision.transforms.v2.functional.resize`` (torchvision 0.29) for uint8 images
  with antialiasing: on the CPU torchvision hands a bicubic (and, on AVX2/AVX-512 or ARM, a bilinear) uint8
  tensor straight to ``torch.nn.functional.interpolate(..., align_corners=False, antialias=True)``, torch's own
  uint8 kernel; otherwise (other devices) it converts to float32, interpolates, clamps bicubic to [0, 255],
  rounds and converts back. Both branches are reproduced. The result does not depend on the memory layout of
  the input (channels-first or channels-last), which is checked in the tests.
* :func:`normalize_fused` is transformers' fused rescale + normalize: ``(x - mean/rescale) / (std/rescale)`` in
  float32.
* :func:`patchify` pairs frames (the last frame repeated when the count is odd; a single image is one frame) and
  lays patches out in the spatial-merge order of docs/reference.md §6.3.
"""
from __future__ import annotations

import platform
from collections.abc import Sequence

import torch

# torch interpolate modes for the PIL resample codes a torch-path resize supports.
_TORCH_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def resize_uint8(images: torch.Tensor, height: int, width: int, resample: int = 3,
                 native: bool | None = None) -> torch.Tensor:
    """Resize uint8 images (N, C, H, W) like torchvision's v2 ``resize`` with ``antialias=True``.

    Same size returns the input. On CPU, bicubic goes through torch's native uint8 kernel (as torchvision does
    there); elsewhere the images are converted to float32, interpolated, clamped to [0, 255] (bicubic overshoots),
    rounded and converted back to uint8. ``resample`` is a PIL code: 0 nearest, 2 bilinear, 3 bicubic.
    ``native`` forces one of the two branches (None: torchvision's choice for the tensor's device). The two
    differ by a few uint8 levels at most on natural images (more on pixel noise, where bicubic overshoot is
    clipped at a different stage).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"resize_uint8 expects a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    if resample not in _TORCH_MODES:
        raise ValueError(f"the torch resize supports resample 0 (nearest), 2 (bilinear), 3 (bicubic); got {resample}")
    if tuple(images.shape[-2:]) == (height, width):
        return images
    mode = _TORCH_MODES[resample]
    smooth = mode in ("bilinear", "bicubic")
    kwargs = {"align_corners": False, "antialias": True} if smooth else {}
    if native is None:
        native = mode == "nearest-exact" or (images.device.type == "cpu" and (
            mode == "bicubic" or (mode == "bilinear" and _native_uint8_bilinear())))
    if native:
        return torch.nn.functional.interpolate(images, size=(height, width), mode=mode, **kwargs)
    out = torch.nn.functional.interpolate(images.float(), size=(height, width), mode=mode, **kwargs)
    if mode == "bicubic":
        out = out.clamp_(0, 255)
    return out.round_().to(torch.uint8)


def _native_uint8_bilinear() -> bool:
    """torchvision's rule for a uint8 bilinear resize on the CPU: torch's uint8 kernel where it is vectorised."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def normalize_fused(images: torch.Tensor, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                    mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """transformers' torchvision-backend rescale + normalize of uint8 images (..., C, H, W) → float32.

    With both steps on, it is one normalize with mean and std divided by ``rescale_factor`` (computed in float32
    as ``tensor(mean) * (1 / rescale_factor)``), i.e. ``(x - 255 mean) / (255 std)`` for the default factor.
    """
    x = images.to(torch.float32)
    if do_normalize:
        mean_t = torch.tensor(list(mean), dtype=torch.float32, device=x.device)
        std_t = torch.tensor(list(std), dtype=torch.float32, device=x.device)
        if do_rescale:
            mean_t = mean_t * (1.0 / rescale_factor)
            std_t = std_t * (1.0 / rescale_factor)
        return x.sub_(mean_t[:, None, None]).div_(std_t[:, None, None])
    if do_rescale:
        return x * rescale_factor
    return x


def patchify(frames: torch.Tensor, patch_size: int = 14, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flatten frames (T, C, H, W) into patches (gt*gh*gw, C*tp*p*p) in GLM-4V order (docs/reference.md §6.3).

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame. Rows run over temporal
    slices, then 2x2 merge blocks in raster order, then the 4 patches inside a block; each row is
    (C, tp, p, p) flattened. Returns the patches and ``(gt, gh, gw)``.
    """
    t, c, h, w = frames.shape
    if h % (patch_size * merge_size) or w % (patch_size * merge_size):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size*merge_size="
                         f"{patch_size * merge_size}")
    if pad := -t % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    # (gt, tp, C, bh, mh, ph, bw, mw, pw) -> (gt, bh, bw, mh, mw, C, tp, ph, pw)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


__all__ = ["resize_uint8", "normalize_fused", "patchify"]
