"""VisionModel: the fast GLM-4V vision tower.

Same state_dict keys, call and outputs as transformers' Glm4vVisionModel (and our ReferenceVisionModel),
computed the production way:

- every image and video frame of a call is packed into one sequence; the layout (cu_seqlens, max_seqlen,
  rotary tables, bicubic position-embedding matrices) is built by `packing.pack` and kept per grid in a
  `packing.LayoutCache`, with the interpolated position table and the attention tile plan kept on it: a
  forward on a layout seen before does no host-to-device copy and no host synchronisation (the cache is
  bounded in entries and bytes, and its tensors are usable in every grad mode);
- `forward_packed` is the one forward: a packed layout in, both outputs out. With `token_buckets` the calls
  go through a `static.StaticShapeRunner` instead, which pads them to static shapes (and with
  `cuda_graphs` captures each static shape once in a CUDA graph and replays it) around the same forward;
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import attention as attn_dispatch
from .config import VisionConfig
from .options import KERNEL_CHOICES
from .packing import LayoutCache, PackedBatch, check_inputs


# ---------------------------------------------------------------------------------------------------------------
# Kernel selection
# ---------------------------------------------------------------------------------------------------------------
class KernelOps(NamedTuple):
    """The element-wise ops one forward runs: the Triton kernels, or their PyTorch twins (same signatures)."""

    name: str                       # "triton" or "torch"
    rms_norm: Callable
    apply_rotary_qk: Callable
    swiglu: Callable
    layer_norm_gelu: Callable


def select_ops(kernels: str, device: torch.device) -> KernelOps:
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
        return KernelOps("triton", K.rms_norm, K.apply_rotary_qk, K.swiglu, K.layer_norm_gelu)
    return KernelOps("torch", K.rms_norm_reference, K.apply_rotary_qk_reference, K.swiglu_reference,
                     K.layer_norm_gelu_reference)


@dataclass(frozen=True)
class ForwardContext:
    """What the modules of one forward read besides their own weights: the packed layout, the element-wise
    kernels and the attention backend. Resolved once per call, because the kernels follow the model's device
    and the backend also its dtype and whether a gradient is needed."""

    layout: Any                     # a packing.PackedBatch, or the static.StaticLayout a CUDA graph reads
    ops: KernelOps
    attn_backend: str
    # Replaces the backend dispatch when set: (q, k, v, layout, scale) -> out (the compiled CPU path's op).
    attention: Callable | None = None


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
            if not _needs_grad(conv.weight) and not torch.compiler.is_compiling():
                w = conv._linear_weight(conv.weight)
                return F.linear(x.reshape(-1, w.shape[1]), w, conv.bias)
            # Training: permute the tokens (N x C), not the weight, so that backward keeps no weight-sized copy;
            # under torch.compile too, where the weight is a graph input that the cached permutation cannot be.
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
        # Not under torch.compile (the compiled CPU path): its weights are graph inputs, and the cached concatenation
        # cannot be one; two GEMMs there cost the same as one of twice the width.
        if (self.fuse and _plain(gate, nn.Linear) and _plain(up, nn.Linear) and gate.bias is None
                and up.bias is None and not _needs_grad(gate.weight, up.weight)
                and not torch.compiler.is_compiling()):
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

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.down_proj(self.swiglu(x, ctx.ops))


class RMSNormWeight(nn.Module):
    """Holds an RMSNorm weight (hidden_size wide) and the config's eps; the normalisation itself runs fused
    (with the residual add) in the block that reads it."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.eps = config.rms_norm_eps

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # One launch rotates q and k read straight out of the packed (N, 3*H*D) qkv buffer; v stays a view.
        layout = ctx.layout
        q, k, v = ctx.ops.apply_rotary_qk(self.qkv(x), layout.cos, layout.sin, self.num_heads)
        if ctx.attention is not None:
            out = ctx.attention(q, k, v, layout, self.head_dim**-0.5)
        else:
            out = attn_dispatch.varlen_attention(q, k, v, layout, ctx.attn_backend, scale=self.head_dim**-0.5)
        return self.proj(out.reshape(x.shape[0], -1))


def _checkpoint(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


class Block(nn.Module):
    """Pre-norm block: h = h + attn(norm1(h)); h = h + mlp(norm2(h)).

    Each residual add runs fused into the RMSNorm that follows it. The layer loop hands each block its input
    already normalised (`normed`, the previous block's output through this block's norm1) and the norm that
    comes after it (`next_norm`: the next block's norm1, or the tower's post_layernorm), so the last add is
    fused too. Activation checkpointing (`gradient_checkpointing = True`, set per block, as transformers'
    `gradient_checkpointing_enable()` does on every module that has the flag; active in training only) calls
    the block through `_gradient_checkpointing_func` with the residual stream alone, so that a checkpointed
    block keeps one (N, C) tensor for backward, as transformers' blocks do.
    """

    gradient_checkpointing = False
    _gradient_checkpointing_func = staticmethod(_checkpoint)

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNormWeight(config)
        self.norm2 = RMSNormWeight(config)
        self.attn = Attention(config)
        self.mlp = Mlp(config.hidden_size, config.out_hidden_size)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, normed: torch.Tensor | None = None,
                next_norm: RMSNormWeight | None = None):
        """h -> (h', attention output, next_norm(h') or None).

        normed: norm1(h) when the caller has it (fused into the previous block's last add).
        """
        rms_norm = ctx.ops.rms_norm
        if normed is None:
            normed = rms_norm(hidden, self.norm1.weight, self.norm1.eps)
        a = self.attn(normed, ctx)
        y, hidden = rms_norm(a, self.norm2.weight, self.norm2.eps, residual=hidden)
        m = self.mlp(y, ctx)
        if next_norm is None:
            return hidden + m, a, None
        y, hidden = rms_norm(m, next_norm.weight, next_norm.eps, residual=hidden)
        return hidden, a, y


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

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        norm, ops = self.post_projection_norm, ctx.ops
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
            A backend that can run on no device of this machine (package missing, or CUDA-only without a GPU)
            is refused here; one that cannot take the model's device or dtype is refused by the first forward
            that meets it (models are usually built on the CPU or the meta device, then moved).
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
            token_buckets and cuda_graphs build a `static.StaticShapeRunner`, which the model calls through.
        compile: "off" (the default) | "cpu" | "auto": run the packed forward under torch.compile on a CPU
            (`compiled_cpu`: inductor's C++ for the element-wise work, oneDNN for the prepacked linears, SDPA's
            CPU flash kernel for attention, dynamic token counts: no recompilation per image size). For
            inference only: a forward that needs a gradient runs eagerly, as does every forward on other
            devices, with the Triton kernels, or where no C++ compiler is found (logged once). "auto" compiles
            on a CPU in the dtypes measured faster there (`compiled_cpu.AUTO_DTYPES`); the environment variable
            GLM4V_FAST_COMPILE=off|cpu overrides "auto". The first compiled call of a process traces and
            compiles (tens of seconds at full size); the code is cached on disk (`compiled_cpu.cache_dir`).

    Layouts (`pack`) are cached per grid: at most LAYOUT_CACHE_SIZE of them and LAYOUT_CACHE_BYTES of device
    memory, least recently used evicted first; a layout larger than the byte budget alone is used and not kept.
    """

    LAYOUT_CACHE_SIZE = 8
    LAYOUT_CACHE_BYTES = 256 * 2**20

    def __init__(self, config: VisionConfig | None = None, attn_backend: str = "auto", kernels: str = "auto",
                 token_buckets: Sequence[int] | None = None, cuda_graphs: bool = False, compile: str = "off"):
        from .compiled_cpu import CompiledCpuForward, check_choice
        from .static import StaticShapeRunner

        super().__init__()
        self.config = config = config or VisionConfig()
        attn_dispatch.check_installed(attn_backend)
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        self.attn_backend = attn_backend
        self.kernels = kernels
        # None without token_buckets: every call is the plain packed forward.
        self._static = StaticShapeRunner.from_options(config, token_buckets, cuda_graphs, attn_backend)
        self._layouts = LayoutCache()
        # None with compile="off": the eager forward only.
        self._compiled = CompiledCpuForward(compile) if check_choice(compile) != "off" else None

        self.embeddings = nn.Module()
        self.embeddings.position_embedding = nn.Embedding(config.num_grid_per_side**2, config.hidden_size)
        self.patch_embed = PatchEmbed(config)
        self.post_conv_layernorm = RMSNormWeight(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.post_layernorm = RMSNormWeight(config)
        self.downsample = Downsample(config)
        self.merger = PatchMerger(config.out_hidden_size, config.intermediate_size)
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

    @property
    def token_buckets(self) -> tuple[int, ...] | None:
        """The token buckets, sorted (None: no static shapes)."""
        return self._static.buckets if self._static is not None else None

    @property
    def cuda_graphs(self) -> bool:
        return self._static is not None and self._static.cuda_graphs

    @property
    def compile_choice(self) -> str:
        """The compile option ("off", "cpu" or "auto"; see the class docstring)."""
        return self._compiled.choice if self._compiled is not None else "off"

    def compiled(self) -> tuple[bool, str]:
        """(whether inference forwards run compiled on the model's device and dtype, why)."""
        if self._compiled is None:
            return False, "compile='off'"
        if self._compiled.failed is not None:
            return False, f"the compile failed ({self._compiled.failed})"
        return self._compiled.decision(self)

    def resolved(self, device: torch.device | None = None) -> tuple[str, str]:
        """(kernels, attention backend) this model runs with on `device` (default: its own)."""
        device = torch.device(device) if device is not None else self.device
        ops = select_ops(self.kernels, device)
        return ops.name, attn_dispatch.resolve_backend(self.attn_backend, device, self.dtype)

    # ---------------------------------------------------------------- layouts
    def pack(self, grid_thw, pixel_values: torch.Tensor) -> PackedBatch:
        """Validate inputs and return the (unpadded) batch layout, cached per grid.

        grid_thw is read on the host (keep it there: a device grid_thw costs one device-to-host copy). A
        repeated shape (one image size in a loop, a server's common sizes) skips the host work and the
        host-to-device copies, and keeps its position table and attention tile plan.
        """
        return self.layout(check_inputs(pixel_values, grid_thw, self.config))

    def layout(self, grid: torch.Tensor, bucket: int | None = None) -> PackedBatch:
        """The layout of validated grid_thw (from `packing.check_inputs`), padded to `bucket` if given, from the
        model's layout cache."""
        layout = self._layouts.get(grid, self.config, self.device, bucket)
        self._layouts.trim(self.LAYOUT_CACHE_SIZE, self.LAYOUT_CACHE_BYTES)
        return layout

    def position_embeddings(self, layout: PackedBatch) -> torch.Tensor:
        """(N, C) interpolated position embeddings of `layout` in the model's dtype (kept on the layout outside
        autograd: see `PackedBatch.position_embeddings`)."""
        table = layout.position_embeddings(self.embeddings.position_embedding.weight, self.dtype)
        self._layouts.trim(self.LAYOUT_CACHE_SIZE, self.LAYOUT_CACHE_BYTES)    # the table counts against the budget
        return table

    # ---------------------------------------------------------------- forward
    def forward_features(self, pixel_values: torch.Tensor, grid_thw, batch: PackedBatch | None = None,
                         record: dict | None = None) -> VisionOutput:
        """Both transformers outputs: the downsampled features and the merger's embeddings.

        batch: a layout for exactly these pixel rows (from `pack`); grid_thw is then not read, and the plain
        packed forward runs on it. Without one, the layout comes from the cache, and with token_buckets the
        call is padded (and split) into buckets by the static-shape runner.
        record: a dict that receives "hidden_states" (the residual stream before the first block and after each
        block, depth + 1 tensors) and "attentions" (each block's attention output), as transformers records them;
        a recording call runs unbucketed, so that every tensor covers the whole call.
        """
        if batch is None:
            grid = check_inputs(pixel_values, grid_thw, self.config)
            if self._static is not None and record is None:
                return self._static.forward(self, pixel_values, grid)
            batch = self.layout(grid)
        return self.forward_packed(pixel_values, batch, record=record)

    def forward_packed(self, pixel_values: torch.Tensor, layout, positions: torch.Tensor | None = None,
                       record: dict | None = None, attention: Callable | None = None) -> VisionOutput:
        """The forward itself, on one packed layout: pixel rows (layout's rows) in, both outputs out.

        layout: a PackedBatch, or the static layout of a CUDA graph (see `static`). positions: the (N, C)
        position embeddings, read from `layout` when None (a CUDA graph passes its static buffer).
        attention: replaces the attention backend ((q, k, v, layout, scale) -> out); the compiled CPU path,
        which runs this forward under torch.compile, passes its op. Without it, a model built with `compile`
        runs the compiled forward where that applies (see `compiled_cpu`).
        """
        if (attention is None and record is None and self._compiled is not None
                and self._compiled.applies(self, pixel_values, layout)):
            out = self._compiled(self, pixel_values, layout, positions)
            if out is not None:                           # None: the compile failed (logged); run eagerly
                return out
        device = self.device
        needs_grad = torch.is_grad_enabled() and (
            pixel_values.requires_grad or any(p.requires_grad for p in self.parameters()))
        ops = select_ops(self.kernels, device)
        ctx = ForwardContext(layout, ops, attn_dispatch.resolve_backend(self.attn_backend, device, self.dtype,
                                                                       needs_grad), attention)
        if positions is None:
            positions = self.position_embeddings(layout)

        x = self.patch_embed(pixel_values if pixel_values.device == device else pixel_values.to(device))
        norm = self.post_conv_layernorm
        hidden = ops.rms_norm(x, norm.weight, norm.eps) + positions

        # `record` (transformers' output_hidden_states / output_attentions) collects the residual stream before
        # the first block and after each one, and each block's attention output.
        if record is not None:
            record["hidden_states"], record["attentions"] = [hidden], []
        checkpointing = self.training and torch.is_grad_enabled()
        normed = None                                     # norm1 of the next block's input, when fused
        for i, block in enumerate(self.blocks):
            if checkpointing and block.gradient_checkpointing:
                hidden, a, normed = block._gradient_checkpointing_func(partial(block, ctx=ctx), hidden)
            else:
                next_norm = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else self.post_layernorm
                hidden, a, normed = block(hidden, ctx, normed=normed, next_norm=next_norm)
            if record is not None:
                record["hidden_states"].append(hidden)
                record["attentions"].append(a)
        if normed is None:                                # the last block was checkpointed
            normed = ops.rms_norm(hidden, self.post_layernorm.weight, self.post_layernorm.eps)

        features = Downsample.merge(self.downsample, normed, self.config.spatial_merge_size)
        return VisionOutput(last_hidden_state=features, pooler_output=self.merger(features, ctx))

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

    def _apply(self, fn, *args, **kwargs):
        # Captured graphs hold the parameters' addresses, and layouts live on the old device: moving or
        # casting the model drops both (they are rebuilt on the next call).
        if getattr(self, "_static", None) is not None:
            self._static.clear()
        if getattr(self, "_layouts", None) is not None:
            self._layouts.clear()
        if getattr(self, "_compiled", None) is not None:
            self._compiled.clear()
        return super()._apply(fn, *args, **kwargs)

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                        attn_backend: str = "auto", kernels: str = "auto", token_buckets: Sequence[int] | None = None,
                        cuda_graphs: bool = False, compile: str = "off") -> "VisionModel":
        """Load from a dir written by save_pretrained or a full GLM-4.1V/4.5V/4.6V checkpoint dir.

        Only the vision tensors are read. dtype defaults to the checkpoint's; device to CPU. The other
        arguments are VisionModel's.
        """
        from .weights import load_vision_checkpoint

        config, state_dict = load_vision_checkpoint(path, cls.expected_shapes)
        dtype = dtype or next(iter(state_dict.values())).dtype
        with torch.device("meta"):
            model = cls(config, attn_backend=attn_backend, kernels=kernels, token_buckets=token_buckets,
                        cuda_graphs=cuda_graphs, compile=compile)
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
