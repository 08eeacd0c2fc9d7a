"""VisionModel: the fast GLM-4V vision tower.

Same state_dict keys, call and outputs as transformers' Glm4vVisionModel (and our ReferenceVisionModel),
computed the production way:

- every image and video frame of a call is packed into one sequence; the layout (cu_seqlens, max_seqlen,
  rotary tables, bicubic position-embedding matrices) is built by `packing.pack` and cached per grid, with
  the interpolated position table and the attention tile plan cached on it: a forward on a layout seen
  before does no host-to-device copy and no host synchronisation (the cache is bounded in entries and bytes,
  and its tensors are usable in every grad mode);
- with `token_buckets` the packed sequence is padded to static shapes, and with `cuda_graphs` each static
  shape is captured once in a CUDA graph and replayed;
- parameters and modules have transformers' names, shapes and types (patch_embed.proj a Conv3d, downsample a
  Conv2d, gate_proj / up_proj / down_proj Linears), so state dicts, transformers' loading and PEFT see the stock
  tower; the fast path runs them its own way: the patch Conv3d as a Linear on a view of its weight, the
  downsample Conv2d as a Linear over each 2x2 block of tokens, gate and up as one GEMM on their concatenated
  weight (the derived weights cached for inference);
- element-wise work goes through `glm4v_fast.kernels` (Triton, or their PyTorch twins), with the residual
  add fused into every RMSNorm, rotary applied to q and k read straight out of the packed qkv buffer, and
  SiLU·mul reading the gate_up buffer in place;
- attention goes through `attention.varlen_attention`, whose backend is chosen per device.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import attention as attn_dispatch
from .config import VisionConfig
from .options import KERNEL_CHOICES
from .packing import PackedBatch, check_inputs, pack


# ---------------------------------------------------------------------------------------------------------------
# Kernel selection
# ---------------------------------------------------------------------------------------------------------------
def select_ops(kernels: str, device: torch.device) -> SimpleNamespace:
    """The element-wise ops for `device`: Triton kernels, or their pure-PyTorch twins.

    Both sets are differentiable (the Triton ops have Triton backward kernels), so the choice does not depend
    on whether a gradient is needed; attention, which has a forward-only Triton backend, is resolved separately.
    """
    from . import kernels as K

    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" and K.can_run_on(device) else "torch"
    if kernels == "triton":
        if not K.triton_available():
            raise ValueError("kernels='triton' needs the triton package (pip install triton)")
        if not K.can_run_on(device):
            raise ValueError(f"kernels='triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before triton "
                             "is imported (the Triton interpreter); or use kernels='torch'")
        return SimpleNamespace(name="triton", rms_norm=K.rms_norm, apply_rotary_qk=K.apply_rotary_qk,
                               swiglu=K.swiglu, layer_norm_gelu=K.layer_norm_gelu)
    return SimpleNamespace(name="torch", rms_norm=K.rms_norm_reference, apply_rotary_qk=K.apply_rotary_qk_reference,
                           swiglu=K.swiglu_reference, layer_norm_gelu=K.layer_norm_gelu_reference)


# ---------------------------------------------------------------------------------------------------------------
# Modules: transformers' names, parameter shapes and module types (PEFT, hooks and HF loading see the same tower)
# ---------------------------------------------------------------------------------------------------------------
def _plain(module: nn.Module, cls: type) -> bool:
    """True if `module` is exactly a `cls` with no hooks and no instance-level forward, so that the fast path may use
    its weights directly (a reshaped view, a fused GEMM). Anything wrapped (PEFT LoRA, hooks, accelerate offload) is
    called as a module instead, so that the wrapper's work is not skipped."""
    return (type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in module.__dict__)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _DerivedWeight:
    """A weight computed from parameters (a concatenation, a permutation), cached while none of them changes.

    Used only where autograd does not need it (inference, or frozen weights). The cache keeps the sources alive and
    is keyed on each one's data pointer and version counter: an in-place update (optimizer step, load_state_dict,
    copy_) bumps the version; a move or replacement (.to(), to_empty, assigning a new Parameter) gives new storage,
    which cannot reuse the old address while the cache holds it. The owning modules also clear it in `_apply` and
    `_load_from_state_dict`. Weights created under torch.inference_mode have no version counter: an in-place edit
    of those (only possible inside inference_mode) after a forward is not seen; load_state_dict and moves are.
    """

    def __init__(self, fn):
        self.fn, self.key, self.sources, self.value = fn, None, None, None

    def clear(self) -> None:
        self.key = self.sources = self.value = None

    def __call__(self, *sources: torch.Tensor) -> torch.Tensor:
        key = tuple((s.data_ptr(), None if s.is_inference() else s._version) for s in sources)
        if key != self.key:
            self.clear()
            detached = tuple(s.detach() for s in sources)
            # A plain tensor even under inference_mode: the cache may later serve a forward that records a graph.
            with torch.inference_mode(False), torch.no_grad():
                self.value = self.fn(*detached)
            self.key, self.sources = key, detached
        return self.value


class PatchEmbed(nn.Module):
    """transformers' Glm4vVisionPatchEmbed: `proj` is the Conv3d (kernel = stride = patch). With kernel = stride
    it is a Linear over the flattened (C, T, P, P) patch, run through a reshaped view of the Conv3d weight."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.patch_shape = (c.in_channels, *kernel)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        proj = self.proj
        x = pixel_values.to(proj.weight.dtype)
        if _plain(proj, nn.Conv3d):
            return F.linear(x, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias)
        return proj(x.reshape(-1, *self.patch_shape)).flatten(1)


class Downsample(nn.Conv2d):
    """transformers' downsample: Conv2d(C -> O, kernel = stride = m), same parameters and same `forward`.

    `merge(x)` runs it on packed tokens: the packing puts each m x m block's tokens next to each other in (mh, mw)
    order (docs/reference.md §2.2), so the conv is a Linear over m*m consecutive tokens with the weight permuted to
    (O, mh, mw, C): for inference the permuted weight is cached and the activations need no copy.
    """

    def __init__(self, config: VisionConfig):
        m = config.spatial_merge_size
        super().__init__(config.hidden_size, config.out_hidden_size, kernel_size=m, stride=m)
        self._linear_weight = _DerivedWeight(self._permute)

    @staticmethod
    def _permute(weight: torch.Tensor) -> torch.Tensor:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

    def _apply(self, fn, *args, **kwargs):
        self._linear_weight.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._linear_weight.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    @staticmethod
    def merge(conv: nn.Module, x: torch.Tensor, merge_size: int) -> torch.Tensor:
        """(N, C) tokens -> (N / m^2, O), through `conv` (a Downsample, or a wrapper of one: called as a Conv2d)."""
        if _plain(conv, Downsample):
            if not _needs_grad(conv.weight):
                w = conv._linear_weight(conv.weight)
                return F.linear(x.reshape(-1, w.shape[1]), w, conv.bias)
            # Training: permute the tokens (N x C), not the weight, so that backward keeps no weight-sized copy.
            m2c = merge_size * merge_size * x.shape[-1]
            blocks = x.reshape(-1, merge_size * merge_size, x.shape[-1]).transpose(1, 2).reshape(-1, m2c)
            return F.linear(blocks, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
        blocks = x.reshape(-1, merge_size, merge_size, x.shape[-1]).permute(0, 3, 1, 2)
        return conv(blocks).flatten(1)


def _cat_rows(*weights: torch.Tensor) -> torch.Tensor:
    return torch.cat(weights, 0)


class _GateUp(nn.Module):
    """Base of the modules with transformers' gate_proj and up_proj Linears (Mlp, PatchMerger)."""

    fuse = True     # run gate and up as one GEMM on a cached [gate; up] weight for inference

    def __init__(self):
        super().__init__()
        self._gate_up = _DerivedWeight(_cat_rows)

    def _apply(self, fn, *args, **kwargs):
        self._gate_up.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._gate_up.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def swiglu(self, x: torch.Tensor, ops) -> torch.Tensor:
        """SiLU(gate_proj(x)) * up_proj(x). For inference, one GEMM on the concatenated [gate; up] weight (cached)
        and SiLU·mul reads its two halves in place; with gradients (or wrapped projections) both Linears run."""
        gate, up = self.gate_proj, self.up_proj
        if (self.fuse and _plain(gate, nn.Linear) and _plain(up, nn.Linear) and gate.bias is None
                and up.bias is None and not _needs_grad(gate.weight, up.weight)):
            gate_up = F.linear(x, self._gate_up(gate.weight, up.weight))
            return ops.swiglu(gate_up[:, : gate.out_features], gate_up[:, gate.out_features:])
        return ops.swiglu(gate(x), up(x))


class Mlp(_GateUp):
    """transformers' SwiGLU MLP: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        return self.down_proj(self.swiglu(x, ops))


class RMSNormWeight(nn.Module):
    """Holds an RMSNorm weight; the normalisation itself runs fused (with the residual add) in the model."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: PackedBatch, ops, backend: str) -> torch.Tensor:
        # One launch rotates q and k read straight out of the packed (N, 3*H*D) qkv buffer; v stays a view.
        q, k, v = ops.apply_rotary_qk(self.qkv(x), batch.cos, batch.sin, self.num_heads)
        out = attn_dispatch.varlen_attention(q, k, v, batch, backend, scale=self.head_dim**-0.5)
        return self.proj(out.reshape(x.shape[0], -1))


def _checkpoint(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


class Block(nn.Module):
    """Pre-norm block: h = h + attn(norm1(h)); h = h + mlp(norm2(h)).

    The layer loop runs `fused`, which folds each residual add into the following RMSNorm (the next block's norm1
    included). Activation checkpointing (`gradient_checkpointing = True`, set per block, as transformers'
    `gradient_checkpointing_enable()` does on every module that has the flag; active in training only) runs
    `forward` instead through `_gradient_checkpointing_func`: it takes and returns only the residual stream, so that
    a checkpointed block keeps one (N, C) tensor for backward, as transformers' blocks do.
    """

    gradient_checkpointing = False
    _gradient_checkpointing_func = staticmethod(_checkpoint)

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNormWeight(config.hidden_size)
        self.norm2 = RMSNormWeight(config.hidden_size)
        self.attn = Attention(config)
        self.mlp = Mlp(config.hidden_size, config.out_hidden_size)

    def fused(self, y, hidden, next_norm_weight, batch, ops, backend, eps):
        """(norm1(h), h) -> (next_norm(h'), h', attention output)."""
        a = self.attn(y, batch, ops, backend)
        y, hidden = ops.rms_norm(a, self.norm2.weight, eps, residual=hidden)
        y, hidden = ops.rms_norm(self.mlp(y, ops), next_norm_weight, eps, residual=hidden)
        return y, hidden, a

    def forward(self, hidden, batch, ops, backend, eps):
        """h -> (h', attention output)."""
        a = self.attn(ops.rms_norm(hidden, self.norm1.weight, eps), batch, ops, backend)
        y, hidden = ops.rms_norm(a, self.norm2.weight, eps, residual=hidden)
        return hidden + self.mlp(y, ops), a


class PatchMerger(_GateUp):
    """transformers' Glm4vVisionPatchMerger: down(silu(gate(g)) * up(g)), g = gelu(LayerNorm(proj(x)))."""

    # Runs once per forward on N/4 tokens: fusing would save one launch for a cached copy of its widest weights.
    fuse = False

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, context_dim, bias=False)
        self.up_proj = nn.Linear(dim, context_dim, bias=False)
        self.down_proj = nn.Linear(context_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        norm = self.post_projection_norm
        x = ops.layer_norm_gelu(self.proj(x), norm.weight, norm.bias, norm.eps)
        return self.down_proj(self.swiglu(x, ops))


@dataclass
class VisionOutput:
    """transformers' naming: last_hidden_state = downsample output, pooler_output = merger output."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class VisionModel(nn.Module):
    """The fast GLM-4V vision tower.

    Args:
        config: a VisionConfig (GLM-4.1V defaults when None).
        attn_backend: "auto" | "flash_attn" | "torch_varlen" | "triton" | "sdpa" (see glm4v_fast.attention).
        kernels: "auto" (Triton on CUDA, PyTorch elsewhere) | "triton" | "torch".
        token_buckets: None, or token counts (multiples of spatial_merge_size**2) to pad each packed forward
            to: the smallest bucket that holds the batch, on any device. The padding forms its own attention
            segments (see `packing.pack`), so the real tokens' outputs equal the unpadded forward. A batch
            larger than the largest bucket is split between items into several forwards (never inside an
            item); an item larger than the largest bucket runs alone, unpadded (and, with cuda_graphs, eager).
        cuda_graphs: with token_buckets on a CUDA device, outside autograd (inference_mode or no_grad): capture
            each static shape (bucket, segment-count class, max_seqlen class) once after a warm-up, in one graph
            memory pool shared by all of them, and replay it; inputs and layout tensors are copied into the
            graph's static buffers by device copies. Grad mode and other devices run the same bucketed forward
            eagerly. Needs a capturable attention backend (flash_attn, torch_varlen or triton, not sdpa).

    Layouts (`pack`) are cached per grid: at most LAYOUT_CACHE_SIZE of them and LAYOUT_CACHE_BYTES of device
    memory, least recently used evicted first; a layout larger than the byte budget alone is used and not kept.
    """

    LAYOUT_CACHE_SIZE = 8
    LAYOUT_CACHE_BYTES = 256 * 2**20

    def __init__(self, config: VisionConfig | None = None, attn_backend: str = "auto", kernels: str = "auto",
                 token_buckets: Sequence[int] | None = None, cuda_graphs: bool = False):
        super().__init__()
        self.config = config = config or VisionConfig()
        if attn_backend not in attn_dispatch.BACKENDS + ("auto",):
            raise ValueError(f"attn_backend must be one of {('auto',) + attn_dispatch.BACKENDS}, got {attn_backend!r}")
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        self.attn_backend = attn_backend
        self.kernels = kernels
        self.token_buckets = _check_buckets(token_buckets, config)
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if cuda_graphs and self.token_buckets is None:
            raise ValueError("cuda_graphs=True needs token_buckets: CUDA graphs replay static shapes only")
        if cuda_graphs and attn_backend == "sdpa":
            raise ValueError(_SDPA_NOT_CAPTURABLE)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, _StaticForward] = {}
        self._graph_pool = None

        self.embeddings = nn.Module()
        self.embeddings.position_embedding = nn.Embedding(config.num_grid_per_side**2, config.hidden_size)
        self.patch_embed = PatchEmbed(config)
        self.post_conv_layernorm = RMSNormWeight(config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.post_layernorm = RMSNormWeight(config.hidden_size)
        self.downsample = Downsample(config)
        self.merger = PatchMerger(config.out_hidden_size, config.intermediate_size)
        self._layouts: dict[tuple, PackedBatch] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """transformers-style init: N(0, initializer_range) matrices, zero biases, unit norms. Seeded if asked."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))

    # ---------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def resolved(self, device: torch.device | None = None) -> tuple[str, str]:
        """(kernels, attention backend) this model runs with on `device` (default: its own)."""
        device = torch.device(device) if device is not None else self.device
        ops = select_ops(self.kernels, device)
        return ops.name, attn_dispatch.resolve_backend(self.attn_backend, device, self.dtype)

    # ---------------------------------------------------------------- forward
    def pack(self, grid_thw, pixel_values: torch.Tensor) -> PackedBatch:
        """Validate inputs and return the (unpadded) batch layout, cached per grid.

        grid_thw is read on the host (keep it there: a device grid_thw costs one device-to-host copy). A
        repeated shape (one image size in a loop, a server's common sizes) skips the host work and the
        host-to-device copies, and keeps its position table and attention tile plan.
        """
        return self._layout(check_inputs(pixel_values, grid_thw, self.config))

    def _layout(self, grid: torch.Tensor, bucket: int | None = None) -> PackedBatch:
        key = (tuple(grid.flatten().tolist()), str(self.device), bucket)
        batch = self._layouts.pop(key, None)
        if batch is None:
            # Outside inference mode: a layout first built under torch.inference_mode() must still serve
            # later calls that record autograd history.
            with torch.inference_mode(False), torch.no_grad():
                batch = pack(grid, self.config, self.device, bucket=bucket)
        self._layouts[key] = batch                      # most recently used last
        self._trim_layouts()
        return batch

    def _trim_layouts(self) -> None:
        """Evict least recently used layouts beyond LAYOUT_CACHE_SIZE entries or LAYOUT_CACHE_BYTES bytes."""
        while len(self._layouts) > self.LAYOUT_CACHE_SIZE:
            self._layouts.pop(next(iter(self._layouts)))
        total = sum(b.nbytes() for b in self._layouts.values())
        while total > self.LAYOUT_CACHE_BYTES:
            total -= self._layouts.pop(next(iter(self._layouts))).nbytes()

    def _position_embeddings(self, batch: PackedBatch, dtype: torch.dtype) -> torch.Tensor:
        """(N, C) interpolated position embeddings in `dtype`, cached on the layout outside autograd.

        The cached table is keyed by the weight's storage, version, dtype and device, so an in-place update
        (load_state_dict, an optimizer step) or a move recomputes it. When autograd needs the weight's
        gradient it is recomputed (device work only) so that the gradient flows.
        """
        static = batch.cache.get("static_pos")
        if static is not None:                          # a CUDA graph's buffer, filled per call
            return static
        weight, side = self.embeddings.position_embedding.weight, self.config.num_grid_per_side
        if torch.is_grad_enabled() and weight.requires_grad:
            return batch.position_embeddings(weight, side).to(dtype)
        try:
            key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, dtype)
        except RuntimeError:                            # an inference tensor has no version counter
            return batch.position_embeddings(weight, side).to(dtype)
        hit = batch.cache.get("pos")
        if hit is not None and hit[0] == key:
            return hit[1]
        batch.uncache("pos")
        pos = batch.cached("pos", lambda: (key, batch.position_embeddings(weight, side).to(dtype)))[1]
        self._trim_layouts()
        return pos

    def forward_features(self, pixel_values: torch.Tensor, grid_thw, batch: PackedBatch | None = None,
                         record: dict | None = None) -> VisionOutput:
        """Both transformers outputs: the downsampled features and the merger's embeddings.

        batch: a layout for exactly these pixel rows (from `pack`); grid_thw is then not read. Without one,
        the layout comes from the cache, and with token_buckets the call is padded (and split) into buckets.
        record: a dict that receives "hidden_states" (the residual stream before the first block and after each
        block, depth + 1 tensors) and "attentions" (each block's attention output), as transformers records them;
        a recording call runs unbucketed, so that every tensor covers the whole call.
        """
        c = self.config
        if batch is None:
            grid = check_inputs(pixel_values, grid_thw, c)
            if self.token_buckets is not None and record is None:
                return self._forward_bucketed(pixel_values, grid)
            batch = self._layout(grid)
        device = self.device
        ops = select_ops(self.kernels, device)
        backend = attn_dispatch.resolve_backend(self.attn_backend, device, self.dtype, torch.is_grad_enabled() and (
            pixel_values.requires_grad or any(p.requires_grad for p in self.parameters())))
        eps = c.rms_norm_eps

        x = self.patch_embed(pixel_values if pixel_values.device == device else pixel_values.to(device))
        x = ops.rms_norm(x, self.post_conv_layernorm.weight, eps)
        hidden = x + self._position_embeddings(batch, x.dtype)

        # Pre-norm blocks with the residual add fused into each RMSNorm:
        #   y = norm1(h); h = h + attn(y); y = norm2(h); h = h + mlp(y); the next norm1 takes (mlp_out, h).
        # `record` (transformers' output_hidden_states / output_attentions) collects the residual stream before
        # the first block and after each one, and each block's attention output.
        checkpointing = self.training and torch.is_grad_enabled()
        if record is not None:
            record["hidden_states"], record["attentions"] = [hidden], []
        y = None
        for i, block in enumerate(self.blocks):
            if checkpointing and block.gradient_checkpointing:
                hidden, a = block._gradient_checkpointing_func(
                    partial(block.forward, batch=batch, ops=ops, backend=backend, eps=eps), hidden)
                y = None
            else:
                y = ops.rms_norm(hidden, block.norm1.weight, eps) if y is None else y
                next_norm = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else self.post_layernorm
                y, hidden, a = block.fused(y, hidden, next_norm.weight, batch, ops, backend, eps)
            if record is not None:
                record["hidden_states"].append(hidden)
                record["attentions"].append(a)
        if y is None:                                     # the last block was checkpointed
            y = ops.rms_norm(hidden, self.post_layernorm.weight, eps)

        features = Downsample.merge(self.downsample, y, c.spatial_merge_size)   # y = post_layernorm(h)
        return VisionOutput(last_hidden_state=features, pooler_output=self.merger(features, ops))

    def forward(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """Merged embeddings (sum(t*h*w)/4, out_hidden_size) for a packed mix of images and videos (t >= 1)."""
        return self.forward_features(pixel_values, grid_thw).pooler_output

    def _per_item(self, pixel_values: torch.Tensor, grid_thw) -> tuple[torch.Tensor, ...]:
        grid = check_inputs(pixel_values, grid_thw, self.config)
        embeddings = self.forward_features(pixel_values, grid).pooler_output
        return torch.split(embeddings, (grid.prod(-1) // self.config.merge_unit).tolist())

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw) -> tuple[torch.Tensor, ...]:
        """One (tokens_i, out_hidden_size) tensor per image."""
        return self._per_item(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw) -> tuple[torch.Tensor, ...]:
        """One (t*h*w/4, out_hidden_size) tensor per video, temporal slices in order."""
        return self._per_item(pixel_values_videos, video_grid_thw)

    # ---------------------------------------------------------------- static shapes and CUDA graphs
    def _bucket_groups(self, grid: torch.Tensor) -> list[tuple[int, int, int | None]]:
        """(first item, end item, bucket) per forward: consecutive items greedily filling the largest bucket;
        an item above it goes alone with bucket None (unpadded)."""
        buckets, sizes = self.token_buckets, grid.prod(-1).tolist()
        groups, start, total = [], 0, 0
        for i, n in enumerate(sizes):
            if total and (total + n > buckets[-1] or n > buckets[-1]):
                groups.append((start, i))
                start, total = i, 0
            total += n
            if n > buckets[-1]:
                groups.append((start, i + 1))
                start, total = i + 1, 0
        if start < len(sizes):
            groups.append((start, len(sizes)))
        out = []
        for i, j in groups:
            n = sum(sizes[i:j])
            out.append((i, j, next((b for b in buckets if b >= n), None)))
        return out

    def _forward_bucketed(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> VisionOutput:
        groups = self._bucket_groups(grid)
        if len(groups) == 1:
            return self._forward_group(pixel_values, grid, groups[0][2])
        rows = [0] + torch.cumsum(grid.prod(-1), 0).tolist()
        outs = [self._forward_group(pixel_values[rows[i]:rows[j]], grid[i:j], bucket) for i, j, bucket in groups]
        return VisionOutput(last_hidden_state=torch.cat([o.last_hidden_state for o in outs]),
                            pooler_output=torch.cat([o.pooler_output for o in outs]))

    def _forward_group(self, pixel_values: torch.Tensor, grid: torch.Tensor, bucket: int | None) -> VisionOutput:
        """One forward of whole items: padded to `bucket` (replayed from a CUDA graph when enabled)."""
        if bucket is None:
            return self.forward_features(pixel_values, None, batch=self._layout(grid))
        batch = self._layout(grid, bucket)
        if self.cuda_graphs and self.device.type == "cuda" and not torch.is_grad_enabled():
            return self._static_forward(pixel_values, batch, capture=True)
        device = self.device
        x = pixel_values if pixel_values.device == device else pixel_values.to(device)
        x = torch.cat([x, x.new_zeros(bucket - batch.num_tokens, x.shape[1])])
        return _real_rows(self.forward_features(x, None, batch=batch), batch, self.config.merge_unit)

    def _static_forward(self, pixel_values: torch.Tensor, batch: PackedBatch, capture: bool) -> VisionOutput:
        """Run a bucketed layout through the static buffers of its shape class (captured once if `capture`)."""
        backend = self.resolved()[1]
        if backend == "sdpa":
            raise ValueError(_SDPA_NOT_CAPTURABLE)
        key = (batch.padded_tokens, batch.num_segments, batch.max_seqlen, backend, self.dtype, str(self.device))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = _StaticForward(self, batch, backend)
        with torch.inference_mode(False), torch.no_grad():
            entry.fill(self, pixel_values, batch)
            if capture and entry.graph is None:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                entry.capture(self, self._graph_pool)
            entry.run(self)
        return _real_rows(entry.outputs, batch, self.config.merge_unit, clone=True)

    def _apply(self, fn, *args, **kwargs):
        # Captured graphs hold the parameters' addresses, and layouts live on the old device: moving or
        # casting the model drops both (they are rebuilt on the next call).
        for cache in (getattr(self, "_graphs", None), getattr(self, "_layouts", None)):
            if cache is not None:
                cache.clear()
        return super()._apply(fn, *args, **kwargs)

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                        attn_backend: str = "auto", kernels: str = "auto", token_buckets: Sequence[int] | None = None,
                        cuda_graphs: bool = False) -> "VisionModel":
        """Load from a dir written by save_pretrained or a full GLM-4.1V/4.5V/4.6V checkpoint dir.

        Only the vision tensors are read. dtype defaults to the checkpoint's; device to CPU. The other
        arguments are VisionModel's.
        """
        from .weights import load_vision_checkpoint

        config, state_dict = load_vision_checkpoint(path, cls.expected_shapes)
        dtype = dtype or next(iter(state_dict.values())).dtype
        with torch.device("meta"):
            model = cls(config, attn_backend=attn_backend, kernels=kernels, token_buckets=token_buckets,
                        cuda_graphs=cuda_graphs)
        model = model.to(dtype).to_empty(device=device or "cpu")
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors with transformers' key names (Glm4vVisionModel can load it)."""
        from .weights import save_vision_checkpoint

        save_vision_checkpoint(self, path)

    @staticmethod
    def expected_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
        """transformers' state_dict keys and shapes for `config` (no memory is allocated)."""
        from .reference import ReferenceVisionModel

        with torch.device("meta"):
            ref = ReferenceVisionModel(config)
        return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# Static shapes
# ---------------------------------------------------------------------------------------------------------------
_SDPA_NOT_CAPTURABLE = ("cuda_graphs=True cannot use attn_backend 'sdpa': it launches one call per run of equal "
                        "segments, sliced by host-side bounds, which a CUDA graph cannot replay for another layout; "
                        "use attn_backend 'triton', 'torch_varlen' or 'flash_attn'")


def _check_buckets(token_buckets, config: VisionConfig) -> tuple[int, ...] | None:
    if token_buckets is None:
        return None
    if isinstance(token_buckets, (str, bytes)) or not isinstance(token_buckets, Sequence) or not token_buckets:
        raise ValueError(f"token_buckets must be None or a non-empty sequence of ints, got {token_buckets!r}")
    unit = config.merge_unit
    for b in token_buckets:
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0 or b % unit:
            raise ValueError(f"token_buckets must be positive ints, multiples of spatial_merge_size**2 = {unit} "
                             f"(a bucket holds whole merged tokens); got {b!r} in {list(token_buckets)}")
    return tuple(sorted(set(token_buckets)))


def _real_rows(out: VisionOutput, batch: PackedBatch, merge_unit: int, clone: bool = False) -> VisionOutput:
    """The outputs of a padded forward cut to the real tokens (cloned when they are reusable buffers)."""
    n = batch.num_tokens
    features, merged = out.last_hidden_state[:n // merge_unit], out.pooler_output[:n // merge_unit]
    if clone:
        features, merged = features.clone(), merged.clone()
    return VisionOutput(last_hidden_state=features, pooler_output=merged)


class _StaticForward:
    """Static input buffers, layout buffers and outputs for one shape class of bucketed forwards.

    `fill` copies a call's pixels and its (cached, on-device) layout tensors into the buffers: device copies
    only. `capture` records the forward over the buffers in a CUDA graph (after a warm-up on a side stream,
    which also compiles Triton kernels and creates library workspaces outside the capture); `run` replays
    it, or runs the same forward eagerly before capture (and on devices without graphs).
    """

    def __init__(self, model: VisionModel, batch: PackedBatch, backend: str):
        c, device = model.config, model.device
        with torch.inference_mode(False), torch.no_grad():
            self.pixels = torch.zeros(batch.padded_tokens, c.patch_dim, dtype=model.dtype, device=device)
            # Host-side fields are the first layout's: only their sizes (segment count, max_seqlen) are read.
            self.batch = PackedBatch(
                seqlens=[], cu_seqlens=torch.empty_like(batch.cu_seqlens), cu_seqlens_host=batch.cu_seqlens_host,
                max_seqlen=batch.max_seqlen, cos=torch.empty_like(batch.cos), sin=torch.empty_like(batch.sin),
                table_index=batch.table_index[:0], table_sizes=[], num_tokens=batch.num_tokens,
                padded_tokens=batch.padded_tokens, bucketed=True,
                cache={"static_pos": torch.empty(batch.padded_tokens, c.hidden_size, dtype=model.dtype,
                                                 device=device)})
            self.plan_key = None
            if backend == "triton":
                plan = batch.tile_plan(c.head_dim, device)
                self.plan_key = ("triton_tile_plan", c.head_dim, str(device))
                self.batch.cache[self.plan_key] = type(plan)(torch.empty_like(plan.tiles), plan.block_m)
        self.graph = None
        self.outputs: VisionOutput | None = None

    def fill(self, model: VisionModel, pixel_values: torch.Tensor, batch: PackedBatch) -> None:
        s = self.batch
        self.pixels[: batch.num_tokens].copy_(pixel_values, non_blocking=True)
        s.cu_seqlens.copy_(batch.cu_seqlens)
        s.cos.copy_(batch.cos)
        s.sin.copy_(batch.sin)
        s.cache["static_pos"].copy_(model._position_embeddings(batch, model.dtype))
        if self.plan_key is not None:
            s.cache[self.plan_key].tiles.copy_(batch.tile_plan(model.config.head_dim, model.device).tiles)
        s.num_tokens = batch.num_tokens

    def run(self, model: VisionModel) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.outputs = model.forward_features(self.pixels, None, batch=self.batch)

    def capture(self, model: VisionModel, pool) -> None:
        current = torch.cuda.current_stream(self.pixels.device)
        side = torch.cuda.Stream(self.pixels.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                model.forward_features(self.pixels, None, batch=self.batch)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (a server's decoders pinning memory) does not break capture.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = model.forward_features(self.pixels, None, batch=self.batch)
        self.graph = graph
