"""Backward of every Triton kernel against torch's autograd through its PyTorch twin.

Rules (as for the forward, tests/_kernel_checks.py):
- float32: each gradient within 1e-5 relative (max|ours - twin| / max|twin|) of the twin's autograd in fp32;
- bf16/fp16: max|ours - ref| <= 2 * max|twin - ref| + atol, where ref is the twin's autograd in float32 on
  the same (rounded) inputs and output gradients, twin the same in the low precision, plus a relative-norm
  bound. The twins themselves are checked with ``torch.autograd.gradcheck`` in float64.
Shapes are odd (T = 1, 7, 33; C = 123, 1536) and inputs are strided views (gate/up column views of one
buffer, q/k/v rows of a packed qkv projection), as the model passes them: the leaf is the whole buffer and
the function under test slices it, so the gradient is checked through the view. On CPU the kernels run in
the Triton interpreter, so shapes stay small; the device cases are described in tests/_kernel_checks.py.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import glm4v_fast.kernels as K

from _kernel_checks import ALL_DTYPES, DEVICES, assert_matches, needs_triton

pytestmark = needs_triton


def _leaf(t):
    return t.detach().clone().requires_grad_(t.requires_grad)


def _grads(fn, inputs, grad_outputs, wrt):
    """Gradients of sum(out_i * grad_output_i) w.r.t. inputs[i] for i in wrt; inputs are fresh leaves."""
    leaves = [_leaf(t) if isinstance(t, torch.Tensor) else t for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, grad_outputs) if g is not None)
    return torch.autograd.grad(loss, [leaves[i] for i in wrt])


def check_grads(kernel, twin, inputs, grad_outputs, wrt, dtype):
    """Compare the kernel's gradients with the twin's, by the rules above."""
    ours = _grads(kernel, inputs, grad_outputs, wrt)
    twin_low = _grads(twin, inputs, grad_outputs, wrt)
    if dtype == torch.float32:
        ref = twin_low                      # fp32: against the twin's own autograd
    else:
        up = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        ref = _grads(twin, up, [g.float() if g is not None else None for g in grad_outputs], wrt)
    for i, (o, t, r) in enumerate(zip(ours, twin_low, ref)):
        assert_matches(o, t, r, dtype, what=f"gradient {i}")


# ----------------------------------------------------------------------------------------------------------
# RMSNorm (+ residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows,cols", [(1, 1536), (7, 123), pytest.param(33, 1536, marks=pytest.mark.slow)])
def test_rms_norm_backward(device, dtype, residual, rows, cols):
    # x and residual are column slices of wider buffers (strided rows).
    xb = torch.randn(rows, cols + 5, device=device, dtype=dtype, requires_grad=True)
    rb = torch.randn(rows, cols + 3, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.5 * torch.randn(cols, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(rows, cols, device=device, dtype=dtype)
    if residual:
        ds = torch.randn(rows, cols, device=device, dtype=dtype)
        check_grads(lambda xb, w, rb: K.rms_norm(xb[:, 2:cols + 2], w, 1e-5, rb[:, :cols]),
                    lambda xb, w, rb: K.rms_norm_reference(xb[:, 2:cols + 2], w, 1e-5, rb[:, :cols]),
                    [xb, w, rb], [dy, ds], [0, 1, 2], dtype)
    else:
        check_grads(lambda xb, w: K.rms_norm(xb[:, 2:cols + 2], w, 1e-5),
                    lambda xb, w: K.rms_norm_reference(xb[:, 2:cols + 2], w, 1e-5), [xb, w], [dy], [0, 1], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", ["y", "s"])
def test_rms_norm_backward_one_output_used(used, device):
    # The last block's residual stream is never read: its gradient arrives as None (and vice versa).
    x, r = (torch.randn(7, 123, device=device, requires_grad=True) for _ in range(2))
    w = torch.randn(123, device=device, requires_grad=True)
    g = torch.randn(7, 123, device=device)
    grads = []
    for fn in (K.rms_norm, K.rms_norm_reference):
        y, s = fn(x, w, 1e-6, r)
        out = y if used == "y" else s
        grads.append(torch.autograd.grad((out * g).sum(), (x, w, r), allow_unused=True))
    for ours, twin in zip(*grads):
        if twin is None or (used == "s" and twin.shape == w.shape):
            assert ours is None or not ours.any()
            continue
        torch.testing.assert_close(ours, twin, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_backward_weight_promotion(device):
    # bf16 activations with an fp32 weight: y is fp32 (torch's promotion), dx bf16, dweight fp32.
    x = torch.randn(7, 123, dtype=torch.bfloat16, device=device, requires_grad=True)
    w = (1 + 0.5 * torch.randn(123, device=device)).requires_grad_()
    dy = torch.randn(7, 123, device=device)
    check_grads(lambda x, w: K.rms_norm(x, w, 1e-5), lambda x, w: K.rms_norm_reference(x, w, 1e-5),
                [x, w], [dy], [0, 1], torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Rotary


def _tables(n_tokens, head_dim, device, half=False):
    angles = torch.rand(n_tokens, head_dim // 2, device=device) * 40
    if half:
        return angles.cos(), angles.sin()
    full = torch.cat((angles, angles), -1)
    return full.cos(), full.sin()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n_tokens", [1, 7, 33])
@pytest.mark.parametrize("head_dim,half_table", [(64, False), (80, True)])
def test_apply_rotary_backward(device, dtype, n_tokens, head_dim, half_table):
    heads = 3
    qkv = torch.randn(n_tokens, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    cos, sin = _tables(n_tokens, head_dim, device, half_table)
    dy = torch.randn(n_tokens, heads, head_dim, device=device, dtype=dtype)
    # k: a strided view of the packed buffer.
    check_grads(lambda t: K.apply_rotary(t[:, 1], cos, sin), lambda t: K.apply_rotary_reference(t[:, 1], cos, sin),
                [qkv], [dy], [0], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n_tokens", [1, 7, 33])
def test_apply_rotary_qk_backward(device, dtype, n_tokens):
    heads, head_dim = 2, 64
    # Row-strided qkv: a column slice of a wider buffer.
    buf = torch.randn(n_tokens, 3 * heads * head_dim + 8, device=device, dtype=dtype, requires_grad=True)
    cos, sin = _tables(n_tokens, head_dim, device)
    douts = [torch.randn(n_tokens, heads, head_dim, device=device, dtype=dtype) for _ in range(3)]
    check_grads(lambda b: K.apply_rotary_qk(b[:, 8:], cos, sin, heads),
                lambda b: K.apply_rotary_qk_reference(b[:, 8:], cos, sin, heads), [buf], douts, [0], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", ["qk", "v", "q"])
def test_apply_rotary_qk_backward_partial_use(used, device):
    # Outputs that do not reach the loss get None gradients: their part of dqkv must be zero, not garbage.
    heads, head_dim, n_tokens = 2, 16, 5
    qkv = torch.randn(n_tokens, 3 * heads * head_dim, device=device, requires_grad=True)
    cos, sin = _tables(n_tokens, head_dim, device)
    g = torch.randn(n_tokens, heads, head_dim, device=device)
    grads = []
    for fn in (K.apply_rotary_qk, K.apply_rotary_qk_reference):
        q, k, v = fn(qkv, cos, sin, heads)
        loss = {"qk": (q * g).sum() + (k * g).sum(), "v": (v * g).sum(), "q": (q * g).sum()}[used]
        grads.append(torch.autograd.grad(loss, qkv)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_tables_that_require_grad_are_refused(device):
    x = torch.randn(4, 2, 16, device=device, requires_grad=True)
    cos, sin = _tables(4, 16, device)
    with pytest.raises(ValueError, match="requires grad"):
        K.apply_rotary(x, cos.requires_grad_(), sin)


# ----------------------------------------------------------------------------------------------------------
# SwiGLU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 1536), (7, 123), (33, 123)])
def test_swiglu_backward_gate_up_views(device, dtype, rows, width):
    gate_up = (3 * torch.randn(rows, 2 * width, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(rows, width, device=device, dtype=dtype)

    def run(fn):
        return lambda gu: fn(gu[:, :width], gu[:, width:])

    check_grads(run(K.swiglu), run(K.swiglu_reference), [gate_up], [dy], [0], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_backward_writes_one_gate_up_gradient(device):
    # gate/up halves of one buffer: the gradient of the buffer comes out of the kernel in one piece, not as
    # two zero-filled slices that autograd adds.
    gate_up = torch.randn(5, 2 * 40, device=device, requires_grad=True)
    y = K.swiglu(gate_up[:, :40], gate_up[:, 40:])
    assert type(y.grad_fn).__name__.startswith("_SwiGLUGateUpFunction")
    assert not [n for n in (y.grad_fn.next_functions or ()) if n[0] is not None and "Slice" in type(n[0]).__name__]
    other = gate_up[1:, :]   # halves of a row slice are not the halves of gate_up itself
    z = K.swiglu(other[:, :40], other[:, 40:])
    assert type(z.grad_fn).__name__.startswith("_SwiGLUFunction")


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_backward_separate_inputs_and_leading_dims(device):
    gate = (3 * torch.randn(2, 3, 50, device=device)).requires_grad_()
    up = torch.randn(2, 3, 50, device=device, requires_grad=True)
    check_grads(K.swiglu, K.swiglu_reference, [gate, up], [torch.randn(2, 3, 50, device=device)], [0, 1],
                torch.float32)


# ----------------------------------------------------------------------------------------------------------
# LayerNorm + GELU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 123), (7, 1536), pytest.param(33, 123, marks=pytest.mark.slow)])
def test_layer_norm_gelu_backward(device, dtype, rows, cols):
    xb = (2 * torch.randn(rows, cols + 4, device=device) + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(cols, device=device)).to(dtype).requires_grad_()
    b = (0.2 * torch.randn(cols, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(rows, cols, device=device, dtype=dtype)
    check_grads(lambda xb, w, b: K.layer_norm_gelu(xb[:, 4:], w, b, 1e-5),
                lambda xb, w, b: K.layer_norm_gelu_reference(xb[:, 4:], w, b, 1e-5), [xb, w, b], [dy], [0, 1, 2], dtype)


# ----------------------------------------------------------------------------------------------------------
# The twins are correct derivatives: gradcheck in float64


@pytest.mark.slow
def test_twins_gradcheck_float64():
    kw = dict(dtype=torch.float64, requires_grad=True)
    x, r, w, b = torch.randn(5, 12, **kw), torch.randn(5, 12, **kw), torch.randn(12, **kw), torch.randn(12, **kw)
    assert torch.autograd.gradcheck(lambda x, w: K.rms_norm_reference(x, w, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda x, w, r: K.rms_norm_reference(x, w, 1e-5, r), (x, w, r))
    assert torch.autograd.gradcheck(lambda x, w, b: K.layer_norm_gelu_reference(x, w, b, 1e-5), (x, w, b))
    assert torch.autograd.gradcheck(K.swiglu_reference, (x, r))
    cos, sin = (t.double() for t in _tables(5, 8, "cpu", half=True))
    qkv = torch.randn(5, 3 * 2 * 8, **kw)
    assert torch.autograd.gradcheck(lambda t: K.apply_rotary_qk_reference(t, cos, sin, 2), (qkv,))
    assert torch.autograd.gradcheck(lambda t: K.apply_rotary_reference(t, cos, sin), (qkv.view(5, 6, 8),))


# ----------------------------------------------------------------------------------------------------------
# Grad modes, out=, torch.compile, dispatch


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _all_ops(x, w, r, qkv, cos, sin, gu, b):
    y, s = K.rms_norm(x, w, 1e-5, r)
    q, k, v = K.apply_rotary_qk(qkv, cos, sin, 2)
    z = K.swiglu(gu[:, :16], gu[:, 16:])
    m = K.layer_norm_gelu(z, w[:16], b)
    return y, s, q, k, v, z, m


def _all_inputs(requires_grad, device="cpu"):
    t = [torch.randn(6, 32), torch.randn(32), torch.randn(6, 32), torch.randn(6, 3 * 2 * 8), None, None,
         torch.randn(6, 32), torch.randn(16)]
    t[4], t[5] = _tables(6, 8, "cpu")
    t = [x.to(device) for x in t]
    return [x.requires_grad_(requires_grad and i not in (4, 5)) for i, x in enumerate(t)]


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_paths_record_nothing_and_take_out(device):
    inputs = _all_inputs(requires_grad=True, device=device)
    with torch.no_grad():
        assert all(o.grad_fn is None for o in _all_ops(*inputs))
    with torch.inference_mode():
        assert all(o.grad_fn is None for o in _all_ops(*inputs))
    assert all(o.grad_fn is None for o in _all_ops(*_all_inputs(requires_grad=False, device=device)))
    # Every output of a grad-mode call carries a gradient function.
    assert all(o.grad_fn is not None for o in _all_ops(*inputs))


@pytest.mark.parametrize("device", DEVICES)
def test_out_buffers_are_refused_under_grad(device):
    x, w = torch.randn(3, 8, device=device, requires_grad=True), torch.ones(8, device=device)
    with pytest.raises(ValueError, match="out= cannot be used when a gradient is needed"):
        K.rms_norm(x, w, 1e-5, out=torch.empty(3, 8, device=device))
    with pytest.raises(ValueError, match="out="):
        K.swiglu(x, x, out=torch.empty(3, 8, device=device))
    with torch.no_grad():
        out = torch.empty(3, 8, device=device)
        assert K.swiglu(x, x, out=out) is out


@pytest.mark.parametrize("device", DEVICES)
def test_eager_calls_skip_the_dispatcher(device):
    # Eager launches go straight to the launcher; the torch.ops.glm4v_fast ops are only for torch.compile.
    for requires_grad in (False, True):
        inputs = _all_inputs(requires_grad, device)
        with _OpLog() as log:
            outs = _all_ops(*inputs)
            if requires_grad:
                sum(o.sum() for o in outs).backward()
        assert not [op for op in log.ops if "glm4v_fast" in op], log.ops


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_backward(device):
    # Forward and backward traced in one graph (the ops are opaque under the interpreter, traced by Inductor
    # on a GPU) give the eager gradients.
    def loss_fn(*inputs):
        return sum((o.float() ** 2).sum() for o in _all_ops(*inputs))

    inputs = _all_inputs(requires_grad=True, device=device)
    eager = torch.autograd.grad(loss_fn(*inputs), [t for t in inputs if t.requires_grad])
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    got = torch.autograd.grad(compiled(*inputs), [t for t in inputs if t.requires_grad])
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
