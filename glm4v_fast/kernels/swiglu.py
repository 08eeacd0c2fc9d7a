"""SwiGLU activation, silu(gate) * up, with torch's numerics for ``F.silu(gate) * up``.

torch evaluates silu on bf16/fp16 in fp32 and rounds the result to the input dtype; the product of two
bf16 (fp16) tensors is then formed in fp32 and rounded once. The kernel does exactly that: silu in fp32,
round to the dtype, multiply the two rounded values in fp32 (exact for 8- and 11-bit mantissas), round.

gate and up may be column views of one merged (T, 2I) gate_up projection (row stride 2I, unit column
stride), so the MLP never splits its GEMM output with a copy. The grid tiles rows x columns: at the merger's
I = 13696 a whole-row program would mask 16% of a 16384-wide block, and a 2D tile keeps every program the
same size for any width.

Backward (when an input requires grad), with sig = sigmoid(gate) in fp32:

    dup = dy * silu(gate).to(dtype)          (the rounded activation the forward multiplied by)
    dgate = dy * up * sig * (1 + gate * (1 - sig))

silu is recomputed from gate rather than stored. When gate and up are the two column halves of one (T, 2I)
gate_up buffer (the MLP's one GEMM output), the backward writes both halves of that buffer's gradient in one
tensor, instead of autograd zero-filling a (T, 2I) gradient per half and adding them (eager mode; under
torch.compile the separate-input form is traced and Inductor plans the buffers).
"""
from __future__ import annotations

from typing import Optional

import torch
from ._aot import AotSpec
from ._utils import (TRITON_TYPES, cast_to, check_dtype, check_launchable, check_no_out_under_grad, check_out,
                     kernel_launcher, needs_grad, next_pow2, register_op, tl, triton)

__all__ = ["swiglu", "swiglu_reference", "aot_specs"]


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


@triton.jit
def _swiglu_backward_kernel(
    dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    n_rows, n_cols, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)

    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    act = cast_to(g * sig, dgate_ptr.dtype.element_ty).to(tl.float32)
    dgate = dy * u * (sig * (1.0 + g * (1.0 - sig)))
    tl.store(dgate_ptr + rows[:, None] * stride_dg + cols[None, :], cast_to(dgate, dgate_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dup_ptr + rows[:, None] * stride_du + cols[None, :], cast_to(dy * act, dup_ptr.dtype.element_ty),
             mask=mask)


_CUDA_TILE = (4, 1024, 8)


def _tile(n_cols: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps); forward and backward use the same tile."""
    if device.type == "cpu":
        # Interpreter: few large programs (each program costs a fixed Python overhead).
        return 16, min(next_pow2(n_cols), 4096), 4
    # 4 x 1024 elements per program: 8 KB of bf16 per operand, 16 elements per thread at 8 warps. One tile
    # for every width (narrower rows are masked), so the launcher has a single CUDA configuration.
    return _CUDA_TILE


@register_op("swiglu", mutates_args=("out",))
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    n_rows, n_cols = gate.shape
    block_m, block_n, warps = _tile(n_cols, gate.device)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    kernel_launcher(_swiglu_kernel, grid)(
        gate, up, out, n_rows, n_cols, gate.stride(0), up.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )


@register_op("swiglu_backward", mutates_args=("dgate", "dup"))
def _swiglu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor,
                        dup: torch.Tensor) -> None:
    n_rows, n_cols = gate.shape
    block_m, block_n, warps = _tile(n_cols, gate.device)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    kernel_launcher(_swiglu_backward_kernel, grid)(
        dy, gate, up, dgate, dup, n_rows, n_cols,
        dy.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    t2 = t if t.dim() == 2 and t.stride(1) == 1 else t.reshape(-1, n_cols)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _forward(gate: torch.Tensor, up: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    n_cols = gate.shape[-1]
    g2, u2 = _rows(gate, n_cols), _rows(up, n_cols)
    out = check_out("swiglu", out, tuple(gate.shape), gate.dtype, gate.device)
    if g2.shape[0] > 0:
        _swiglu_op(g2, u2, out.view(-1, n_cols))
    return out


def _backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor) -> None:
    n_cols = gate.shape[-1]
    g2 = _rows(gate, n_cols)
    if g2.shape[0] > 0:
        _swiglu_backward_op(_rows(dy, n_cols), g2, _rows(up, n_cols), dgate, dup)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _forward(gate, up, None)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        n_cols = gate.shape[-1]
        dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
        _backward(dy, gate, up, dgate.view(-1, n_cols), dup.view(-1, n_cols))
        return dgate, dup


class _SwiGLUGateUpFunction(torch.autograd.Function):
    """swiglu(gate_up[:, :I], gate_up[:, I:]) with gate_up as the input: one (T, 2I) gradient buffer."""

    @staticmethod
    def forward(ctx, gate_up, width):
        ctx.save_for_backward(gate_up)
        ctx.width = width
        return _forward(gate_up[:, :width], gate_up[:, width:], None)

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        width = ctx.width
        dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        _backward(dy, gate_up[:, :width], gate_up[:, width:], dgate_up[:, :width], dgate_up[:, width:])
        return dgate_up, None


def _gate_up_buffer(gate: torch.Tensor, up: torch.Tensor) -> Optional[torch.Tensor]:
    """The (T, 2I) tensor whose column halves gate and up are (``gate_up[:, :I]``, ``gate_up[:, I:]``), or None."""
    base = gate._base
    if base is None or up._base is not base or gate.dim() != 2 or base.dim() != 2:
        return None
    width = gate.shape[1]
    if tuple(base.shape) != (gate.shape[0], 2 * width) or base.stride(1) != 1:
        return None
    if gate.stride() != base.stride() or up.stride() != base.stride():
        return None
    if gate.data_ptr() != base.data_ptr() or up.data_ptr() != base.data_ptr() + width * base.element_size():
        return None
    return base


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(gate) * up for gate, up of shape (T, I) (or any (..., I)); returns a new contiguous tensor.

    gate and up must share shape and dtype; rows may be strided (e.g. ``gate_up[:, :I]``, ``gate_up[:, I:]``)
    as long as columns are contiguous. ``out``: optional preallocated contiguous output (not allowed when a
    gradient is needed). Differentiable in gate and up; without grad it runs the plain forward.
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
    if needs_grad(gate, up):
        check_no_out_under_grad(op, out=out)
        gate_up = None if torch.compiler.is_compiling() else _gate_up_buffer(gate, up)
        if gate_up is not None:
            return _SwiGLUGateUpFunction.apply(gate_up, gate.shape[1])
        return _SwiGLUFunction.apply(gate, up)
    return _forward(gate, up, out)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch twin: ``F.silu(gate) * up`` as HF's Glm4VisionMlp evaluates it (and, through torch's
    autograd, the twin of the backward kernel)."""
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs

AOT_WIDTHS = (1536, 4096, 10944, 13696)
GLM_WIDTHS = (4096, 10944, 13696)   # block MLP (GLM-4.1V), merger MLP (GLM-4.5V, GLM-4.1V)


def aot_specs() -> list[AotSpec]:
    """Forward and backward for each dtype and width; the CUDA tile is the same for every width.

    Aligned as a real launch on the MLP's gate_up buffer: gate = gate_up[:, :I] and up = gate_up[:, I:]
    (row stride 2I, up's pointer I elements in, 16-byte aligned for these widths), contiguous outputs.
    """
    block_m, block_n, warps = _CUDA_TILE
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = TRITON_TYPES[dtype]
        for width in AOT_WIDTHS:
            no_spills = dtype != torch.float32 and width in GLM_WIDTHS
            specs.append(AotSpec(
                name=f"swiglu/{t}/I={width}", kernel=_swiglu_kernel,
                signature={"gate_ptr": f"*{t}", "up_ptr": f"*{t}", "out_ptr": f"*{t}", "n_rows": "i32",
                           "n_cols": "i32", "stride_g": "i32", "stride_u": "i32", "stride_o": "i32"},
                constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=3,
                aligned=("gate_ptr", "up_ptr", "out_ptr", "n_cols", "stride_g", "stride_u", "stride_o"),
                no_spills=no_spills,
            ))
            specs.append(AotSpec(
                name=f"swiglu_backward/{t}/I={width}", kernel=_swiglu_backward_kernel,
                signature={"dy_ptr": f"*{t}", "gate_ptr": f"*{t}", "up_ptr": f"*{t}", "dgate_ptr": f"*{t}",
                           "dup_ptr": f"*{t}", "n_rows": "i32", "n_cols": "i32", "stride_dy": "i32",
                           "stride_g": "i32", "stride_u": "i32", "stride_dg": "i32", "stride_du": "i32"},
                constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=3,
                aligned=("dy_ptr", "gate_ptr", "up_ptr", "dgate_ptr", "dup_ptr", "n_cols", "stride_dy", "stride_g",
                         "stride_u", "stride_dg", "stride_du"),
                no_spills=no_spills,
            ))
    return specs
