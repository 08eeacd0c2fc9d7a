"""RMSNorm with HF Glm4vRMSNorm numerics, optionally fused with the residual add that precedes it.

    y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)

The normalised row is rounded to x's dtype *before* the weight multiply (Liger's "llama" casting mode), and
the product follows torch's type promotion of ``weight * y``: the result dtype is
``promote_types(weight.dtype, x.dtype)``. Multiplying two bf16 (or fp16) values in fp32 is exact, so doing
the product in fp32 and rounding once reproduces torch's bf16 multiply bit for bit.

With a residual, s = x + residual is formed in x's dtype (fp32 add, one rounding, as torch does), stored as
the new residual stream, and normalised. This is the add+norm between attention and MLP in every block.

Forward: one row per program with the whole row in registers (BLOCK = next_pow2(C)): at C=1536 a row is
3 KB in bf16, so the kernel is bound by HBM traffic and needs no second pass. No per-row statistics are
stored, so inference writes nothing it does not need.

Backward (when an input requires grad), with n = x * rstd and dn = dy * weight, all in fp32:

    dx = rstd * (dn - n * mean(dn * n)) (+ ds, the gradient of the residual stream s, with a residual)
    dweight = sum over rows of dy * n.to(x.dtype)

The rounding of n to x's dtype is treated as the identity (as torch's autograd treats ``.to``). rstd is
recomputed from the row, which is in registers anyway, instead of being stored by the forward. Each program
walks a contiguous range of rows and keeps its dweight partial sum in registers; torch sums the
(programs, C) partials. With a residual, x and residual receive the same gradient.

Compile figures (sm_90a, triton 3.9's ptxas; ``aot_specs``): at C=1536 neither kernel spills in any dtype
(backward: 57-60 registers at 8 warps). Rows wider than 8192 (BLOCK=16384, 16 warps) keep a whole row of
several fp32 arrays per thread and the backward spills (bf16: 80-112 bytes); GLM never normalises rows that
wide, so the backward stays single-pass rather than growing a chunked variant.
"""
from __future__ import annotations

from typing import Optional

import torch
from ._aot import AotSpec
from ._utils import (TRITON_TYPES, as_rows, cast_to, check_dtype, check_launchable, check_no_out_under_grad, check_out,
                     kernel_launcher, needs_grad, next_pow2, register_op, row_num_warps, row_programs, tl, triton)

__all__ = ["rms_norm", "rms_norm_reference", "aot_specs"]


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


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr, ds_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr,
    n_rows, n_cols, rows_per_program, stride_dy, stride_ds, stride_x, stride_dx, eps,
    HAS_DS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # x is the normalised input: the plain x, or s = x + residual when the forward had a residual.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r in range(row_start, row_end):
        row = tl.cast(r, tl.int64)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + tl.cast(eps, tl.float32))
        n = xf * rstd
        # The forward multiplied the weight by n rounded to x's dtype.
        dw += dy * cast_to(n, x_ptr.dtype.element_ty).to(tl.float32)
        dn = dy * w
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
        if HAS_DS:
            dx += tl.load(ds_ptr + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dx + cols, cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


@register_op("rms_norm", mutates_args=("out",))
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    n_rows, n_cols = x.shape
    block = next_pow2(n_cols)
    kernel_launcher(_rms_norm_kernel, (n_rows,))(
        x, x, weight, out, out,
        n_cols, x.stride(0), 0, out.stride(0), 0, eps,
        HAS_RESIDUAL=False, BLOCK=block, num_warps=row_num_warps(block),
    )


@register_op("add_rms_norm", mutates_args=("out", "residual_out"))
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     out: torch.Tensor, residual_out: torch.Tensor) -> None:
    n_rows, n_cols = x.shape
    block = next_pow2(n_cols)
    kernel_launcher(_rms_norm_kernel, (n_rows,))(
        x, residual, weight, out, residual_out,
        n_cols, x.stride(0), residual.stride(0), out.stride(0), residual_out.stride(0), eps,
        HAS_RESIDUAL=True, BLOCK=block, num_warps=row_num_warps(block),
    )


@register_op("rms_norm_backward", mutates_args=("dx", "dw_partial"))
def _rms_norm_backward_op(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                          eps: float, dx: torch.Tensor, dw_partial: torch.Tensor) -> None:
    n_rows, n_cols = x.shape
    n_programs = dw_partial.shape[0]
    block = next_pow2(n_cols)
    kernel_launcher(_rms_norm_backward_kernel, (n_programs,))(
        dy, ds if ds is not None else dy, x, weight, dx, dw_partial,
        n_rows, n_cols, triton.cdiv(n_rows, n_programs), dy.stride(0), ds.stride(0) if ds is not None else 0,
        x.stride(0), dx.stride(0), eps,
        HAS_DS=ds is not None, BLOCK=block, num_warps=row_num_warps(block),
    )


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor],
             out: Optional[torch.Tensor], residual_out: Optional[torch.Tensor]):
    op = "rms_norm"
    n_cols = x.shape[-1]
    x2 = as_rows(op, "x", x, n_cols)
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    y = check_out(op, out, tuple(x.shape), torch.promote_types(weight.dtype, x.dtype), x.device)
    y2 = y.view(-1, n_cols)
    if residual is None:
        if x2.shape[0] > 0:
            _rms_norm_op(x2, weight, eps, y2)
        return y, None
    r2 = as_rows(op, "residual", residual, n_cols)
    s = check_out(op, residual_out, tuple(x.shape), x.dtype, x.device)
    if x2.shape[0] > 0:
        _add_rms_norm_op(x2, r2, weight, eps, y2, s.view(-1, n_cols))
    return y, s


def _backward(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(dx, dweight) for y = rms_norm(x) given dy, plus ds (the gradient flowing into x directly) when given."""
    op = "rms_norm backward"
    n_cols = x.shape[-1]
    x2 = as_rows(op, "x", x, n_cols)
    dy2 = as_rows(op, "dy", dy, n_cols)
    ds2 = as_rows(op, "ds", ds, n_cols) if ds is not None else None
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    partial = torch.empty((row_programs(n_rows, x.device), n_cols), dtype=torch.float32, device=x.device)
    _rms_norm_backward_op(dy2, ds2, x2, weight, eps, dx.view(-1, n_cols), partial)
    return dx, partial.sum(0).to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """Autograd for rms_norm(x, weight, eps, residual): outputs y, or (y, s) with a residual."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, s = _forward(x, weight, eps, residual, None, None)
        # The backward needs the normalised input: x itself, or the new residual stream s.
        ctx.save_for_backward(x if residual is None else s, weight)
        ctx.eps = eps
        ctx.has_residual = residual is not None
        ctx.set_materialize_grads(False)
        return y if residual is None else (y, s)

    @staticmethod
    def backward(ctx, dy, ds=None):
        normed_input, weight = ctx.saved_tensors
        if dy is None:
            dx, dw = ds, None
        else:
            dx, dw = _backward(dy, ds, normed_input, weight, ctx.eps)
        return dx, dw, (dx if ctx.has_residual else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None, *,
             out: Optional[torch.Tensor] = None, residual_out: Optional[torch.Tensor] = None):
    """HF Glm4vRMSNorm of x (..., C), optionally of x + residual.

    Returns y, or (y, s) with s = x + residual when ``residual`` is given. y has x's shape and dtype
    ``promote_types(weight.dtype, x.dtype)``; s has x's dtype. Rows may have any stride as long as columns
    are contiguous. ``out`` / ``residual_out`` are optional preallocated contiguous outputs of x's shape
    (not allowed when a gradient is needed).

    Differentiable in x, weight and residual (Triton backward kernel); without grad it runs the plain forward.
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

    if needs_grad(x, weight, residual):
        check_no_out_under_grad(op, out=out, residual_out=residual_out)
        return _RMSNormFunction.apply(x, weight, residual, eps)
    y, s = _forward(x, weight, eps, residual, out, residual_out)
    return y if residual is None else (y, s)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """Pure-PyTorch twin: exactly HF Glm4vRMSNorm.forward (and the bf16 residual add before it).

    Differentiable by torch's autograd, which makes it the twin of the backward kernel too. float64 input
    keeps float64 statistics (a true float64 reference); every other dtype computes them in float32, as HF.
    """
    if residual is not None:
        s = x + residual
        return rms_norm_reference(s, weight, eps), s
    input_dtype = x.dtype
    hidden = x.to(torch.promote_types(x.dtype, torch.float32))
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs

AOT_WIDTHS = (1536, 4096, 10944, 13696)
GLM_WIDTH = 1536   # the vision tower's hidden size: every RMSNorm of GLM-4.1V/4.5V/4.6V runs at it


def aot_specs() -> list[AotSpec]:
    """Every configuration the launchers can pick on CUDA: forward (with and without residual) and backward
    (with and without a residual-stream gradient), for each dtype and width, plus the bf16-activations /
    fp32-weight promotion case. Real launches see 16-divisible pointers, row strides and widths."""
    specs = []
    dtype_pairs = [(d, d) for d in (torch.float32, torch.float16, torch.bfloat16)] + [(torch.bfloat16, torch.float32)]
    for x_dtype, w_dtype in dtype_pairs:
        xt, wt = TRITON_TYPES[x_dtype], TRITON_TYPES[w_dtype]
        yt = TRITON_TYPES[torch.promote_types(x_dtype, w_dtype)]
        low = x_dtype != torch.float32
        tag = xt if xt == wt else f"{xt}-w{wt}"
        widths = AOT_WIDTHS if xt == wt else (GLM_WIDTH,)
        for width in widths:
            block = next_pow2(width)
            warps = row_num_warps(block)
            no_spills = low and width == GLM_WIDTH
            for residual in (False, True):
                specs.append(AotSpec(
                    name=f"rms_norm/{tag}/C={width}/{'residual' if residual else 'plain'}",
                    kernel=_rms_norm_kernel,
                    signature={"x_ptr": f"*{xt}", "r_ptr": f"*{xt}", "w_ptr": f"*{wt}", "y_ptr": f"*{yt}",
                               "s_ptr": f"*{xt}" if residual else f"*{yt}", "n_cols": "i32", "stride_x": "i32",
                               "stride_r": "i32", "stride_y": "i32", "stride_s": "i32", "eps": "fp32"},
                    constexprs={"HAS_RESIDUAL": residual, "BLOCK": block},
                    num_warps=warps, num_stages=3,
                    # Without a residual, stride_r and stride_s are passed as 0 (divisible by 16).
                    aligned=("x_ptr", "r_ptr", "w_ptr", "y_ptr", "s_ptr", "n_cols", "stride_x", "stride_r",
                             "stride_y", "stride_s"),
                    no_spills=no_spills,
                ))
            for has_ds in (False, True):
                specs.append(AotSpec(
                    name=f"rms_norm_backward/{tag}/C={width}/{'ds' if has_ds else 'no-ds'}",
                    kernel=_rms_norm_backward_kernel,
                    signature={"dy_ptr": f"*{yt}", "ds_ptr": f"*{xt}" if has_ds else f"*{yt}", "x_ptr": f"*{xt}",
                               "w_ptr": f"*{wt}", "dx_ptr": f"*{xt}", "dw_ptr": "*fp32", "n_rows": "i32",
                               "n_cols": "i32", "rows_per_program": "i32", "stride_dy": "i32",
                               "stride_ds": "i32", "stride_x": "i32", "stride_dx": "i32", "eps": "fp32"},
                    constexprs={"HAS_DS": has_ds, "BLOCK": block},
                    num_warps=warps, num_stages=3,
                    aligned=("dy_ptr", "ds_ptr", "x_ptr", "w_ptr", "dx_ptr", "dw_ptr", "n_cols", "stride_dy",
                             "stride_ds", "stride_x", "stride_dx"),
                    no_spills=no_spills,
                ))
    return specs
