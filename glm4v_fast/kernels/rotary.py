"""2D vision rotary embedding, applied over the full head dim (HF ``apply_rotary_pos_emb_vision``).

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

computed in fp32 and rounded once to x's dtype.

Table contract: cos/sin are per-token fp32 tables of angles ``freqs`` (T, D/2), given either as
``cos(freqs)`` / ``sin(freqs)`` of shape (T, D/2), or in HF's layout ``cat(freqs, freqs)`` of shape (T, D).
Both halves of an HF table are equal, so the kernel reads only the first half (the rotation then pairs column
i with column i + D/2 through one angle). A (T, D) table whose halves differ is not a rotary table and is
refused; that is checked for CPU tables only, because on CUDA it would cost a device-to-host sync.

x is read through its strides, so q and k can come straight out of the packed qkv projection
(``qkv.view(T, 3, H, D)[:, 0]``) without a copy. Because q's and k's heads sit next to each other in that
buffer ([q heads | k heads | v heads], head-major), ``apply_rotary_qk`` rotates both in a single launch by
treating them as 2H heads of one strided (T, 2H, D) view.

Grid: one program per block of BLOCK_T tokens. It loads the tokens' cos/sin rows once, then loops over all
heads (2H for q and k), so each table byte is read from memory once per forward, not once per head.

Backward: the rotation is orthogonal, so dx is dout rotated by -theta: the same kernel with sin negated
(``CONJUGATE``). ``apply_rotary_qk``'s backward writes the whole (T, 3*H*D) gradient of qkv in one buffer:
the rotated-back q and k gradients and v's gradient beside them. The tables get no gradient (they are
derived from positions); passing tables that require grad is refused when a gradient is needed.
"""
from __future__ import annotations

from typing import Optional

import torch
from ._aot import AotSpec
from ._utils import (SUPPORTED_DTYPES, TRITON_TYPES, cast_to, check_dtype, check_launchable, check_no_out_under_grad,
                     check_out, kernel_launcher, needs_grad, next_pow2, register_op, tl, triton)

__all__ = ["apply_rotary", "apply_rotary_qk", "apply_rotary_reference", "apply_rotary_qk_reference", "aot_specs"]

MAX_HEAD_DIM = 256


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    n_tokens, n_heads, stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    HALF: tl.constexpr,        # D // 2; constexpr so the column masks are known to be uniform per vector
    BLOCK_HALF: tl.constexpr,  # next_pow2(HALF)
    BLOCK_T: tl.constexpr,
    CONJUGATE: tl.constexpr,   # rotate by -theta (the backward)
):
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    col = tl.arange(0, BLOCK_HALF)
    mask = (tok[:, None] < n_tokens) & (col[None, :] < HALF)

    # One angle per (token, column pair): the first half of an HF table, read once for all heads.
    cos = tl.load(cos_ptr + tok[:, None] * stride_ct + col[None, :], mask=mask, other=0.0)
    sin = tl.load(sin_ptr + tok[:, None] * stride_st + col[None, :], mask=mask, other=0.0)
    if CONJUGATE:
        sin = -sin
    x_rows = x_ptr + tok[:, None] * stride_xt + col[None, :]
    o_rows = out_ptr + tok[:, None] * stride_ot + col[None, :]
    for head in range(n_heads):
        x_head = x_rows + head * stride_xh
        x1 = tl.load(x_head, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_head + HALF, mask=mask, other=0.0).to(tl.float32)
        # Same association as HF: (x * cos) + (rotate_half(x) * sin).
        out1 = x1 * cos + (-x2) * sin
        out2 = x2 * cos + x1 * sin
        o_head = o_rows + head * stride_oh
        tl.store(o_head, cast_to(out1, out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_head + HALF, cast_to(out2, out_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_tokens: int, half: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, num_warps)."""
    if device.type == "cpu":
        # The interpreter runs programs one after another: fewer, larger programs are much faster.
        return min(next_pow2(max(n_tokens, 1)), 64), 4
    # Long sequences: 16 tokens per program. Short ones (one image is ~1-4k tokens): 4, so that the grid
    # still covers every SM. Warps sized for 8 elements of a (BLOCK_T, BLOCK_HALF) tile per thread.
    block_t = 16 if n_tokens >= 8192 else 4
    return block_t, max(1, min(8, block_t * next_pow2(half) // 256))


@register_op("rotary", mutates_args=("out",))
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, conjugate: bool) -> None:
    n_tokens, n_heads, head_dim = x.shape
    half = head_dim // 2
    block_t, num_warps = _launch_config(n_tokens, half, x.device)
    kernel_launcher(_rotary_kernel, (triton.cdiv(n_tokens, block_t),))(
        x, cos, sin, out,
        n_tokens, n_heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_T=block_t, CONJUGATE=conjugate, num_warps=num_warps,
    )


def _check_tables(op: str, cos: torch.Tensor, sin: torch.Tensor, n_tokens: int, head_dim: int) -> None:
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[0] != n_tokens or t.shape[1] not in (half, head_dim):
            raise ValueError(f"{op}: {name} must be ({n_tokens}, {half}) or HF's ({n_tokens}, {head_dim}), "
                             f"got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{op}: {name} must be float32 (HF computes the rotation in fp32), got {t.dtype}")
        if t.stride(1) != 1:
            raise ValueError(f"{op}: {name} must have unit stride on its last dim")
        # Free on host memory; on CUDA the comparison would sync, and under torch.compile it is data-dependent.
        if (t.shape[1] == head_dim and t.device.type == "cpu" and not torch.compiler.is_compiling()
                and not torch.equal(t[:, :half], t[:, half:])):
            raise ValueError(f"{op}: a ({n_tokens}, {head_dim}) {name} table must be HF's cat(freqs, freqs) layout "
                             f"(equal halves); pass the ({n_tokens}, {half}) table of the angles instead")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: {name} requires grad, but the rotary tables get no gradient here; detach them")


def _check_x(op: str, x: torch.Tensor) -> None:
    check_dtype(op, "x", x, SUPPORTED_DTYPES)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (T, H, D), got shape {tuple(x.shape)}")
    head_dim = x.shape[2]
    if head_dim % 2 != 0 or not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim must be even and in [2, {MAX_HEAD_DIM}], got {head_dim}")
    if x.stride(2) != 1:
        raise ValueError(f"{op}: x must have unit stride on its last dim, got strides {x.stride()}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, conjugate: bool) -> None:
    if x.shape[0] > 0 and x.shape[1] > 0:
        _rotary_op(x, cos, sin, out, conjugate)


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _rotate(x, cos, sin, out, False)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        if dout.stride(2) != 1:
            dout = dout.contiguous()
        dx = torch.empty(dout.shape, dtype=dout.dtype, device=dout.device)
        _rotate(dout, cos, sin, dx, True)
        return dx, None, None


class _RotaryQKFunction(torch.autograd.Function):
    """(rotated q|k as one (T, 2H, D) tensor, v as a view of qkv) from qkv (T, 3*H*D)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, num_heads):
        n_tokens, width = qkv.shape
        head_dim = width // (3 * num_heads)
        rotated = torch.empty((n_tokens, 2 * num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        _rotate(qkv[:, : 2 * num_heads * head_dim].unflatten(1, (2 * num_heads, head_dim)), cos, sin, rotated, False)
        ctx.save_for_backward(cos, sin)
        ctx.shape = (n_tokens, num_heads, head_dim)
        ctx.set_materialize_grads(False)   # q|k or v may not reach the loss: their gradient is then None
        return rotated, qkv[:, 2 * num_heads * head_dim:].unflatten(1, (num_heads, head_dim))

    @staticmethod
    def backward(ctx, drotated, dv):
        cos, sin = ctx.saved_tensors
        n_tokens, num_heads, head_dim = ctx.shape
        n_qk = 2 * num_heads * head_dim
        dtype, device = (drotated if drotated is not None else dv).dtype, cos.device
        # One buffer for the whole gradient of qkv: q and k rotated back by -theta, v's gradient beside them.
        dqkv = torch.empty((n_tokens, 3 * num_heads * head_dim), dtype=dtype, device=device)
        if drotated is None:
            dqkv[:, :n_qk].zero_()
        else:
            if drotated.stride(2) != 1:
                drotated = drotated.contiguous()
            _rotate(drotated, cos, sin, dqkv[:, :n_qk].unflatten(1, (2 * num_heads, head_dim)), True)
        if dv is None:
            dqkv[:, n_qk:].zero_()
        else:
            dqkv[:, n_qk:].copy_(dv.flatten(1))
        return dqkv, None, None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate x (T, H, D) by per-token fp32 tables cos/sin, (T, D/2) or HF's (T, D); returns a new (T, H, D).

    x may be any strided view with unit stride on D (e.g. ``qkv.view(T, 3, H, D)[:, 0]``). The result is
    contiguous (or written into ``out``, a contiguous (T, H, D) tensor of x's dtype) and in x's dtype.
    Differentiable in x (the backward rotates by -theta); without grad it runs the plain forward.
    """
    op = "apply_rotary"
    check_launchable(op, x, cos, sin, out)
    _check_x(op, x)
    n_tokens, n_heads, head_dim = x.shape
    _check_tables(op, cos, sin, n_tokens, head_dim)
    if needs_grad(x):
        check_no_out_under_grad(op, out=out)
        return _RotaryFunction.apply(x, cos, sin)
    out = check_out(op, out, (n_tokens, n_heads, head_dim), x.dtype, x.device)
    _rotate(x, cos, sin, out, False)
    return out


def apply_rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, *,
                    out: Optional[torch.Tensor] = None):
    """Rotate q and k of a packed qkv projection (T, 3*H*D) in one launch.

    qkv's rows are ``[q heads | k heads | v heads]`` (HF ``qkv.reshape(T, 3, H, D)``); rows may be strided,
    columns must be contiguous. cos/sin: fp32 (T, D/2), or HF's (T, D). Returns ``(q, k, v)``, each
    (T, H, D): q and k are rotated copies (views into one new contiguous (T, 2H, D) tensor, or into ``out``
    if given), v is a view of qkv. Differentiable in qkv: the backward returns qkv's gradient in one buffer.
    """
    op = "apply_rotary_qk"
    if qkv.dim() != 2:
        raise ValueError(f"{op}: qkv must be (T, 3*H*D), got shape {tuple(qkv.shape)}")
    num_heads = int(num_heads)
    if num_heads <= 0 or qkv.shape[1] % (3 * num_heads) != 0:
        raise ValueError(f"{op}: qkv width {qkv.shape[1]} is not 3 * num_heads ({num_heads}) * head_dim")
    if qkv.stride(1) != 1:
        raise ValueError(f"{op}: qkv must have unit column stride, got strides {qkv.stride()}")
    check_launchable(op, qkv, cos, sin, out)
    n_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (3 * num_heads)
    # Heads 0..H-1 are q and H..2H-1 are k, at column h*D of each row: one strided (T, 2H, D) view.
    qk = qkv[:, : 2 * num_heads * head_dim].unflatten(1, (2 * num_heads, head_dim))
    _check_x(op, qk)
    _check_tables(op, cos, sin, n_tokens, head_dim)
    if needs_grad(qkv):
        check_no_out_under_grad(op, out=out)
        rotated, v = _RotaryQKFunction.apply(qkv, cos, sin, num_heads)
    else:
        rotated = check_out(op, out, (n_tokens, 2 * num_heads, head_dim), qkv.dtype, qkv.device)
        _rotate(qk, cos, sin, rotated, False)
        v = qkv[:, 2 * num_heads * head_dim:].unflatten(1, (num_heads, head_dim))
    return rotated[:, :num_heads], rotated[:, num_heads:], v


def _full_table(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return torch.cat((t, t), dim=-1) if t.shape[-1] * 2 == head_dim else t


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch twin: HF ``apply_rotary_pos_emb_vision`` for one tensor (fp32 math, cast back).

    Takes (T, D) tables in HF layout, or (T, D/2) tables of the angles (expanded to cat(t, t)).
    Differentiable by torch's autograd (the twin of the backward kernel). float64 input keeps float64 math
    (a true float64 reference); every other dtype computes in float32, as HF.
    """
    orig_dtype = x.dtype
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    cos = _full_table(cos, x.shape[-1]).unsqueeze(-2).to(compute)
    sin = _full_table(sin, x.shape[-1]).unsqueeze(-2).to(compute)
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return ((xf * cos) + (rotated * sin)).to(orig_dtype)


def apply_rotary_qk_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int):
    """Pure-PyTorch twin of :func:`apply_rotary_qk`: HF's reshape/unbind, then the rotation of q and k."""
    n_tokens = qkv.shape[0]
    q, k, v = qkv.reshape(n_tokens, 3, num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    return apply_rotary_reference(q, cos, sin), apply_rotary_reference(k, cos, sin), v


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs

AOT_HEAD_DIMS = (64, 72, 80, 128, MAX_HEAD_DIM)
GLM_HEAD_DIM = 128
GLM_HEADS = 12      # GLM-4.1V's vision tower: 12 heads of 128


def aot_specs() -> list[AotSpec]:
    """Every CUDA configuration of the rotary launcher: dtype x head dim x BLOCK_T x direction.

    Aligned as in a real GLM launch of apply_rotary_qk: x is the packed qkv buffer (row stride 3*H*D, head
    stride D), the output and its gradient are contiguous (T, 2H, D), the tables are HF's (T, D) (row
    stride D). Strides that are multiples of D are 16-divisible only when D is (not at D=72).
    """
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xt = TRITON_TYPES[dtype]
        for head_dim in AOT_HEAD_DIMS:
            half = head_dim // 2
            strides = {"stride_xt": 3 * GLM_HEADS * head_dim, "stride_xh": head_dim, "stride_ct": head_dim,
                       "stride_st": head_dim, "stride_ot": 2 * GLM_HEADS * head_dim, "stride_oh": head_dim}
            aligned = ("x_ptr", "cos_ptr", "sin_ptr", "out_ptr") + tuple(k for k, v in strides.items() if v % 16 == 0)
            for n_tokens in (1024, 32768):   # the two BLOCK_T choices
                block_t, warps = _launch_config(n_tokens, half, torch.device("cuda"))
                for conjugate in (False, True):
                    specs.append(AotSpec(
                        name=f"rotary{'_backward' if conjugate else ''}/{xt}/D={head_dim}/BLOCK_T={block_t}",
                        kernel=_rotary_kernel,
                        signature={"x_ptr": f"*{xt}", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": f"*{xt}",
                                   "n_tokens": "i32", "n_heads": "i32", **{k: "i32" for k in strides}},
                        constexprs={"HALF": half, "BLOCK_HALF": next_pow2(half), "BLOCK_T": block_t,
                                    "CONJUGATE": conjugate},
                        num_warps=warps, num_stages=3, aligned=aligned,
                        no_spills=dtype != torch.float32 and head_dim == GLM_HEAD_DIM,
                        extra={"head_dim": head_dim},
                    ))
    return specs
