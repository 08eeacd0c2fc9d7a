"""Varlen (packed, block-diagonal) non-causal attention: FlashAttention-2 forward in Triton.

All images/frames of a batch are packed into one sequence of T tokens; ``cu_seqlens`` marks where each
segment starts, and every token attends to all tokens of its own segment and to none outside it.

Algorithm (FA2 / Triton tutorial 06): a program owns one BLOCK_M tile of queries of one head, keeps it in
registers, and streams the segment's keys/values in BLOCK_N tiles, maintaining a running max ``m_i``, a
running denominator ``l_i`` and an unnormalised fp32 accumulator (online softmax). Scores are scaled by
``scale * log2(e)`` once so the exponentials are ``exp2``. Only the segment's last key tile can be partial,
so only that tile pays for a mask; the loop over full tiles has none.

Varlen grid: instead of sglang's (batch, heads, cdiv(max_seqlen, BLOCK_M)) grid, where every short segment
launches programs that exit at once, the host flattens the (segment, query tile) pairs into a tile plan
(``varlen_tile_plan``) once per batch; the model reuses it for all 24 layers. The grid is
(len(plan), heads) and every program has work. Consecutive programs are query tiles of one segment and
head, so they read the same K/V tiles from L2.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from ._utils import SUPPORTED_DTYPES, cast_to, check_dtype, check_launchable, check_out, kernel_launcher, mma, \
    next_pow2, register_op, tl, triton

__all__ = ["TilePlan", "varlen_tile_plan", "varlen_attention", "varlen_attention_reference"]

_LOG2_E = 1.4426950408889634
_MAX_HEAD_DIM = 256


class TilePlan(NamedTuple):
    """Work list of the attention kernel: one row per (segment, query tile).

    tiles: int32 (n_tiles, 3) on the device of the tensors, rows ``(q_start, seg_start, seg_end)``.
    block_m: the query-tile height the plan was cut for; the kernel launches with this BLOCK_M.
    """
    tiles: torch.Tensor
    block_m: int


def _default_block_m(head_dim: int, device: torch.device) -> int:
    if device.type == "cpu":
        # Interpreter: each program costs a fixed Python overhead, so prefer few, larger tiles.
        return 64
    # 128 query rows x D=128 in bf16 is 32 KB of registers per program at 8 warps (FA2 / tutorial 06
    # choice on H100); past D=128 the accumulator would spill, so halve the tile.
    return 128 if head_dim <= 128 else 64


def _kernel_config(head_dim: int, block_m: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a head dim, query tile and dtype."""
    if device.type == "cpu":
        return 64, 4, 1
    block_d = _block_d(head_dim)
    num_warps = 8 if (block_m >= 128 and block_d >= 128) else 4
    if dtype == torch.float32:
        # fp32 tiles are twice the bytes and the ieee dot stages its operands in shared memory:
        # 128x64 with 3 stages would need ~225 KB at D=128, at the edge of H100's 227 KB.
        return 32, num_warps, 2
    # 3 stages of K and V tiles (2 x 64 x 128 x 2 B each) fit H100's shared memory beside the Q tile.
    return (64, num_warps, 3) if block_d <= 128 else (32, num_warps, 2)


def _block_d(head_dim: int) -> int:
    """The head-dim tile: tl.arange needs a power of two, so other head dims are padded with masked lanes."""
    return max(16, next_pow2(head_dim))


def _stride_align(*strides: int) -> int:
    """The largest power of two (at most 16) dividing every stride, in elements.

    Triton specialises an integer argument as divisible by 16 only when it is; a head stride of 72 (head
    dim 72 in a packed qkv) is only a multiple of 8, so the compiler knew nothing about the alignment of a
    head's rows and fell back to scalar loads without cp.async: 255 registers and spills at head dim 72
    (triton 3.6, sm_90a). Passing the true alignment (8 elements = 16 bytes in bf16) restores 16-byte
    vector loads and the cp.async pipeline: 170 registers with triton 3.6 (166 with 3.9), no spills, as at
    head dim 128 (``aot_specs``, tests/test_aot.py). The padded lanes (72 -> BLOCK_D 128) still cost MMA
    work: 128/72 of the FLOPs of an unpadded tile.
    """
    align = 16
    for s in strides:
        while align > 1 and int(s) % align:
            align //= 2
    return align


class _Launch(NamedTuple):
    """Everything the launcher specialises the kernel on besides the tensors' dtype and alignment."""
    constexprs: dict
    num_warps: int
    num_stages: int


def _launch_config(head_dim: int, block_m: int, dtype: torch.dtype, device: torch.device,
                   stride_align: int) -> _Launch:
    block_n, num_warps, num_stages = _kernel_config(head_dim, block_m, dtype, device)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
                      STRIDE_ALIGN=stride_align,
                      # fp32 inputs must not silently drop to TF32 (10-bit mantissa) on tensor cores.
                      DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
    return _Launch(constexprs, num_warps, num_stages)


def _seqlens_host(cu_seqlens: Union[torch.Tensor, Sequence[int]]) -> list[int]:
    if isinstance(cu_seqlens, torch.Tensor):
        return [int(v) for v in cu_seqlens.detach().cpu().tolist()]
    return [int(v) for v in cu_seqlens]


def varlen_tile_plan(cu_seqlens: Union[torch.Tensor, Sequence[int]], head_dim: int = 128,
                     device: Optional[Union[torch.device, str]] = None,
                     block_m: Optional[int] = None) -> TilePlan:
    """Build the attention work list from segment boundaries ``cu_seqlens`` (B+1,), starting at 0.

    Call it once per batch, from a host-side ``cu_seqlens`` (a list or CPU tensor: no device sync), and
    pass the plan to every ``varlen_attention`` call of the forward. A CUDA ``cu_seqlens`` works too but
    costs one device-to-host copy. ``device``: where the plan lives (default: that of ``cu_seqlens``);
    ``head_dim`` and ``device`` pick the default ``block_m``.
    """
    bounds = _seqlens_host(cu_seqlens)
    if len(bounds) < 2 or bounds[0] != 0:
        raise ValueError(f"varlen_tile_plan: cu_seqlens must have >= 2 entries and start at 0, got {bounds[:4]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError("varlen_tile_plan: cu_seqlens must be non-decreasing")
    if device is None:
        device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    block_m = _default_block_m(head_dim, device) if block_m is None else int(block_m)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"varlen_tile_plan: block_m must be a power of two >= 16, got {block_m}")

    starts = torch.tensor(bounds[:-1], dtype=torch.int64)
    ends = torch.tensor(bounds[1:], dtype=torch.int64)
    n_q_tiles = (ends - starts + block_m - 1) // block_m          # empty segments get no tiles
    seg_of_tile = torch.repeat_interleave(torch.arange(len(starts)), n_q_tiles)
    first_tile = torch.cumsum(n_q_tiles, 0) - n_q_tiles
    tile_in_seg = torch.arange(int(n_q_tiles.sum())) - first_tile[seg_of_tile]
    tiles = torch.stack(
        (starts[seg_of_tile] + tile_in_seg * block_m, starts[seg_of_tile], ends[seg_of_tile]), dim=1
    )
    if bounds[-1] >= 2**31:
        raise ValueError("varlen_tile_plan: more than 2^31 tokens")
    return TilePlan(tiles.to(torch.int32).to(device), block_m)


@triton.jit
def _load_kv(base, keys, stride_t, offs_d, key_end, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             MASK_KEYS: tl.constexpr):
    """Load a (BLOCK_N, BLOCK_D) K or V tile; masks only what can be out of range (constexpr branches)."""
    ptrs = base + keys[:, None] * stride_t + offs_d[None, :]
    if MASK_KEYS:
        return tl.load(ptrs, mask=(keys[:, None] < key_end) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, key_start, key_end, offs_n, offs_d,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys [key_start, key_start + BLOCK_N)."""
    keys = (key_start + offs_n).to(tl.int64)
    k = _load_kv(k_base, keys, stride_kt, offs_d, key_end, HEAD_DIM, BLOCK_D, MASK_KEYS)
    qk = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION) * qk_scale
    if MASK_KEYS:
        qk = tl.where(keys[None, :] < key_end, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv(v_base, keys, stride_vt, offs_d, key_end, HEAD_DIM, BLOCK_D, MASK_KEYS)
    # P is rounded to V's dtype for the tensor-core dot, as HF rounds the softmax to q's dtype before P @ V.
    acc = mma(cast_to(p, v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _varlen_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tiles_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # The launcher measured the strides' alignment (_stride_align). Below 16 triton knows nothing about a
    # stride; x // A * A (exact, A divides x) shows the compiler the factor A, so loads stay vectorised.
    # (tl.multiple_of is dropped for scalars.)
    if STRIDE_ALIGN < 16:
        stride_qt = stride_qt // STRIDE_ALIGN * STRIDE_ALIGN
        stride_qh = stride_qh // STRIDE_ALIGN * STRIDE_ALIGN
        stride_kt = stride_kt // STRIDE_ALIGN * STRIDE_ALIGN
        stride_kh = stride_kh // STRIDE_ALIGN * STRIDE_ALIGN
        stride_vt = stride_vt // STRIDE_ALIGN * STRIDE_ALIGN
        stride_vh = stride_vh // STRIDE_ALIGN * STRIDE_ALIGN
        stride_ot = stride_ot // STRIDE_ALIGN * STRIDE_ALIGN
        stride_oh = stride_oh // STRIDE_ALIGN * STRIDE_ALIGN
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    q_start = tl.load(tiles_ptr + tile * 3)
    seg_start = tl.load(tiles_ptr + tile * 3 + 1)
    seg_end = tl.load(tiles_ptr + tile * 3 + 2)

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)
    q_mask = (offs_m[:, None] < seg_end) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)

    # Fold log2(e) into the scale so the softmax uses exp2; fp32 even if Inductor passes a double.
    qk_scale = tl.cast(qk_scale, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + head * stride_kh
    v_base = v_ptr + head * stride_vh

    # Full key tiles need no mask; only the segment's last, partial tile (if any) does.
    full_end = seg_start + ((seg_end - seg_start) // BLOCK_N) * BLOCK_N
    for key_start in range(seg_start, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, key_start, seg_end,
                                   offs_n, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                                   MASK_KEYS=False, DOT_PRECISION=DOT_PRECISION)
    if full_end < seg_end:
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, full_end, seg_end,
                                   offs_n, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                                   MASK_KEYS=True, DOT_PRECISION=DOT_PRECISION)

    # Every segment has >= 1 key, so l_i > 0 for real rows; rows past seg_end are never stored.
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             cast_to(out, out_ptr.dtype.element_ty), mask=q_mask)


@register_op("varlen_attention", mutates_args=("out",))
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: torch.Tensor, block_m: int,
                         scale: float, out: torch.Tensor) -> None:
    n_heads, head_dim = q.shape[1], q.shape[2]
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
               out.stride(1))
    launch = _launch_config(head_dim, block_m, q.dtype, q.device, _stride_align(*strides))
    grid = (tiles.shape[0], n_heads)
    kernel_launcher(_varlen_attn_kernel, grid)(
        q, k, v, out, tiles, *strides, scale * _LOG2_E,
        **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: Optional[float] = None, *, tile_plan: Optional[TilePlan] = None,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Non-causal attention within each ``cu_seqlens`` segment of packed q, k, v (T, H, D).

    q, k, v may be strided views (unit stride on D), e.g. slices of a packed qkv buffer, and must share
    shape and dtype. cu_seqlens: int32 (B+1,) from 0 to T. max_seqlen: the longest segment (an int; kept
    for API parity with flash-attn, the tile plan makes it unnecessary). scale defaults to D**-0.5.
    tile_plan: the result of ``varlen_tile_plan(cu_seqlens, D, device)``; build it once per batch and pass
    it to every layer, otherwise it is rebuilt here from cu_seqlens (a device-to-host copy on CUDA).
    Returns a new contiguous (T, H, D) tensor in q's dtype (or ``out``).

    Forward only: with grad mode on and an input that requires grad it raises ValueError (no output without
    its gradient); use a backend with a backward (``glm4v_fast.attention``: sdpa, torch_varlen, flash_attn).
    """
    op = "varlen_attention"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(f"{op}: the Triton attention kernel is forward-only and q, k or v requires grad; call it "
                         "under torch.no_grad() / torch.inference_mode(), or use an attention backend with a "
                         "backward (sdpa, torch_varlen, flash_attn)")
    check_launchable(op, q, k, v, cu_seqlens, out)
    check_dtype(op, "q", q, SUPPORTED_DTYPES)
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be (T, H, D), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} shape {tuple(t.shape)} != q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} dtype {t.dtype} != q dtype {q.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            raise ValueError(f"{op}: {name} must have unit stride on its last dim, got strides {t.stride()}")
    n_tokens, n_heads, head_dim = q.shape
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim must be in [1, {_MAX_HEAD_DIM}], got {head_dim}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D int32 tensor with >= 2 entries, got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if isinstance(max_seqlen, torch.Tensor) or int(max_seqlen) < 0:
        raise ValueError(f"{op}: max_seqlen must be a non-negative int, got {max_seqlen!r}")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    # Values of cu_seqlens are checked only where that is free (host memory): on a GPU it would sync.
    if cu_seqlens.device.type == "cpu":
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != n_tokens or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing from 0 to T={n_tokens}")
    if tile_plan is None:
        tile_plan = varlen_tile_plan(cu_seqlens, head_dim, q.device)
    tiles, block_m = tile_plan
    if tiles.device != q.device or tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 3:
        raise ValueError(f"{op}: tile_plan.tiles must be int32 (n, 3) on {q.device}")
    if not tiles.is_contiguous():
        tiles = tiles.contiguous()
    out = check_out(op, out, (n_tokens, n_heads, head_dim), q.dtype, q.device)
    if tiles.shape[0] > 0 and n_heads > 0:
        _varlen_attention_op(q, k, v, tiles, int(block_m), scale, out)
    return out


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               max_seqlen: int, scale: Optional[float] = None) -> torch.Tensor:
    """Pure-PyTorch twin: HF's eager path run per segment (fp32 softmax, rounded to q's dtype before P @ V)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bounds = _seqlens_host(cu_seqlens)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))     # (H, L, D)
        weights = torch.matmul(qs, ks.transpose(1, 2)) * scale
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        out[start:end] = torch.matmul(weights, vs).transpose(0, 1)
    return out


# GLM-4.1V's tower: 12 heads; q, k, v are (T, H, D) views of the packed (T, 3, H, D) qkv GEMM output.
_AOT_HEADS = 12
_AOT_HEAD_DIMS = (64, 72, 80, 128, _MAX_HEAD_DIM)


def aot_specs() -> list:
    """Every configuration the CUDA launcher picks, per dtype and head dim, for ``tests/test_aot.py``.

    Strides are those of the model's layout (q, k, v views of a packed qkv, a contiguous output), so the
    divisibility hints and STRIDE_ALIGN are what a real launch gives: at head dim 72 the head strides are
    multiples of 8, not 16. The fp16/bf16 configurations must compile without spills. fp32 (the ieee dot
    runs on FMA units) is compiled and its figures recorded, but it spills at every head dim (about 9 KB of
    stack per thread at head dim 128 on sm_90a), and ptxas takes tens of seconds on it.
    """
    from ._aot import AotSpec

    cuda = torch.device("cuda")
    specs = []
    for dtype, ty in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        size = torch.tensor([], dtype=dtype).element_size()
        for head_dim in _AOT_HEAD_DIMS:
            row = _AOT_HEADS * head_dim
            strides = {"stride_qt": 3 * row, "stride_qh": head_dim, "stride_kt": 3 * row, "stride_kh": head_dim,
                       "stride_vt": 3 * row, "stride_vh": head_dim, "stride_ot": row, "stride_oh": head_dim}
            # Byte offsets of the pointers from a (256-byte aligned) allocation.
            offsets = {"q_ptr": 0, "k_ptr": row * size, "v_ptr": 2 * row * size, "out_ptr": 0, "tiles_ptr": 0}
            block_m = _default_block_m(head_dim, cuda)
            launch = _launch_config(head_dim, block_m, dtype, cuda, _stride_align(*strides.values()))
            signature = {name: f"*{ty}" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
            signature["tiles_ptr"] = "*i32"
            signature.update({name: "i32" for name in strides})
            signature["qk_scale"] = "fp32"
            aligned = tuple([name for name, off in offsets.items() if off % 16 == 0]
                            + [name for name, value in strides.items() if value % 16 == 0])
            c = launch.constexprs
            specs.append(AotSpec(
                name=f"varlen_attention/{ty}/D={head_dim}", kernel=_varlen_attn_kernel, signature=signature,
                constexprs=c, num_warps=launch.num_warps, num_stages=launch.num_stages, aligned=aligned,
                no_spills=dtype != torch.float32, slow=dtype == torch.float32,
                extra={"config": f"M{c['BLOCK_M']} N{c['BLOCK_N']} D{c['BLOCK_D']} w{launch.num_warps} "
                               f"s{launch.num_stages} align{c['STRIDE_ALIGN']}"},
            ))
    return specs
