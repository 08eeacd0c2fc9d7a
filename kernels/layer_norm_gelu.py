"""LayerNorm followed by exact (erf) GELU, fused: the merger's ``GELU(LayerNorm_4096(x))``.

Numerics of ``nn.GELU()(nn.LayerNorm(C)(x))`` in torch: LayerNorm computes mean and biased variance in fp32,
normalises, applies weight and bias in fp32 and rounds the result to x's dtype; GELU upcasts that rounded
value to fp32, evaluates ``0.5 * v * (1 + erf(v / sqrt(2)))`` and rounds again. The kernel keeps both
roundings, so in bf16 it reproduces the two-op sequence rather than a more precise fused value.

One row per program with the row in registers (C=4096: 8 KB bf16); the unfused pair reads and writes the
activation twice, the fused kernel once.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton

from ._utils import (cast_to, check_dtype, check_launchable, check_out, next_pow2, register_op, row_num_warps,
                     tl, triton)

__all__ = ["layer_norm_gelu", "layer_norm_gelu_reference"]


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


@register_op("layer_norm_gelu", mutates_args=("out",))
def _layer_norm_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        out: torch.Tensor) -> None:
    n_rows, n_cols = x.shape
    block = next_pow2(n_cols)
    wrap_triton(_layer_norm_gelu_kernel)[(n_rows,)](
        x, weight, bias, out, n_cols, x.stride(0), out.stride(0), eps,
        BLOCK=block, num_warps=row_num_warps(block),
    )


def layer_norm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """exact-erf GELU(LayerNorm(x)) over the last dim of x (..., C); weight and bias (C,) in x's dtype.

    Rows may be strided (unit column stride). Returns a new contiguous tensor of x's shape and dtype (or
    ``out``).
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
    x2 = x if x.dim() == 2 else x.reshape(-1, n_cols)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    out = check_out(op, out, tuple(x.shape), x.dtype, x.device)
    if x2.shape[0] > 0:
        _layer_norm_gelu_op(x2, weight, bias, eps, out.view(-1, n_cols))
    return out


def layer_norm_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              eps: float = 1e-5) -> torch.Tensor:
    """Pure-PyTorch twin: ``nn.GELU()(nn.LayerNorm(C, eps)(x))`` as the HF merger runs it."""
    normed = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return torch.nn.functional.gelu(normed)
