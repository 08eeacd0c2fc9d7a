"""The Triton kernels' forward vs their PyTorch twins and a float64 reference; registration, availability and
bad input. The attention kernel has its own file (tests/test_kernels_attention.py), the backward too
(tests/test_kernels_backward.py).

Every output buffer is poisoned with NaN before the kernel writes it (``out=``), so an element the kernel
skips fails the comparison. The error rule and the device cases are in tests/_kernel_checks.py: on CPU the
kernels run in the Triton interpreter, so the shapes stay small; CUDA cases run the same checks compiled.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import glm4v_fast.kernels as K
from _kernel_checks import ALL_DTYPES, DEVICES, assert_matches, nan_like, needs_triton

pytestmark = needs_triton


def _module(name):
    # glm4v_fast.kernels.rms_norm is the function (re-exported); the module lives in sys.modules.
    return importlib.import_module(f"glm4v_fast.kernels.{name}")


# ----------------------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows,cols", [(1, 1536), (7, 123), pytest.param(33, 1536, marks=pytest.mark.slow), (3, 4096),
                                       (2, 13696)])
def test_rms_norm(device, dtype, residual, rows, cols):
    # Strided rows: x and residual are column slices of wider buffers.
    x = torch.randn(rows, cols + 5, device=device, dtype=dtype)[:, 2:cols + 2]
    r = torch.randn(rows, cols + 3, device=device, dtype=dtype)[:, :cols] if residual else None
    w = (1 + 0.5 * torch.randn(cols, device=device)).to(dtype)
    eps = 1e-5
    y_out = nan_like((rows, cols), dtype, device)
    if residual:
        s_out = nan_like((rows, cols), dtype, device)
        y, s = K.rms_norm(x, w, eps, r, out=y_out, residual_out=s_out)
        assert y is y_out and s is s_out
        y_twin, s_twin = K.rms_norm_reference(x, w, eps, r)
        # The residual stream is one rounded add: it must match torch exactly.
        assert torch.equal(s, s_twin)
        y_ref = K.rms_norm_reference(s.double(), w.double(), eps)
    else:
        y = K.rms_norm(x, w, eps, out=y_out)
        y_twin = K.rms_norm_reference(x, w, eps)
        y_ref = K.rms_norm_reference(x.double(), w.double(), eps)
    assert_matches(y, y_twin, y_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_leading_dims_and_promotion(device):
    # (B, N, C) input, fp32 weight on bf16 activations: HF's `weight * x.to(bf16)` promotes to fp32.
    x = torch.randn(2, 5, 1536, device=device, dtype=torch.bfloat16)
    w = torch.randn(1536, device=device, dtype=torch.float32)
    y = K.rms_norm(x, w, 1e-6)
    y_twin = K.rms_norm_reference(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == y_twin.dtype == torch.float32
    torch.testing.assert_close(y, y_twin, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Rotary


def _rotary_tables(n_tokens, head_dim, device):
    """HF-style 2D vision tables: angles [h*f | w*f] repeated twice over the head dim."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)))
    pos = torch.randint(0, 40, (n_tokens, 2)).float()
    freqs = (pos[:, :, None] * inv_freq).flatten(1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_tokens", [1, 33])
def test_apply_rotary_strided(device, dtype, head_dim, n_tokens):
    heads = 3
    qkv = torch.randn(n_tokens, 3 * heads * head_dim, device=device, dtype=dtype)
    cos, sin = _rotary_tables(n_tokens, head_dim, device)
    for which in (0, 1):   # q and k: strided views into the packed projection
        x = qkv.view(n_tokens, 3, heads, head_dim)[:, which]
        out = nan_like((n_tokens, heads, head_dim), dtype, device)
        y = K.apply_rotary(x, cos, sin, out=out)
        assert y is out
        assert_matches(y, K.apply_rotary_reference(x, cos, sin),
                       K.apply_rotary_reference(x.double(), cos.double(), sin.double()), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_apply_rotary_qk_fused(device, dtype):
    n_tokens, heads, head_dim = 21, 2, 128
    # Row-strided qkv (a slice of a wider buffer) to exercise the row stride too.
    qkv = torch.randn(n_tokens, 3 * heads * head_dim + 8, device=device, dtype=dtype)[:, 8:]
    cos, sin = _rotary_tables(n_tokens, head_dim, device)
    out = nan_like((n_tokens, 2 * heads, head_dim), dtype, device)
    q, k, v = K.apply_rotary_qk(qkv, cos, sin, heads, out=out)
    q_twin, k_twin, v_twin = K.apply_rotary_qk_reference(qkv, cos, sin, heads)
    q_ref, k_ref, _ = K.apply_rotary_qk_reference(qkv.double(), cos.double(), sin.double(), heads)
    assert_matches(q, q_twin, q_ref, dtype)
    assert_matches(k, k_twin, k_ref, dtype)
    assert torch.equal(v, v_twin) and v.data_ptr() == v_twin.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("head_dim", [72, 80])
def test_apply_rotary_half_tables(device, dtype, head_dim):
    # (T, D/2) tables of the angles, with values that are not cos/sin of one angle (any table must work), and
    # head dims whose half is not a power of two (masked columns).
    n_tokens, heads = 19, 3
    x = torch.randn(n_tokens, heads, head_dim + 6, device=device, dtype=dtype)[:, :, 6:]
    cos = torch.randn(n_tokens, head_dim // 2, device=device)
    sin = torch.randn(n_tokens, head_dim // 2, device=device)
    out = nan_like((n_tokens, heads, head_dim), dtype, device)
    y = K.apply_rotary(x, cos, sin, out=out)
    assert_matches(y, K.apply_rotary_reference(x, cos, sin),
                   K.apply_rotary_reference(x.double(), cos.double(), sin.double()), dtype)
    # The same rotation from HF's (T, D) layout reads only the first half.
    full = K.apply_rotary(x, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
    assert torch.equal(full, y)


@pytest.mark.interpreter          # the halves are compared for CPU tables only (on a GPU it would sync)
def test_apply_rotary_refuses_tables_with_unequal_halves():
    x = torch.randn(9, 2, 32)
    cos, sin = torch.randn(9, 32), torch.randn(9, 32)
    with pytest.raises(ValueError, match="cat\\(freqs, freqs\\)"):
        K.apply_rotary(x, cos, sin)


# ----------------------------------------------------------------------------------------------------------
# SwiGLU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows,width", [(33, 123), (7, 1536), (5, 4096), (3, 13696)])
def test_swiglu_gate_up_views(device, dtype, rows, width):
    gate_up = 3 * torch.randn(rows, 2 * width, device=device, dtype=dtype)
    gate, up = gate_up[:, :width], gate_up[:, width:]
    out = nan_like((rows, width), dtype, device)
    y = K.swiglu(gate, up, out=out)
    assert y is out
    assert_matches(y, K.swiglu_reference(gate, up), K.swiglu_reference(gate.double(), up.double()), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_bf16_bitwise_and_leading_dims(device):
    # silu rounded to bf16, then one rounded bf16 product: this is what separates HF numerics from a fused
    # fp32 silu*up, and the error rule alone would accept the more precise fused value. The interpreter's
    # exp is numpy's, so on CPU the kernel equals torch bit for bit; a GPU's exp may differ in the last fp32
    # ulp, which can flip a bf16 rounding: allow one bf16 ulp there.
    gate = 3 * torch.randn(2, 3, 1000, device=device, dtype=torch.bfloat16)
    up = torch.randn(2, 3, 1000, device=device, dtype=torch.bfloat16)
    y = K.swiglu(gate, up)
    twin = K.swiglu_reference(gate, up)
    assert y.shape == gate.shape
    if device == "cpu":
        assert torch.equal(y, twin)
    else:
        assert ((y.float() - twin.float()).abs() <= twin.float().abs() * 2**-7).all()


# ----------------------------------------------------------------------------------------------------------
# LayerNorm + GELU (merger)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows,cols", [(7, 123), (5, 4096)])
def test_layer_norm_gelu(device, dtype, rows, cols):
    x = (2 * torch.randn(rows, cols + 4, device=device) + 0.5).to(dtype)[:, 4:]
    w = (1 + 0.3 * torch.randn(cols, device=device)).to(dtype)
    b = (0.2 * torch.randn(cols, device=device)).to(dtype)
    out = nan_like((rows, cols), dtype, device)
    y = K.layer_norm_gelu(x, w, b, 1e-5, out=out)
    assert y is out
    ref = K.layer_norm_gelu_reference(x.double(), w.double(), b.double(), 1e-5)
    assert_matches(y, K.layer_norm_gelu_reference(x, w, b, 1e-5), ref, dtype)


# ----------------------------------------------------------------------------------------------------------
# Registration, compile, availability


def test_ops_registered():
    for name in ("rms_norm", "add_rms_norm", "rotary", "swiglu", "varlen_attention", "layer_norm_gelu"):
        assert hasattr(torch.ops.glm4v_fast, name)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def block(x, w, r):
        y, s = K.rms_norm(x, w, 1e-5, r)
        return K.swiglu(y, s) + 1

    x, r = torch.randn(2, 9, 64, device=device), torch.randn(2, 9, 64, device=device)
    w = torch.randn(64, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x, w, r), block(x, w, r), rtol=0, atol=0)


def test_availability_helpers():
    assert K.triton_available()
    assert K.can_run_on("cpu") == K.interpreter_enabled()
    assert not K.can_run_on("meta")


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_module("_utils"), "interpreter_enabled", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        K.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="kernels='torch'"):
        K.swiglu(torch.randn(2, 8), torch.randn(2, 8))


@pytest.mark.slow
def test_import_without_triton():
    # Import must succeed with triton missing; only a kernel call fails, with a clear message.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, glm4v_fast.kernels as K\n"
        "assert not K.triton_available() and not K.can_run_on('cpu')\n"
        "y = K.rms_norm_reference(torch.randn(2, 4), torch.ones(4), 1e-5)\n"
        "try:\n    K.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-5)\n"
        "except RuntimeError as e:\n    assert 'triton' in str(e); print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.slow
def test_repository_root_does_not_shadow_the_pypi_kernels_package():
    # transformers imports the PyPI `kernels` package while loading models. From the repository root, that
    # import must not find anything of ours (the kernels live in glm4v_fast/kernels/), and our ops must keep
    # their registration (an environment inside the checkout, like .venv, is not ours). The interpreter is set
    # for the subprocess, so this runs on any machine.
    code = (
        "import sys, torch, glm4v_fast.kernels as K\n"
        "try:\n    import kernels\nexcept ImportError:\n    kernels = None\n"
        "root = sys.argv[1]\n"
        "origin = getattr(kernels, '__file__', None) or ''\n"
        "assert kernels is None or origin.startswith(sys.prefix) or not origin.startswith(root), kernels\n"
        "y = K.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)\n"
        "y = K.swiglu(torch.randn(2, 8), torch.randn(2, 8))\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1"), cwd=root, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.slow
def test_compiled_ops_name_their_own_kernels():
    # torch's triton_op records each op's kernels (their source goes into AOTAutograd's cache key). Under a
    # CUDA device that a subprocess simulates, without the interpreter, every op must name exactly the kernel
    # its launcher launches, and never the interpreter probe.
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "import glm4v_fast.kernels as K\n"
        "from torch._library.triton import get_triton_kernels_for_op\n"
        "assert not K.interpreter_enabled()\n"
        "for op in sys.argv[1:]:\n"
        "    print(op, *[getattr(k, 'fn', k).__name__ for k in get_triton_kernels_for_op('glm4v_fast::' + op)])\n"
    )
    expected = {
        "rms_norm": "_rms_norm_kernel", "add_rms_norm": "_rms_norm_kernel",
        "rms_norm_backward": "_rms_norm_backward_kernel", "rotary": "_rotary_kernel",
        "swiglu": "_swiglu_kernel", "swiglu_backward": "_swiglu_backward_kernel",
        "layer_norm_gelu": "_layer_norm_gelu_kernel", "layer_norm_gelu_backward": "_layer_norm_gelu_backward_kernel",
        "varlen_attention": "_varlen_attn_kernel",
    }
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", "import sys\n" + code, *expected], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    recorded = dict(line.split(" ", 1) if " " in line else (line, "") for line in res.stdout.split("\n") if line)
    assert recorded == expected


# ----------------------------------------------------------------------------------------------------------
# Bad input


def _bad_calls(device):
    """Calls that must raise ValueError, by name; tensors on `device` (the checks run before any launch)."""
    x = torch.randn(4, 8, device=device)
    q = torch.randn(6, 2, 16, device=device)
    cu = torch.tensor([0, 6], dtype=torch.int32, device=device)
    cos, sin = torch.ones(6, 16, device=device), torch.zeros(6, 16, device=device)

    def t(*shape, dtype=torch.float32):
        return torch.ones(*shape, dtype=dtype, device=device)

    return {
        "rms_norm weight shape": lambda: K.rms_norm(x, t(7), 1e-5),
        "rms_norm int dtype": lambda: K.rms_norm(x.long(), t(8), 1e-5),
        "rms_norm residual shape": lambda: K.rms_norm(x, t(8), 1e-5, t(4, 7)),
        "rms_norm residual dtype": lambda: K.rms_norm(x, t(8), 1e-5, x.half()),
        "rms_norm negative eps": lambda: K.rms_norm(x, t(8), -1.0),
        "rms_norm bad out": lambda: K.rms_norm(x, t(8), 1e-5, out=t(4, 9)),
        "rms_norm fp64": lambda: K.rms_norm(x.double(), t(8), 1e-5),
        "swiglu shape": lambda: K.swiglu(x, t(4, 9)),
        "swiglu dtype": lambda: K.swiglu(x, x.half()),
        "rotary 2-D x": lambda: K.apply_rotary(x, cos, sin),
        "rotary odd D": lambda: K.apply_rotary(t(6, 2, 15), t(6, 15), t(6, 15)),
        "rotary table shape": lambda: K.apply_rotary(q, cos[:5], sin),
        "rotary table dtype": lambda: K.apply_rotary(q, cos.half(), sin),
        "rotary table width": lambda: K.apply_rotary(q, t(6, 12), sin),
        "rotary head dim too large": lambda: K.apply_rotary(t(6, 1, 258), t(6, 129), t(6, 129)),
        "rotary non-unit D stride": lambda: K.apply_rotary(q.transpose(1, 2).contiguous().transpose(1, 2), cos, sin),
        "rotary_qk heads": lambda: K.apply_rotary_qk(t(6, 95), cos, sin, 2),
        "layer_norm_gelu bias": lambda: K.layer_norm_gelu(x, t(8), t(7)),
        "layer_norm_gelu dtype": lambda: K.layer_norm_gelu(x, t(8).half(), t(8)),
        "attn cu dtype": lambda: K.varlen_attention(q, q, q, cu.long(), 6),
        "attn cu end": lambda: K.varlen_attention(q, q, q, torch.tensor([0, 5], dtype=torch.int32, device=device), 6),
        "attn cu order": lambda: K.varlen_attention(q, q, q, torch.tensor([0, 4, 3, 6], dtype=torch.int32,
                                                                           device=device), 6),
        "attn k shape": lambda: K.varlen_attention(q, q[:, :1], q, cu, 6),
        "attn v dtype": lambda: K.varlen_attention(q, q, q.half(), cu, 6),
        "attn 2-D q": lambda: K.varlen_attention(x, x, x, cu, 6),
        "attn head dim": lambda: K.varlen_attention(*(t(6, 1, 512),) * 3, cu, 6),
        "attn max_seqlen": lambda: K.varlen_attention(q, q, q, cu, -1),
        "attn plan": lambda: K.varlen_attention(q, q, q, cu, 6, tile_plan=K.TilePlan(torch.zeros(1, 2), 64)),
        "plan block_m": lambda: K.varlen_tile_plan([0, 6], block_m=24),
        "plan start": lambda: K.varlen_tile_plan([1, 6]),
        "mixed devices": lambda: K.swiglu(x, torch.randn(4, 8, device="meta")),
    }


# The values of cu_seqlens are checked where that is free, in host memory; on a GPU it would cost a sync.
HOST_ONLY_CHECKS = {"attn cu end", "attn cu order"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_bad_calls("cpu")))
def test_bad_input_raises(name, device):
    if device != "cpu" and name in HOST_ONLY_CHECKS:
        pytest.skip("cu_seqlens values are checked in host memory only")
    with pytest.raises(ValueError) as raised:
        _bad_calls(device)[name]()
    assert "Triton interpreter" not in str(raised.value)     # the check itself, not the launch guard
