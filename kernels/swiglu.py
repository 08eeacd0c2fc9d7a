"""SwiGLU activation, silu(gate) * up, with torch's numerics for ``F.silu(gate) * up``.

torch evaluates silu on bf16/fp16 in fp32 and rounds the result to the input dtype; the product of two
bf16 (fp16) tensors is then formed in fp32 and rounded once. The kernel does exactly that: silu in fp32,
round to the dtype, multiply the two rounded values in fp32 (exact for 8- and 11-bit mantissas), round.

gate and up may be column views of one merged (T, 2I) gate_up projection (row stride 2I, unit column
stride), so the MLP never splits its GEMM output with a copy. The grid tiles rows x columns: at the merger's
I = 13696 a whole-row program would mask 16% of a 16384-wide block, and a 2D tile keeps every program the
same size for any width.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import wrap_triton

from ._utils import cast_to, check_dtype, check_launchable, check_out, next_pow2, register_op, tl, triton

__all__ = ["swiglu", "swiglu_reference"]


@triton.jit
def _swiglu_kernel(
    gate_ptr, up_ptr, out_ptr,
    n_rows, n_cols, stride_g, stride_u, stride_o,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)

    g = tl.load(gate_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0)
    # silu(g) = g / (1 + exp(-g)), the form torch uses; rounded to the activation dtype as F.silu returns it.
    act = cast_to(g / (1.0 + tl.exp(-g)), out_ptr.dtype.element_ty)
    y = act.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], cast_to(y, out_ptr.dtype.element_ty), mask=mask)


def _tile(n_cols: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps)."""
    if device.type == "cpu":
        # Interpreter: few large programs (each program costs a fixed Python overhead).
        return 16, min(next_pow2(n_cols), 4096), 4
    # 4 x 1024 elements per program: 8 KB of bf16 per operand, 16 elements per thread at 8 warps.
    return 4, min(next_pow2(n_cols), 1024), 8


@register_op("swiglu", mutates_args=("out",))
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    n_rows, n_cols = gate.shape
    block_m, block_n, warps = _tile(n_cols, gate.device)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    wrap_triton(_swiglu_kernel)[grid](
        gate, up, out, n_rows, n_cols, gate.stride(0), up.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(gate) * up for gate, up of shape (T, I) (or any (..., I)); returns a new contiguous tensor.

    gate and up must share shape and dtype; rows may be strided (e.g. ``gate_up[:, :I]``, ``gate_up[:, I:]``)
    as long as columns are contiguous. ``out``: optional preallocated contiguous output.
    """
    op = "swiglu"
    check_launchable(op, gate, up, out)
    check_dtype(op, "gate", gate)
    if up.shape != gate.shape:
        raise ValueError(f"{op}: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise ValueError(f"{op}: gate dtype {gate.dtype} != up dtype {up.dtype}")
    if gate.dim() < 1 or gate.shape[-1] == 0:
        raise ValueError(f"{op}: inputs need a non-empty last dimension, got shape {tuple(gate.shape)}")
    n_cols = gate.shape[-1]
    g2 = gate if gate.dim() == 2 and gate.stride(1) == 1 else gate.reshape(-1, n_cols)
    u2 = up if up.dim() == 2 and up.stride(1) == 1 else up.reshape(-1, n_cols)
    g2 = g2 if g2.stride(1) == 1 else g2.contiguous()
    u2 = u2 if u2.stride(1) == 1 else u2.contiguous()
    out = check_out(op, out, tuple(gate.shape), gate.dtype, gate.device)
    if g2.shape[0] > 0:
        _swiglu_op(g2, u2, out.view(-1, n_cols))
    return out


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch twin: ``F.silu(gate) * up`` as HF's Glm4VisionMlp evaluates it."""
    return torch.nn.functional.silu(gate) * up
