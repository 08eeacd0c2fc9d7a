"""Rescale + normalize as lookup tables, and the gather that writes them in patch order.

After the resize every image is uint8, so each output value is a function of one pixel value and its channel:
a 3 x 256 table holds them all, computed once with the arithmetic of the transformers processor being matched,
and applied while gathering pixels into the GLM-4V patch order (docs/reference.md §5.3). This replaces a
float conversion, a rescale, a normalize and a permute of the whole image by one gather per channel.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..transforms import normalize_fused

#: Output bytes gathered per block of rows (about an L2 cache).
_BLOCK_BYTES = 256 * 1024


def pil_value_table(do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: Sequence[float],
                    std: Sequence[float]) -> np.ndarray:
    """float32 (3, 256) with transformers' PIL-backend arithmetic: rescale as ``float64(v) * factor`` cast to
    float32, then ``(x - float32(mean)) / float32(std)`` in float32 (or float32(v) when not rescaled)."""
    values = np.arange(256, dtype=np.uint8)
    x = (values.astype(np.float64) * rescale_factor).astype(np.float32) if do_rescale else values
    if do_normalize:
        x = x.astype(np.float32)
        table = (x[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    else:
        table = np.broadcast_to(x.astype(np.float32), (3, 256))
    return np.ascontiguousarray(table, dtype=np.float32)


def torchvision_value_table(do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: Sequence[float],
                            std: Sequence[float]) -> np.ndarray:
    """float32 (3, 256) with transformers' torchvision-backend arithmetic (its fused rescale + normalize,
    :func:`glm4v_fast.transforms.normalize_fused`), computed by those very torch ops on the 256 values, so that
    every entry is the float32 the tensor path gives (elementwise float32 ops round the same however they run)."""
    values = torch.arange(256, dtype=torch.uint8).expand(3, 1, 256)
    table = normalize_fused(values, do_rescale, rescale_factor, do_normalize, mean, std)
    return np.ascontiguousarray(table.reshape(3, 256).numpy(), dtype=np.float32)


def gather_patches(image: np.ndarray, table: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int,
                   out: np.ndarray | None = None, channels_first: bool = False) -> np.ndarray:
    """uint8 image (H, W, 3), or (3, H, W) with ``channels_first`` → float32 patches (gh*gw, 3*tp*p*p) in
    spatial-merge order, values looked up in ``table``.

    The uint8 pixels are first gathered into patch order (cheap: one byte each), then looked up per channel and
    written into every temporal copy of the single frame. ``out``, when given, is the (gh*gw, 3*tp*p*p) float32
    block to fill (a slice of the batch output, which saves a concatenation).
    """
    p, m = patch_size, merge_size
    if channels_first:
        c, h, w = image.shape
        # (C, bh, mh, ph, bw, mw, pw) -> (bh, bw, mh, mw, C, ph, pw)
        order = image.reshape(c, h // p // m, m, p, w // p // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    else:
        h, w, c = image.shape
        # (bh, mh, ph, bw, mw, pw, C) -> (bh, bw, mh, mw, C, ph, pw)
        order = image.reshape(h // p // m, m, p, w // p // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
    n = (h // p) * (w // p)
    order = np.ascontiguousarray(order).reshape(n, c, p * p)
    if out is None:
        out = np.empty((n, c * temporal_patch_size * p * p), dtype=np.float32)
    view = out.reshape(n, c, temporal_patch_size, p * p)
    # A few rows at a time, so that the rows being written stay in the CPU caches (and the TLB) through all their
    # channel and frame columns; column by column over the whole output was twice as slow.
    rows = max(1, _BLOCK_BYTES // out.strides[0])
    for start in range(0, n, rows):
        block, dest = order[start:start + rows], view[start:start + rows]
        for ch in range(c):
            values = table[ch].take(block[:, ch])  # one gather per channel; the temporal copies are plain copies
            for t in range(temporal_patch_size):
                dest[:, ch, t] = values
    return out


__all__ = ["pil_value_table", "torchvision_value_table", "gather_patches"]
