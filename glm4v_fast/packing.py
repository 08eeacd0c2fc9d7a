"""Packing: everything the encoder needs about a batch's layout, computed once per grid.

All images and video frames of a call are packed into one sequence of patches. The attention windows
(`cu_seqlens`, one per image and one per video temporal slice), the (h, w) position of every patch, the
rotary cos/sin tables and the bicubic interpolation matrices of the absolute position embeddings are derived
from `grid_thw` alone. `pack` computes them on the host once and copies them to the device once; a
`LayoutCache` keeps the resulting `PackedBatch` per grid, so that a forward on a layout seen before does no
host-to-device copy and no host synchronisation: everything it needs (including the interpolated position
table and the attention tile plan, each built once by its own method of the batch) is already on the device.

Static shapes (`pack(..., bucket=B)`): the sequence is padded to exactly B tokens with padding segments that
attend only to themselves (chunks of at most `PAD_SEGMENT` tokens, so that their attention cost stays
linear), the number of segments is padded with empty trailing segments to a power of two (capped at the
most a B-token bucket can hold), and `max_seqlen` is rounded up to a power of two (capped at B). Every
launch grid of a forward then depends only on (B, segment count, max_seqlen), which is what CUDA graph
capture needs; the padding rows' outputs are discarded. Every row belongs to a segment and cu_seqlens ends at
the row count, so every backend writes every attention output row: no stale (graph-pool) memory can reach
the real tokens, and empty segments are zero-length sequences, which varlen kernels skip.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import torch

from .config import VisionConfig


# ---------------------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------------------
def check_inputs(pixel_values: torch.Tensor, grid_thw, config: VisionConfig) -> torch.Tensor:
    """Validate a (pixel_values, grid_thw) pair and return grid_thw as an int64 CPU tensor (K, 3).

    One host copy of grid_thw per forward is the only synchronisation the encoder needs.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 2:
        raise ValueError(f"pixel_values must be 2-D (num_patches, {config.patch_dim}), got shape {tuple(pixel_values.shape)}")
    if pixel_values.shape[1] != config.patch_dim:
        raise ValueError(
            f"pixel_values width is {pixel_values.shape[1]}, expected in_channels*temporal_patch_size*patch_size**2 = "
            f"{config.in_channels}*{config.temporal_patch_size}*{config.patch_size}**2 = {config.patch_dim}")
    if not (pixel_values.is_floating_point()):
        raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")
    if isinstance(grid_thw, torch.Tensor):
        grid = grid_thw.detach().to("cpu")
    else:
        try:
            grid = torch.as_tensor(np.asarray(grid_thw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"grid_thw must be an integer tensor of shape (K, 3): {e}") from None
    if grid.dim() == 1 and grid.numel() == 3:
        grid = grid[None]
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape (K, 3) with K >= 1, got {tuple(grid.shape)}")
    if grid.is_floating_point() or grid.is_complex() or grid.dtype == torch.bool:
        raise ValueError(f"grid_thw must be an integer tensor, got {grid.dtype}")
    grid = grid.to(torch.int64)
    rows = grid.tolist()            # checked in Python: a few small tensor ops would cost more host time
    if any(v <= 0 for row in rows for v in row):
        raise ValueError(f"grid_thw rows must be positive, got {rows}")
    m = config.spatial_merge_size
    if any(h % m or w % m for _, h, w in rows):
        raise ValueError(f"grid_thw h and w must be multiples of spatial_merge_size={m}, got {rows}")
    expected = sum(t * h * w for t, h, w in rows)
    if pixel_values.shape[0] != expected:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but grid_thw {rows} "
                         f"describes sum(t*h*w) = {expected} patches")
    return grid


def split_temporal(grid: torch.Tensor) -> torch.Tensor:
    """Expand each (t, h, w) row into t rows of (1, h, w): one attention segment per temporal slice.

    This is what transformers' `get_video_features` does before calling the tower.
    """
    return torch.cat([grid[:, 1:].new_ones(int(grid[:, 0].sum()), 1),
                      torch.repeat_interleave(grid[:, 1:], grid[:, 0], dim=0)], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------------------
def block_major_positions(h: int, w: int, merge: int) -> np.ndarray:
    """(h*w, 2) patch coordinates (row, col) in spatial-merge-block order (docs/reference.md §2.2)."""
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([hpos, wpos], axis=-1)


def rotary_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """The 2D axial rotary's inverse frequencies: head_dim/4 of them, shared by the h and w axes."""
    spatial_dim = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float) / spatial_dim))


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (N, head_dim) cos and sin in transformers' layout: [h·f | w·f | h·f | w·f] (docs/reference.md §2.6)."""
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device, dtype=torch.float)
    freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos(), freqs.sin()


# ---------------------------------------------------------------------------------------------------------------
# Bicubic position-embedding interpolation, in closed form
# ---------------------------------------------------------------------------------------------------------------
_CUBIC_A = -0.75  # Keys' kernel as used by PyTorch's bicubic grid_sample


def _cubic(d: np.ndarray) -> np.ndarray:
    d = np.abs(d)
    a = _CUBIC_A
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


@lru_cache(maxsize=512)
def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) matrix M with M @ v = bicubic resampling of v (align_corners=False, border padding).

    Equals `F.grid_sample(mode="bicubic", padding_mode="border", align_corners=False)` evaluated at pixel
    centres, separated per axis: source coordinate (i + 0.5) * in / out - 0.5, taps floor-1 .. floor+2, each
    tap index clamped into the table (that is what border padding does for bicubic).
    """
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * in_size / out_size - 0.5
    base = np.floor(src)
    frac = src - base
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    for offset in (-1, 0, 1, 2):
        taps = np.clip(base + offset, 0, in_size - 1).astype(np.int64)
        np.add.at(m, (rows, taps), _cubic(frac - offset))
    m.flags.writeable = False      # cached and shared between calls
    return m


def bicubic_matrices(h: int, w: int, grid_side: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 (h, side) and (w, side) resampling matrices on `device` (one host-to-device copy each)."""
    return tuple(torch.from_numpy(bicubic_matrix(n, grid_side).astype(np.float32)).to(device) for n in (h, w))


def interpolated_position_table(weight: torch.Tensor, h: int, w: int, grid_side: int,
                                matrices: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(h*w, C) fp32 learned position embeddings resampled to an h x w patch grid, row-major.

    matrices: `bicubic_matrices(h, w, grid_side, weight.device)`, precomputed (a PackedBatch keeps them);
    built here when None. Differentiable in `weight`.
    """
    table = weight.float().view(grid_side, grid_side, -1)
    wy, wx = matrices if matrices is not None else bicubic_matrices(h, w, grid_side, weight.device)
    rows = torch.einsum("iy,yxc->ixc", wy, table)          # resample along h: (h, side, C)
    return torch.einsum("jx,ixc->ijc", wx, rows).reshape(h * w, -1)


# ---------------------------------------------------------------------------------------------------------------
# The packed batch
# ---------------------------------------------------------------------------------------------------------------
PAD_SEGMENT = 256   # longest padding segment of a bucketed layout: padding attention costs <= 256 keys per token


class CachedPositionTable(NamedTuple):
    """An interpolated position table and the state of the weight it was computed from."""

    key: tuple          # (storage address, version, dtype, device) of the weight, and the table's dtype
    table: torch.Tensor


@dataclass
class PackedBatch:
    """Layout of one packed forward. Host-side lists are plain Python; tensors live on `device`.

    Every tensor here is created outside inference mode and without autograd history, so a cached layout
    serves calls in any grad mode (inference mode, no_grad, or training with a backward). Two device
    artefacts are derived later and kept here, each built by one method only: the interpolated position
    table (`position_embeddings`, which depends on the weights too) and the Triton attention work list
    (`tile_plan`).
    """

    seqlens: list[int]                # patches per segment (padding segments included; empty ones not)
    cu_seqlens: torch.Tensor          # (S+1,) int32 on device
    cu_seqlens_host: list[int]        # the same bounds on the host, for planning without a device sync
    max_seqlen: int
    cos: torch.Tensor                 # (N, head_dim) fp32 on device
    sin: torch.Tensor
    table_index: torch.Tensor         # (N,) int64 on device: row of each patch in the concatenated tables
    table_sizes: list[tuple[int, int]]  # the distinct (h, w) whose interpolated tables are concatenated
    head_dim: int                     # the attention head width the tile plan is cut for
    grid_side: int                    # side of the learned position-embedding grid (num_grid_per_side)
    item_patches: list[int] = field(default_factory=list)   # patches per item
    equal_runs: list[tuple[int, int, int]] = field(default_factory=list)  # (first token, segments, length)
    matrices: dict = field(default_factory=dict)  # (h, w) -> fp32 bicubic (h, side), (w, side) on device
    num_tokens: int = 0               # real patches; rows [num_tokens, padded_tokens) are padding
    padded_tokens: int = 0            # rows of the layout (= num_tokens unless bucketed)
    bucketed: bool = False            # static shapes: fixed segment count, max_seqlen and tile plan size
    position_table: CachedPositionTable | None = None   # built by position_embeddings()
    attention_tiles: Any = None       # a kernels.TilePlan, built by tile_plan()
    _nbytes: int | None = field(default=None, repr=False, compare=False)

    def item_tokens(self, merge_unit: int) -> list[int]:
        """Merged output tokens per item (t*h*w / merge**2)."""
        return [n // merge_unit for n in self.item_patches]

    @property
    def num_segments(self) -> int:
        """Segments of the layout, empty trailing ones of a bucketed layout included."""
        return len(self.cu_seqlens_host) - 1

    def tensors(self) -> list[torch.Tensor]:
        """Every device tensor this layout holds, derived artefacts included."""
        found = [self.cu_seqlens, self.cos, self.sin, self.table_index]
        found += [m for pair in self.matrices.values() for m in pair]
        if self.position_table is not None:
            found.append(self.position_table.table)
        if self.attention_tiles is not None:
            found.append(self.attention_tiles.tiles)
        return found

    def nbytes(self) -> int:
        """Device bytes this layout holds (counted again after a derived artefact is built)."""
        if self._nbytes is None:
            self._nbytes = sum(t.numel() * t.element_size() for t in self.tensors())
        return self._nbytes

    def position_embeddings(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(N, C) interpolated absolute position embeddings in `dtype`, one gather over all patches.

        Device work only (the bicubic matrices are on the device already). Kept on the layout, outside
        autograd, while `weight` is unchanged: the key is its storage, version, dtype and device, so an
        in-place update (load_state_dict, an optimizer step) or a move recomputes it. When autograd needs
        the weight's gradient, or the weight is an inference tensor (no version counter), it is computed
        and not kept, so that the gradient flows and no stale table is served.
        """
        if (torch.is_grad_enabled() and weight.requires_grad) or weight.is_inference():
            return self._interpolate(weight).to(dtype)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, dtype)
        if self.position_table is None or self.position_table.key != key:
            with torch.inference_mode(False), torch.no_grad():
                self.position_table = CachedPositionTable(key, self._interpolate(weight).to(dtype))
            self._nbytes = None
        return self.position_table.table

    def _interpolate(self, weight: torch.Tensor) -> torch.Tensor:
        tables = [interpolated_position_table(weight, h, w, self.grid_side, self.matrices.get((h, w)))
                  for h, w in self.table_sizes]
        return torch.cat(tables, 0).index_select(0, self.table_index)

    def tile_plan(self):
        """The Triton attention work list (a kernels.TilePlan), built on first use from the host bounds.

        Bucketed layouts get a fixed number of rows, `num_segments + padded_tokens // block_m` (a bound on
        the tiles of any layout of the same shape class), the unused ones no-op rows (0, 0, 0): the kernel
        loads and stores nothing for a tile whose query start is not below its segment end.
        """
        if self.attention_tiles is None:
            from .kernels import TilePlan, varlen_tile_plan

            with torch.inference_mode(False), torch.no_grad():
                plan = varlen_tile_plan(self.cu_seqlens_host, head_dim=self.head_dim, device=self.cu_seqlens.device)
                if self.bucketed:
                    tiles = plan.tiles.new_zeros((self.num_segments + self.padded_tokens // plan.block_m, 3))
                    tiles[: plan.tiles.shape[0]] = plan.tiles
                    plan = TilePlan(tiles, plan.block_m)
            self.attention_tiles = plan
            self._nbytes = None
        return self.attention_tiles


def pack(grid_thw: torch.Tensor, config: VisionConfig, device: torch.device | str,
         bucket: int | None = None) -> PackedBatch:
    """Build the PackedBatch for validated grid_thw (int64 CPU, as returned by `check_inputs`).

    bucket: pad the layout to exactly this many tokens (static shapes, see the module docstring); it must
    hold the batch and be a multiple of spatial_merge_size**2.
    """
    device = torch.device(device)
    merge = config.spatial_merge_size
    segments = split_temporal(grid_thw)
    seg_hw = [(int(h), int(w)) for _, h, w in segments.tolist()]
    seqlens = [h * w for h, w in seg_hw]
    num_tokens = sum(seqlens)

    # Positions and table rows per distinct (h, w): a video's frames share one computation.
    sizes: dict[tuple[int, int], int] = {}
    offsets, pos_cache = [], {}
    offset = 0
    for hw in seg_hw:
        if hw not in sizes:
            sizes[hw] = offset
            offset += hw[0] * hw[1]
            pos_cache[hw] = block_major_positions(hw[0], hw[1], merge)
        offsets.append(sizes[hw])
    positions = np.concatenate([pos_cache[hw] for hw in seg_hw], 0)
    table_index = np.concatenate([pos_cache[hw][:, 0] * hw[1] + pos_cache[hw][:, 1] + off
                                  for hw, off in zip(seg_hw, offsets)], 0)

    num_segments, max_seqlen, padded = len(seqlens), max(seqlens), num_tokens
    if bucket is not None:
        from .kernels._utils import next_pow2     # the kernels' launch-size helper (imported on first use)

        if bucket < num_tokens or bucket % (merge * merge):
            raise ValueError(f"bucket {bucket} must hold the batch's {num_tokens} patches and be a multiple of "
                             f"spatial_merge_size**2 = {merge * merge}")
        pad, padded = bucket - num_tokens, bucket
        seqlens = seqlens + [PAD_SEGMENT] * (pad // PAD_SEGMENT) + ([pad % PAD_SEGMENT] if pad % PAD_SEGMENT else [])
        # Padding rows take position (0, 0) and table row 0: finite values whose outputs are discarded.
        positions = np.concatenate([positions, np.zeros((pad, 2), positions.dtype)], 0)
        table_index = np.concatenate([table_index, np.zeros(pad, table_index.dtype)], 0)
        # Power-of-two classes keep the launch grids within 2x of the work and the number of shapes small.
        # Real segments hold >= merge**2 patches and padding ones <= PAD_SEGMENT, so this cap holds them all.
        cap = max(bucket // (merge * merge) + 1, len(seqlens))
        num_segments = min(next_pow2(len(seqlens)), cap)
        max_seqlen = min(next_pow2(max(seqlens)), bucket)

    cu = np.full(num_segments + 1, padded, dtype=np.int32)      # empty trailing segments end at `padded`
    cu[0] = 0
    np.cumsum(seqlens, out=cu[1:len(seqlens) + 1])

    # Runs of consecutive equal-length segments: a batched attention call can take each run at once.
    runs: list[tuple[int, int, int]] = []
    for start, length in zip(cu[:-1].tolist(), seqlens):
        if runs and runs[-1][2] == length:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, length)
        else:
            runs.append((start, 1, length))

    position_ids = torch.from_numpy(positions).to(device, non_blocking=True)
    cos, sin = rotary_cos_sin(position_ids, rotary_inv_freq(config.head_dim, config.rope_theta))
    return PackedBatch(
        seqlens=seqlens,
        cu_seqlens=torch.from_numpy(cu).to(device, non_blocking=True),
        cu_seqlens_host=cu.tolist(),
        max_seqlen=max_seqlen,
        cos=cos,
        sin=sin,
        table_index=torch.from_numpy(table_index).to(device, non_blocking=True),
        table_sizes=list(sizes),
        head_dim=config.head_dim,
        grid_side=config.num_grid_per_side,
        item_patches=[int(t * h * w) for t, h, w in grid_thw.tolist()],
        equal_runs=runs,
        matrices={hw: bicubic_matrices(hw[0], hw[1], config.num_grid_per_side, device) for hw in sizes},
        num_tokens=num_tokens,
        padded_tokens=padded,
        bucketed=bucket is not None,
    )


class LayoutCache:
    """The layouts one model has packed, by (grid, bucket, device), least recently used evicted first.

    Bounded in entries and in device bytes (the derived artefacts a layout builds later included); a layout
    larger than the byte budget alone is used once and not kept. The limits are passed to `trim`, so that an
    owner may change them at any time.
    """

    def __init__(self):
        self._layouts: dict[tuple, PackedBatch] = {}

    def get(self, grid: torch.Tensor, config: VisionConfig, device: torch.device,
            bucket: int | None = None) -> PackedBatch:
        """The layout of validated grid_thw (from `check_inputs`), packed on first use, now most recently used."""
        key = (tuple(grid.flatten().tolist()), bucket, str(device))
        layout = self._layouts.pop(key, None)
        if layout is None:
            # Outside inference mode: a layout first built under torch.inference_mode() must still serve
            # later calls that record autograd history.
            with torch.inference_mode(False), torch.no_grad():
                layout = pack(grid, config, device, bucket=bucket)
        self._layouts[key] = layout
        return layout

    def trim(self, max_entries: int, max_bytes: int) -> None:
        """Evict least recently used layouts beyond `max_entries` entries or `max_bytes` bytes."""
        while len(self._layouts) > max_entries:
            self._layouts.pop(next(iter(self._layouts)))
        total = sum(layout.nbytes() for layout in self._layouts.values())
        while total > max_bytes:
            total -= self._layouts.pop(next(iter(self._layouts))).nbytes()

    def clear(self) -> None:
        self._layouts.clear()

    def keys(self) -> list[tuple]:
        """(flattened grid, bucket, device) of each kept layout, least recently used first."""
        return list(self._layouts)

    def layouts(self) -> list[PackedBatch]:
        """The kept layouts, least recently used first."""
        return list(self._layouts.values())

    def __len__(self) -> int:
        return len(self._layouts)


def flops(seqlens: list[int], config: VisionConfig) -> float:
    """Forward FLOPs by the FLOP model of docs/design.md §6 (GEMMs and attention; element-wise ops ignored)."""
    d, i_mlp, o, c = config.hidden_size, config.out_hidden_size, config.out_hidden_size, config.intermediate_size
    n = sum(seqlens)
    m = n / config.merge_unit
    per_token_block = 8 * d * d + 6 * d * i_mlp
    total = config.depth * per_token_block * n
    total += config.depth * sum(4 * s * s * d for s in seqlens)
    total += 2 * n * config.patch_dim * d                        # patch embed
    total += 2 * m * (d * config.merge_unit) * o                 # downsample
    total += 2 * m * o * o + 4 * m * o * c + 2 * m * c * o       # merger
    return float(total)


__all__ = ["PAD_SEGMENT", "CachedPositionTable", "LayoutCache", "PackedBatch", "pack", "check_inputs", "split_temporal",
           "block_major_positions", "rotary_inv_freq", "rotary_cos_sin", "bicubic_matrix", "bicubic_matrices",
           "interpolated_position_table", "flops"]
