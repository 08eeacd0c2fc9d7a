"""2D vision rotary embedding, applied over the full head dim (HF ``apply_rotary_pos_emb_vision``).

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

computed in fp32 and rounded once to x's dtype. cos/sin are the per-token (T, D) fp32 tables that HF builds
(``cat(freqs, freqs)``); the kernel reads both halves rather than assuming they repeat, so any table in HF
layout works.

x is read through its strides, so q and k can come straight out of the packed qkv projection
(``qkv.view(T, 3, H, D)[:, 0]``) without a copy. Because q's and k's heads sit next to each other in that
buffer ([q heads | k heads | v heads], head-major), ``apply_rotary_qk`` rotates both in a single launch by
treating them as 2H heads of one strided (T, 2H, D) view.

Grid: (token blocks, heads). A program rotates BLOCK_T tokens of one head; the cos/sin rows it needs are
shared by the H programs of that token block and stay in L2.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton

from ._utils import SUPPORTED_DTYPES, cast_to, check_dtype, check_launchable, check_out, next_pow2, \
    register_op, tl, triton

__all__ = ["apply_rotary", "apply_rotary_qk", "apply_rotary_reference", "apply_rotary_qk_reference"]


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    n_tokens, stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    HALF: tl.constexpr,        # D // 2; constexpr so the column masks are known to be uniform per vector
    BLOCK_HALF: tl.constexpr,  # next_pow2(HALF)
    BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    tok = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    col = tl.arange(0, BLOCK_HALF)
    mask = (tok[:, None] < n_tokens) & (col[None, :] < HALF)

    x_row = x_ptr + tok[:, None] * stride_xt + head * stride_xh + col[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    c_row = cos_ptr + tok[:, None] * stride_ct + col[None, :]
    s_row = sin_ptr + tok[:, None] * stride_st + col[None, :]
    cos1 = tl.load(c_row, mask=mask, other=0.0)
    cos2 = tl.load(c_row + HALF, mask=mask, other=0.0)
    sin1 = tl.load(s_row, mask=mask, other=0.0)
    sin2 = tl.load(s_row + HALF, mask=mask, other=0.0)

    # Same association as HF: (x * cos) + (rotate_half(x) * sin).
    out1 = x1 * cos1 + (-x2) * sin1
    out2 = x2 * cos2 + x1 * sin2

    o_row = out_ptr + tok[:, None] * stride_ot + head * stride_oh + col[None, :]
    tl.store(o_row, cast_to(out1, out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF, cast_to(out2, out_ptr.dtype.element_ty), mask=mask)


def _block_t(n_tokens: int, device: torch.device) -> int:
    if device.type == "cpu":
        # The interpreter runs programs one after another: fewer, larger programs are much faster.
        return min(next_pow2(max(n_tokens, 1)), 64)
    # 16 tokens x 64 fp32 pairs per program: 16 KB of loads in flight per head, enough for the HBM
    # pipeline without spilling (flash-attn's rotary uses 4-8 tokens x 2 heads; similar bytes).
    return 16


@register_op("rotary", mutates_args=("out",))
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    n_tokens, n_heads, head_dim = x.shape
    half = head_dim // 2
    block_t = _block_t(n_tokens, x.device)
    grid = (triton.cdiv(n_tokens, block_t), n_heads)
    wrap_triton(_rotary_kernel)[grid](
        x, cos, sin, out,
        n_tokens, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_T=block_t, num_warps=4,
    )


def _check_tables(op: str, cos: torch.Tensor, sin: torch.Tensor, n_tokens: int, head_dim: int) -> None:
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or tuple(t.shape) != (n_tokens, head_dim):
            raise ValueError(f"{op}: {name} must be ({n_tokens}, {head_dim}), got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{op}: {name} must be float32 (HF computes the rotation in fp32), got {t.dtype}")
        if t.stride(1) != 1:
            raise ValueError(f"{op}: {name} must have unit stride on its last dim")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate x (T, H, D) by per-token cos/sin (T, D) fp32 in HF layout; returns a new (T, H, D) tensor.

    x may be any strided view with unit stride on D (e.g. ``qkv.view(T, 3, H, D)[:, 0]``). The result is
    contiguous (or written into ``out``, a contiguous (T, H, D) tensor of x's dtype) and in x's dtype.
    """
    op = "apply_rotary"
    check_launchable(op, x, cos, sin, out)
    check_dtype(op, "x", x, SUPPORTED_DTYPES)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (T, H, D), got shape {tuple(x.shape)}")
    n_tokens, n_heads, head_dim = x.shape
    if head_dim % 2 != 0 or head_dim == 0:
        raise ValueError(f"{op}: head dim must be even and > 0, got {head_dim}")
    if x.stride(2) != 1:
        raise ValueError(f"{op}: x must have unit stride on its last dim, got strides {x.stride()}")
    _check_tables(op, cos, sin, n_tokens, head_dim)
    out = check_out(op, out, (n_tokens, n_heads, head_dim), x.dtype, x.device)
    if n_tokens > 0 and n_heads > 0:
        _rotary_op(x, cos, sin, out)
    return out


def apply_rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, *,
                    out: Optional[torch.Tensor] = None):
    """Rotate q and k of a packed qkv projection (T, 3*H*D) in one launch.

    qkv's rows are ``[q heads | k heads | v heads]`` (HF ``qkv.reshape(T, 3, H, D)``); rows may be strided,
    columns must be contiguous. Returns ``(q, k, v)``, each (T, H, D): q and k are rotated copies (views
    into one new contiguous (T, 2H, D) tensor, or into ``out`` if given), v is a view of qkv.
    """
    op = "apply_rotary_qk"
    if qkv.dim() != 2:
        raise ValueError(f"{op}: qkv must be (T, 3*H*D), got shape {tuple(qkv.shape)}")
    num_heads = int(num_heads)
    if num_heads <= 0 or qkv.shape[1] % (3 * num_heads) != 0:
        raise ValueError(f"{op}: qkv width {qkv.shape[1]} is not 3 * num_heads ({num_heads}) * head_dim")
    if qkv.stride(1) != 1:
        raise ValueError(f"{op}: qkv must have unit column stride, got strides {qkv.stride()}")
    n_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (3 * num_heads)
    # Heads 0..H-1 are q and H..2H-1 are k, at column h*D of each row: one strided (T, 2H, D) view.
    qk = qkv.as_strided((n_tokens, 2 * num_heads, head_dim), (qkv.stride(0), head_dim, 1), qkv.storage_offset())
    rotated = apply_rotary(qk, cos, sin, out=out)
    v = qkv.as_strided((n_tokens, num_heads, head_dim), (qkv.stride(0), head_dim, 1),
                       qkv.storage_offset() + 2 * num_heads * head_dim)
    return rotated[:, :num_heads], rotated[:, num_heads:], v


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch twin: HF ``apply_rotary_pos_emb_vision`` for one tensor (fp32 math, cast back)."""
    orig_dtype = x.dtype
    xf = x.float()
    cos = cos.unsqueeze(-2).float()
    sin = sin.unsqueeze(-2).float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return ((xf * cos) + (rotated * sin)).to(orig_dtype)


def apply_rotary_qk_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int):
    """Pure-PyTorch twin of :func:`apply_rotary_qk`: HF's reshape/unbind, then the rotation of q and k."""
    n_tokens = qkv.shape[0]
    q, k, v = qkv.reshape(n_tokens, 3, num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    return apply_rotary_reference(q, cos, sin), apply_rotary_reference(k, cos, sin), v
