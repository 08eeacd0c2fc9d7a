"""LayerNorm followed by exact (erf) GELU, fused: the merger's ``GELU(LayerNorm_4096(x))``.

Numerics of ``nn.GELU()(nn.LayerNorm(C)(x))`` in torch: LayerNorm computes mean and biased variance in fp32,
normalises, applies weight and bias in fp32 and rounds the result to x's dtype; GELU upcasts that rounded
value to fp32, evaluates ``0.5 * v * (1 + erf(v / sqrt(2)))`` and rounds again. The kernel keeps both
roundings, so in bf16 it reproduces the two-op sequence rather than a more precise fused value.

One row per program with the row in registers (C=4096: 8 KB bf16); the unfused pair reads and writes the
activation twice, the fused kernel once.

Backward (when an input requires grad), all in fp32, with xhat = (x - mean) * rstd and v the LayerNorm
output rounded to x's dtype (what GELU saw in the forward):

    dv = dy * (Phi(v) + v * phi(v))                       (exact GELU's derivative)
    dweight = sum over rows of dv * xhat,  dbias = sum over rows of dv
    dx = rstd * (dv*w - mean(dv*w) - xhat * mean(dv*w * xhat))

mean and rstd are recomputed from the row in registers rather than stored by the forward. Each program walks
a range of rows and keeps its dweight/dbias partial sums in registers; torch sums the (programs, C) partials.

Compile figures (sm_90a, triton 3.9's ptxas; ``aot_specs``): at GLM's C=4096 neither kernel spills. At
C > 8192 (BLOCK=16384) the single-pass backward spills heavily (bf16 ~1.8 KB, fp32 ~5.7 KB per thread);
GLM's merger LayerNorm is 4096 wide, so no chunked variant exists for wider rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from ._aot import AotSpec
from ._utils import (TRITON_TYPES, as_rows, cast_to, check_dtype, check_launchable, check_no_out_under_grad, check_out,
                     kernel_launcher, needs_grad, next_pow2, register_op, row_num_warps, row_programs, tl, triton)

__all__ = ["layer_norm_gelu", "layer_norm_gelu_reference", "aot_specs"]


@triton.jit
def _layer_norm_gelu_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    n_cols, stride_x, stride_y, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols

    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centered = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / n_cols
    rstd = tl.rsqrt(var + tl.cast(eps, tl.float32))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # LayerNorm's output is materialised in x's dtype before GELU sees it.
    normed = cast_to(centered * rstd * w + b, y_ptr.dtype.element_ty).to(tl.float32)
    y = 0.5 * normed * (1.0 + tl.math.erf(normed * 0.7071067811865476))
    tl.store(y_ptr + row * stride_y + cols, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_gelu_backward_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, dx_ptr, dw_ptr, db_ptr,
    n_rows, n_cols, rows_per_program, stride_dy, stride_x, stride_dx, eps,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r in range(row_start, row_end):
        row = tl.cast(r, tl.int64)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        centered = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / n_cols + tl.cast(eps, tl.float32))
        xhat = centered * rstd
        v = cast_to(xhat * w + b, x_ptr.dtype.element_ty).to(tl.float32)
        # d/dv of 0.5 * v * (1 + erf(v / sqrt(2))) = Phi(v) + v * phi(v)
        cdf = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
        pdf = tl.exp(-0.5 * v * v) * 0.3989422804014327
        dv = dy * (cdf + v * pdf)
        dw += dv * xhat
        db += dv
        dxhat = dv * w
        dx = rstd * (dxhat - tl.sum(dxhat, axis=0) / n_cols - xhat * (tl.sum(dxhat * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + row * stride_dx + cols, cast_to(dx, dx_ptr.dtype.element_ty), mask=mask)
    offset = pid.to(tl.int64) * n_cols + cols
    tl.store(dw_ptr + offset, dw, mask=mask)
    tl.store(db_ptr + offset, db, mask=mask)


@register_op("layer_norm_gelu", mutates_args=("out",))
def _layer_norm_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        out: torch.Tensor) -> None:
    n_rows, n_cols = x.shape
    block = next_pow2(n_cols)
    kernel_launcher(_layer_norm_gelu_kernel, (n_rows,))(
        x, weight, bias, out, n_cols, x.stride(0), out.stride(0), eps,
        BLOCK=block, num_warps=row_num_warps(block),
    )


@register_op("layer_norm_gelu_backward", mutates_args=("dx", "dw_partial", "db_partial"))
def _layer_norm_gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 eps: float, dx: torch.Tensor, dw_partial: torch.Tensor,
                                 db_partial: torch.Tensor) -> None:
    n_rows, n_cols = x.shape
    n_programs = dw_partial.shape[0]
    block = next_pow2(n_cols)
    kernel_launcher(_layer_norm_gelu_backward_kernel, (n_programs,))(
        dy, x, weight, bias, dx, dw_partial, db_partial,
        n_rows, n_cols, triton.cdiv(n_rows, n_programs), dy.stride(0), x.stride(0), dx.stride(0), eps,
        BLOCK=block, num_warps=row_num_warps(block),
    )


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
             out: Optional[torch.Tensor]) -> torch.Tensor:
    n_cols = x.shape[-1]
    x2 = as_rows("layer_norm_gelu", "x", x, n_cols)
    out = check_out("layer_norm_gelu", out, tuple(x.shape), x.dtype, x.device)
    if x2.shape[0] > 0:
        _layer_norm_gelu_op(x2, weight.contiguous(), bias.contiguous(), eps, out.view(-1, n_cols))
    return out


class _LayerNormGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.save_for_backward(x, weight, bias)
        ctx.eps = eps
        return _forward(x, weight, bias, eps, None)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        op = "layer_norm_gelu backward"
        n_cols = x.shape[-1]
        x2 = as_rows(op, "x", x, n_cols)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        n_rows = x2.shape[0]
        if n_rows == 0:
            return dx, torch.zeros_like(weight), torch.zeros_like(bias), None
        n_programs = row_programs(n_rows, x.device)
        dw = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
        db = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
        _layer_norm_gelu_backward_op(as_rows(op, "dy", dy, n_cols), x2, weight.contiguous(), bias.contiguous(),
                                     ctx.eps, dx.view(-1, n_cols), dw, db)
        return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype), None


def layer_norm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """exact-erf GELU(LayerNorm(x)) over the last dim of x (..., C); weight and bias (C,) in x's dtype.

    Rows may be strided (unit column stride). Returns a new contiguous tensor of x's shape and dtype (or
    ``out``, not allowed when a gradient is needed). Differentiable in x, weight and bias; without grad it
    runs the plain forward.
    """
    op = "layer_norm_gelu"
    check_launchable(op, x, weight, bias, out)
    check_dtype(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n_cols = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dim() != 1 or t.shape[0] != n_cols:
            raise ValueError(f"{op}: {name} must be ({n_cols},), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} dtype {t.dtype} != x dtype {x.dtype}")
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    if needs_grad(x, weight, bias):
        check_no_out_under_grad(op, out=out)
        return _LayerNormGeluFunction.apply(x, weight, bias, eps)
    return _forward(x, weight, bias, eps, out)


def layer_norm_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              eps: float = 1e-5) -> torch.Tensor:
    """Pure-PyTorch twin: ``nn.GELU()(nn.LayerNorm(C, eps)(x))`` as the HF merger runs it (and, through torch's
    autograd, the twin of the backward kernel)."""
    normed = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return torch.nn.functional.gelu(normed)


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs

AOT_WIDTHS = (1536, 4096, 10944, 13696)
GLM_WIDTH = 4096   # the merger's LayerNorm runs at out_hidden_size (4096 in GLM-4.1V/4.5V/4.6V)


def aot_specs() -> list[AotSpec]:
    """Forward and backward for each dtype and width (BLOCK = next_pow2(C), warps by row_num_warps)."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = TRITON_TYPES[dtype]
        for width in AOT_WIDTHS:
            block = next_pow2(width)
            warps = row_num_warps(block)
            no_spills = dtype != torch.float32 and width == GLM_WIDTH
            specs.append(AotSpec(
                name=f"layer_norm_gelu/{t}/C={width}", kernel=_layer_norm_gelu_kernel,
                signature={"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": f"*{t}", "n_cols": "i32",
                           "stride_x": "i32", "stride_y": "i32", "eps": "fp32"},
                constexprs={"BLOCK": block}, num_warps=warps, num_stages=3,
                aligned=("x_ptr", "w_ptr", "b_ptr", "y_ptr", "n_cols", "stride_x", "stride_y"),
                no_spills=no_spills,
            ))
            specs.append(AotSpec(
                name=f"layer_norm_gelu_backward/{t}/C={width}", kernel=_layer_norm_gelu_backward_kernel,
                signature={"dy_ptr": f"*{t}", "x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "dx_ptr": f"*{t}",
                           "dw_ptr": "*fp32", "db_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
                           "rows_per_program": "i32", "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32",
                           "eps": "fp32"},
                constexprs={"BLOCK": block}, num_warps=warps, num_stages=3,
                aligned=("dy_ptr", "x_ptr", "w_ptr", "b_ptr", "dx_ptr", "dw_ptr", "db_ptr", "n_cols", "stride_dy",
                         "stride_x", "stride_dx"),
                no_spills=no_spills,
            ))
    return specs
