"""RMSNorm with HF Glm4vRMSNorm numerics, optionally fused with the residual add that precedes it.

    y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)

The normalised row is rounded to x's dtype *before* the weight multiply (Liger's "llama" casting mode), and
the product follows torch's type promotion of ``weight * y``: the result dtype is
``promote_types(weight.dtype, x.dtype)``. Multiplying two bf16 (or fp16) values in fp32 is exact, so doing
the product in fp32 and rounding once reproduces torch's bf16 multiply bit for bit.

With a residual, s = x + residual is formed in x's dtype (fp32 add, one rounding, as torch does), stored as
the new residual stream, and normalised. This is the add+norm between attention and MLP in every block.

The kernel keeps one row per program with the whole row in registers (BLOCK = next_pow2(C)): at C=1536 a
row is 3 KB in bf16, so the kernel is bound by HBM traffic and needs no second pass. No per-row statistics
are stored: inference never needs them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton

from ._utils import (cast_to, check_dtype, check_launchable, check_out, next_pow2, register_op, row_num_warps,
                     tl, triton)

__all__ = ["rms_norm", "rms_norm_reference"]


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr,
    n_cols, stride_x, stride_r, stride_y, stride_s, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 row offsets: at 32k tokens x 13696 columns the element index passes 2^31.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols

    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The residual stream lives in x's dtype: add in fp32, round once, and normalise the rounded sum.
        x = cast_to(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s + cols, x, mask=mask)

    xf = x.to(tl.float32)
    # eps arrives as a Python float; Inductor may pass it as fp64, which would drag the math to fp64.
    mean_sq = tl.sum(xf * xf, axis=0) / n_cols
    rstd = tl.rsqrt(mean_sq + tl.cast(eps, tl.float32))
    normed = cast_to(xf * rstd, x_ptr.dtype.element_ty)

    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


@register_op("rms_norm", mutates_args=("out",))
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    n_rows, n_cols = x.shape
    block = next_pow2(n_cols)
    wrap_triton(_rms_norm_kernel)[(n_rows,)](
        x, x, weight, out, out,
        n_cols, x.stride(0), 0, out.stride(0), 0, eps,
        HAS_RESIDUAL=False, BLOCK=block, num_warps=row_num_warps(block),
    )


@register_op("add_rms_norm", mutates_args=("out", "residual_out"))
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     out: torch.Tensor, residual_out: torch.Tensor) -> None:
    n_rows, n_cols = x.shape
    block = next_pow2(n_cols)
    wrap_triton(_rms_norm_kernel)[(n_rows,)](
        x, residual, weight, out, residual_out,
        n_cols, x.stride(0), residual.stride(0), out.stride(0), residual_out.stride(0), eps,
        HAS_RESIDUAL=True, BLOCK=block, num_warps=row_num_warps(block),
    )


def _as_rows(op: str, name: str, t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """View t as (rows, n_cols) with unit column stride; only copies when no such view exists."""
    if t.shape[-1] != n_cols:
        raise ValueError(f"{op}: {name} has last dim {t.shape[-1]}, expected {n_cols}")
    t2 = t.reshape(-1, n_cols) if t.dim() != 2 else t
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None, *,
             out: Optional[torch.Tensor] = None, residual_out: Optional[torch.Tensor] = None):
    """HF Glm4vRMSNorm of x (..., C), optionally of x + residual.

    Returns y, or (y, s) with s = x + residual when ``residual`` is given. y has x's shape and dtype
    ``promote_types(weight.dtype, x.dtype)``; s has x's dtype. Rows may have any stride as long as columns
    are contiguous. ``out`` / ``residual_out`` are optional preallocated contiguous outputs of x's shape.
    """
    op = "rms_norm"
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_launchable(op, x, weight, residual, out, residual_out)
    check_dtype(op, "x", x)
    check_dtype(op, "weight", weight)
    n_cols = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n_cols:
        raise ValueError(f"{op}: weight must be ({n_cols},), got {tuple(weight.shape)}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"{op}: residual dtype {residual.dtype} != x dtype {x.dtype}")
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")

    x2 = _as_rows(op, "x", x, n_cols)
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    y = check_out(op, out, tuple(x.shape), torch.promote_types(weight.dtype, x.dtype), x.device)
    y2 = y.view(-1, n_cols)
    if residual is None:
        if x2.shape[0] > 0:
            _rms_norm_op(x2, weight, eps, y2)
        return y
    r2 = _as_rows(op, "residual", residual, n_cols)
    s = check_out(op, residual_out, tuple(x.shape), x.dtype, x.device)
    if x2.shape[0] > 0:
        _add_rms_norm_op(x2, r2, weight, eps, y2, s.view(-1, n_cols))
    return y, s


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """Pure-PyTorch twin: exactly HF Glm4vRMSNorm.forward (and the bf16 residual add before it)."""
    if residual is not None:
        s = x + residual
        return rms_norm_reference(s, weight, eps), s
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)
