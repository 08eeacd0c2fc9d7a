"""Static shapes and CUDA graphs for VisionModel: token buckets, and a captured graph per static shape.

A `StaticShapeRunner` is what `VisionModel(config, token_buckets=..., cuda_graphs=...)` builds from those two
arguments; the model calls through it whenever it has one. Per call it:

1. splits the items into groups that fit the largest bucket (`groups`; never inside an item);
2. runs each group padded to the smallest bucket that holds it, through the model's one packed forward
   (`VisionModel.forward_packed`) on a bucketed layout (`packing.pack(..., bucket=B)`), and keeps the real
   rows;
3. with `cuda_graphs`, on CUDA and outside autograd, runs the group instead through the static buffers of its
   shape class (`StaticForward`): the call's pixels and its layout tensors are copied in by device copies,
   and the graph captured for that class on its first call is replayed.

A shape class is (bucket, segment count, max_seqlen, attention backend, dtype, device): every launch grid of
a bucketed forward depends only on these (see `packing`), so one capture serves every layout of the class.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .config import VisionConfig
from .model import VisionOutput
from .packing import PackedBatch

SDPA_NOT_CAPTURABLE = ("cuda_graphs=True cannot use attn_backend 'sdpa': it launches one call per run of equal "
                       "segments, sliced by host-side bounds, which a CUDA graph cannot replay for another layout; "
                       "use attn_backend 'triton', 'torch_varlen' or 'flash_attn'")


class BucketGroup(NamedTuple):
    """Items [start, stop) of a call that run in one forward, padded to `bucket` (None: unpadded, alone)."""

    start: int
    stop: int
    bucket: int | None


class ShapeClass(NamedTuple):
    """What a captured graph is specific to."""

    padded_tokens: int
    num_segments: int
    max_seqlen: int
    attn_backend: str
    dtype: torch.dtype
    device: torch.device


def check_buckets(token_buckets, config: VisionConfig) -> tuple[int, ...]:
    """`token_buckets` validated, sorted and without repeats."""
    if isinstance(token_buckets, (str, bytes)) or not isinstance(token_buckets, Sequence) or not token_buckets:
        raise ValueError(f"token_buckets must be None or a non-empty sequence of ints, got {token_buckets!r}")
    unit = config.merge_unit
    for b in token_buckets:
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0 or b % unit:
            raise ValueError(f"token_buckets must be positive ints, multiples of spatial_merge_size**2 = {unit} "
                             f"(a bucket holds whole merged tokens); got {b!r} in {list(token_buckets)}")
    return tuple(sorted(set(token_buckets)))


class StaticShapeRunner:
    """Runs a VisionModel's calls padded to token buckets, replayed from CUDA graphs when enabled.

    It holds no weights and no reference to the model (each call passes it): the model owns the layouts, the
    runner the captured graphs, their static buffers and their memory pool.
    """

    def __init__(self, config: VisionConfig, token_buckets: Sequence[int], cuda_graphs: bool = False,
                 attn_backend: str = "auto"):
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if cuda_graphs and attn_backend == "sdpa":
            raise ValueError(SDPA_NOT_CAPTURABLE)
        self.buckets = check_buckets(token_buckets, config)
        self.cuda_graphs = cuda_graphs
        self.merge_unit = config.merge_unit
        self.graphs: dict[ShapeClass, StaticForward] = {}
        self._graph_pool = None

    @classmethod
    def from_options(cls, config: VisionConfig, token_buckets: Sequence[int] | None, cuda_graphs: bool,
                     attn_backend: str) -> StaticShapeRunner | None:
        """The runner for VisionModel's token_buckets / cuda_graphs arguments, or None without buckets."""
        if token_buckets is None:
            if not isinstance(cuda_graphs, bool):
                raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
            if cuda_graphs:
                raise ValueError("cuda_graphs=True needs token_buckets: CUDA graphs replay static shapes only")
            return None
        return cls(config, token_buckets, cuda_graphs, attn_backend)

    def clear(self) -> None:
        """Drop the captured graphs and their buffers (the model moved or changed dtype)."""
        self.graphs.clear()
        self._graph_pool = None

    def groups(self, grid: torch.Tensor) -> list[BucketGroup]:
        """One group per forward: consecutive items greedily filling the largest bucket; an item above it goes
        alone, unpadded (bucket None)."""
        largest, sizes = self.buckets[-1], grid.prod(-1).tolist()
        bounds, start, total = [], 0, 0
        for i, n in enumerate(sizes):
            if total and (total + n > largest or n > largest):
                bounds.append((start, i))
                start, total = i, 0
            total += n
            if n > largest:
                bounds.append((start, i + 1))
                start, total = i + 1, 0
        if start < len(sizes):
            bounds.append((start, len(sizes)))
        return [BucketGroup(i, j, next((b for b in self.buckets if b >= sum(sizes[i:j])), None)) for i, j in bounds]

    def forward(self, model, pixel_values: torch.Tensor, grid: torch.Tensor) -> VisionOutput:
        """The model's outputs for validated (pixel_values, grid), computed group by group."""
        groups = self.groups(grid)
        if len(groups) == 1:
            return self._forward_group(model, pixel_values, grid, groups[0].bucket)
        rows = [0] + torch.cumsum(grid.prod(-1), 0).tolist()
        outs = [self._forward_group(model, pixel_values[rows[g.start]:rows[g.stop]], grid[g.start:g.stop], g.bucket)
                for g in groups]
        return VisionOutput(last_hidden_state=torch.cat([o.last_hidden_state for o in outs]),
                            pooler_output=torch.cat([o.pooler_output for o in outs]))

    def _forward_group(self, model, pixel_values: torch.Tensor, grid: torch.Tensor, bucket: int | None) -> VisionOutput:
        if bucket is None:
            return model.forward_packed(pixel_values, model.layout(grid))
        layout = model.layout(grid, bucket)
        if self.cuda_graphs and model.device.type == "cuda" and not torch.is_grad_enabled():
            return self.run_static(model, pixel_values, layout, capture=True)
        x = pixel_values if pixel_values.device == model.device else pixel_values.to(model.device)
        x = torch.cat([x, x.new_zeros(bucket - layout.num_tokens, x.shape[1])])
        return real_rows(model.forward_packed(x, layout), layout.num_tokens, self.merge_unit)

    def run_static(self, model, pixel_values: torch.Tensor, layout: PackedBatch, capture: bool) -> VisionOutput:
        """A bucketed layout's forward through the static buffers of its shape class: replayed from its CUDA
        graph (captured on first use if `capture`), or run eagerly over the same buffers before capture."""
        backend = model.resolved()[1]
        if backend == "sdpa":
            raise ValueError(SDPA_NOT_CAPTURABLE)
        key = ShapeClass(layout.padded_tokens, layout.num_segments, layout.max_seqlen, backend, model.dtype,
                         model.device)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = StaticForward(model, layout, backend)
        with torch.inference_mode(False), torch.no_grad():
            entry.fill(model, pixel_values, layout)
            if capture and entry.graph is None:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                entry.capture(model, self._graph_pool)
            outputs = entry.run(model)
        return real_rows(outputs, layout.num_tokens, self.merge_unit, clone=True)


def real_rows(out: VisionOutput, num_tokens: int, merge_unit: int, clone: bool = False) -> VisionOutput:
    """The outputs of a padded forward cut to the real tokens (cloned when they are reusable buffers)."""
    n = num_tokens // merge_unit
    features, merged = out.last_hidden_state[:n], out.pooler_output[:n]
    if clone:
        features, merged = features.clone(), merged.clone()
    return VisionOutput(last_hidden_state=features, pooler_output=merged)


@dataclass
class StaticLayout:
    """The layout tensors one shape class's graph reads, as device buffers refilled per call.

    What `attention.varlen_attention` and the blocks read of a layout: the window bounds (cu_seqlens and the
    class's max_seqlen), the rotary tables and, for the Triton backend, the tile plan (a fixed number of rows
    per class). It has no host-side bounds: those differ between layouts of a class, and nothing in a
    captured forward may read them.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    cos: torch.Tensor
    sin: torch.Tensor
    attention_tiles: object | None         # a kernels.TilePlan buffer, for the Triton backend only

    @classmethod
    def like(cls, layout: PackedBatch, backend: str) -> StaticLayout:
        """Empty buffers of the shapes of `layout` (a bucketed layout of the class)."""
        tiles = None
        if backend == "triton":
            plan = layout.tile_plan()
            tiles = type(plan)(torch.empty_like(plan.tiles), plan.block_m)
        return cls(torch.empty_like(layout.cu_seqlens), layout.max_seqlen, torch.empty_like(layout.cos),
                   torch.empty_like(layout.sin), tiles)

    def fill(self, layout: PackedBatch) -> None:
        """Copy a layout of the same class in (device copies only)."""
        self.cu_seqlens.copy_(layout.cu_seqlens)
        self.cos.copy_(layout.cos)
        self.sin.copy_(layout.sin)
        if self.attention_tiles is not None:
            self.attention_tiles.tiles.copy_(layout.tile_plan().tiles)

    def tile_plan(self):
        if self.attention_tiles is None:
            raise ValueError("this static layout was built for another attention backend than triton")
        return self.attention_tiles


class StaticForward:
    """Static inputs (pixels, position embeddings), layout buffers and outputs of one shape class.

    `fill` copies a call's pixels, its position embeddings and its (cached, on-device) layout tensors into the
    buffers: device copies only. `capture` records the forward over the buffers in a CUDA graph (after a
    warm-up on a side stream, which also compiles Triton kernels and creates library workspaces outside the
    capture); `run` replays it, or runs the same forward eagerly before capture (and on devices without
    graphs).
    """

    def __init__(self, model, layout: PackedBatch, backend: str):
        c, device = model.config, model.device
        with torch.inference_mode(False), torch.no_grad():
            self.pixels = torch.zeros(layout.padded_tokens, c.patch_dim, dtype=model.dtype, device=device)
            self.positions = torch.zeros(layout.padded_tokens, c.hidden_size, dtype=model.dtype, device=device)
            self.layout = StaticLayout.like(layout, backend)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: VisionOutput | None = None

    def fill(self, model, pixel_values: torch.Tensor, layout: PackedBatch) -> None:
        self.pixels[: layout.num_tokens].copy_(pixel_values, non_blocking=True)
        self.positions.copy_(model.position_embeddings(layout))
        self.layout.fill(layout)

    def _forward(self, model) -> VisionOutput:
        return model.forward_packed(self.pixels, self.layout, positions=self.positions)

    def run(self, model) -> VisionOutput:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.outputs = self._forward(model)
        return self.outputs

    def capture(self, model, pool) -> None:
        current = torch.cuda.current_stream(self.pixels.device)
        side = torch.cuda.Stream(self.pixels.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(model)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (a server's decoders pinning memory) does not break capture.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = self._forward(model)
        self.graph = graph


__all__ = ["SDPA_NOT_CAPTURABLE", "BucketGroup", "ShapeClass", "StaticForward", "StaticLayout", "StaticShapeRunner",
           "check_buckets", "real_rows"]
