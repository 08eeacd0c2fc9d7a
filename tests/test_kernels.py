"""Triton kernels vs their PyTorch twins and a float64 reference.

Rules (docs/design.md, "Numerics and tests"):
- float32: max|ours - ref| / max|ref| <= 1e-5, with ref the twin evaluated in float64;
- bf16/fp16: max|ours - ref| <= 2 * max|twin - ref| + atol, where twin is the PyTorch op in the same
  precision, plus a relative-norm bound ||ours - ref|| / ||ref||.
Every output buffer is poisoned with NaN before the kernel writes it (``out=``), so an element the kernel
skips fails the comparison. On CPU the kernels run in the Triton interpreter (tests/conftest.py), so the
shapes stay small; CUDA cases run the same checks where a GPU is present.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import glm4v_fast.kernels as K

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
LOW_PRECISION = [torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float32, *LOW_PRECISION]
# atol of the low-precision rule, relative to max|ref|: a fraction of one bf16/fp16 ulp at the largest output.
ATOL_FRACTION = {torch.bfloat16: 2**-10, torch.float16: 2**-13}
REL_NORM = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

if not K.can_run_on("cpu") and not torch.cuda.is_available():
    pytest.skip("Triton kernels cannot run here (no triton, no GPU, no interpreter)", allow_module_level=True)


def _module(name):
    # glm4v_fast.kernels.rms_norm is the function (re-exported); the module lives in sys.modules.
    return importlib.import_module(f"glm4v_fast.kernels.{name}")


def nan_like(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_matches(ours, twin, ref, dtype, what="output"):
    """ours, twin: results in `dtype`; ref: the same computation in float64 (or float32 where noted).

    float32: within 1e-5 relative of ref. bf16/fp16: max|ours - ref| <= 2 * max|twin - ref| + atol, and a
    relative-norm bound. tests/test_kernels_backward.py holds the gradients to the same rule.
    """
    assert ours.dtype == twin.dtype, (what, ours.dtype, twin.dtype)
    assert ours.shape == twin.shape == ref.shape, (what, ours.shape, twin.shape, ref.shape)
    assert torch.isfinite(ours).all(), f"{what} has non-finite values (unwritten elements?)"
    ours, twin, ref = ours.double(), twin.double(), ref.double()
    scale = ref.abs().max().clamp_min(1e-30)
    err = (ours - ref).abs().max()
    if dtype == torch.float32:
        assert err / scale <= 1e-5, f"{what}: fp32 relative error {float(err / scale):.3e}"
        return
    twin_err = (twin - ref).abs().max()
    atol = ATOL_FRACTION[dtype] * scale
    assert err <= 2 * twin_err + atol, (
        f"{what}, {dtype}: error {float(err):.3e} > 2 * twin error {float(twin_err):.3e} + {float(atol):.1e}")
    rel_norm = (ours - ref).norm() / ref.norm().clamp_min(1e-30)
    assert rel_norm <= REL_NORM[dtype], f"{what}, {dtype}: relative norm error {float(rel_norm):.3e}"


# ----------------------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows,cols", [(1, 1536), (7, 123), (33, 1536), (3, 4096), (2, 13696)])
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
# Varlen attention


def _packed_qkv(lengths, heads, head_dim, dtype, device):
    """q, k, v as strided views of one packed (T, 3, H, D) buffer, and int32 cu_seqlens."""
    total = sum(lengths)
    qkv = torch.randn(total, 3, heads, head_dim, device=device, dtype=dtype)
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    q, k, v = qkv.unbind(1)
    return q, k, v, cu


def _check_attention(q, k, v, cu, dtype, scale=None, **kwargs):
    lengths = (cu[1:] - cu[:-1]).tolist()
    out = nan_like(tuple(q.shape), dtype, q.device)
    y = K.varlen_attention(q, k, v, cu, max(lengths), scale, out=out, **kwargs)
    assert y is out
    twin = K.varlen_attention_reference(q, k, v, cu, max(lengths), scale)
    ref = K.varlen_attention_reference(q.double(), k.double(), v.double(), cu, max(lengths), scale)
    assert_matches(y, twin, ref, dtype)
    return y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_attention_segments(device, dtype, head_dim):
    # Length 1, shorter than a tile, between one and two tiles, longer than two tiles.
    q, k, v, cu = _packed_qkv([1, 17, 70, 130], 2, head_dim, dtype, device)
    _check_attention(q, k, v, cu, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [16, 80])
def test_varlen_attention_padded_head_dims(device, head_dim):
    # 80 is not a power of two: the kernel pads D to 128 with masks.
    q, k, v, cu = _packed_qkv([5, 40], 2, head_dim, torch.bfloat16, device)
    _check_attention(q, k, v, cu, torch.bfloat16, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_attention_small_tiles_and_empty_segment(device):
    # block_m=16 splits segments into many query tiles; an empty segment must launch nothing.
    q, k, v, cu = _packed_qkv([33, 0, 16, 1], 3, 64, torch.float32, device)
    plan = K.varlen_tile_plan(cu.cpu(), 64, device, block_m=16)
    assert plan.block_m == 16 and plan.tiles.shape == (3 + 1 + 1, 3)
    _check_attention(q, k, v, cu, torch.float32, tile_plan=plan)


def test_varlen_attention_no_cross_segment_leak():
    # Changing keys/values of one segment must not change another segment's output.
    q, k, v, cu = _packed_qkv([20, 30], 2, 64, torch.float32, "cpu")
    y = K.varlen_attention(q, k, v, cu, 30)
    k2, v2 = k.clone(), v.clone()
    k2[20:] += 5.0
    v2[20:] -= 3.0
    y2 = K.varlen_attention(q, k2, v2, cu, 30)
    assert torch.equal(y[:20], y2[:20])
    assert not torch.allclose(y[20:], y2[20:])


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=8), block_m=st.sampled_from([16, 64, 128]))
def test_tile_plan_covers_each_query_once(lengths, block_m):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    tiles, bm = K.varlen_tile_plan(torch.tensor(cu, dtype=torch.int32), block_m=block_m)
    assert bm == block_m and tiles.dtype == torch.int32
    covered = torch.zeros(cu[-1], dtype=torch.int64)
    for q_start, seg_start, seg_end in tiles.tolist():
        assert (seg_start, seg_end) in zip(cu[:-1], cu[1:])
        assert seg_start <= q_start < seg_end and (q_start - seg_start) % block_m == 0
        covered[q_start:min(q_start + block_m, seg_end)] += 1
    assert (covered == 1).all()


# ----------------------------------------------------------------------------------------------------------
# Registration, compile, availability


def test_ops_registered():
    for name in ("rms_norm", "add_rms_norm", "rotary", "swiglu", "varlen_attention", "layer_norm_gelu"):
        assert hasattr(torch.ops.glm4v_fast, name)


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


def test_top_level_kernels_import_does_not_register_ops_twice():
    # From the repository root, `import kernels` (transformers does it, looking for the PyPI `kernels` package)
    # finds this folder. It must not load the op modules a second time: torch.library would drop the first
    # registration and glm4v_fast.kernels' ops would lose their schema.
    code = (
        "import gc, sys, torch, glm4v_fast.kernels as K\n"
        "import kernels\n"
        "assert kernels is not K and not [m for m in sys.modules if m.startswith('kernels.')], sys.modules.keys()\n"
        "gc.collect()\n"
        "y = K.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)\n"
        "y = K.swiglu(torch.randn(2, 8), torch.randn(2, 8))\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1") if not torch.cuda.is_available() else dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------
# Bad input


def _bad_inputs():
    x = torch.randn(4, 8)
    q = torch.randn(6, 2, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    cos, sin = torch.ones(6, 16), torch.zeros(6, 16)
    return [
        ("rms_norm weight shape", lambda: K.rms_norm(x, torch.ones(7), 1e-5)),
        ("rms_norm int dtype", lambda: K.rms_norm(x.long(), torch.ones(8), 1e-5)),
        ("rms_norm residual shape", lambda: K.rms_norm(x, torch.ones(8), 1e-5, torch.randn(4, 7))),
        ("rms_norm residual dtype", lambda: K.rms_norm(x, torch.ones(8), 1e-5, x.half())),
        ("rms_norm negative eps", lambda: K.rms_norm(x, torch.ones(8), -1.0)),
        ("rms_norm bad out", lambda: K.rms_norm(x, torch.ones(8), 1e-5, out=torch.empty(4, 9))),
        ("rms_norm fp64", lambda: K.rms_norm(x.double(), torch.ones(8), 1e-5)),
        ("swiglu shape", lambda: K.swiglu(x, torch.randn(4, 9))),
        ("swiglu dtype", lambda: K.swiglu(x, x.half())),
        ("rotary 2-D x", lambda: K.apply_rotary(x, cos, sin)),
        ("rotary odd D", lambda: K.apply_rotary(torch.randn(6, 2, 15), torch.ones(6, 15), torch.ones(6, 15))),
        ("rotary table shape", lambda: K.apply_rotary(q, cos[:5], sin)),
        ("rotary table dtype", lambda: K.apply_rotary(q, cos.half(), sin)),
        ("rotary table width", lambda: K.apply_rotary(q, torch.ones(6, 12), sin)),
        ("rotary head dim too large", lambda: K.apply_rotary(torch.randn(6, 1, 258), torch.ones(6, 129),
                                                             torch.zeros(6, 129))),
        ("rotary non-unit D stride", lambda: K.apply_rotary(q.transpose(1, 2).contiguous().transpose(1, 2), cos, sin)),
        ("rotary_qk heads", lambda: K.apply_rotary_qk(torch.randn(6, 95), cos, sin, 2)),
        ("layer_norm_gelu bias", lambda: K.layer_norm_gelu(x, torch.ones(8), torch.zeros(7))),
        ("layer_norm_gelu dtype", lambda: K.layer_norm_gelu(x, torch.ones(8).half(), torch.zeros(8))),
        ("attn cu dtype", lambda: K.varlen_attention(q, q, q, cu.long(), 6)),
        ("attn cu end", lambda: K.varlen_attention(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 6)),
        ("attn cu order", lambda: K.varlen_attention(q, q, q, torch.tensor([0, 4, 3, 6], dtype=torch.int32), 6)),
        ("attn k shape", lambda: K.varlen_attention(q, q[:, :1], q, cu, 6)),
        ("attn v dtype", lambda: K.varlen_attention(q, q, q.half(), cu, 6)),
        ("attn 2-D q", lambda: K.varlen_attention(x, x, x, cu, 6)),
        ("attn head dim", lambda: K.varlen_attention(*(torch.randn(6, 1, 512),) * 3, cu, 6)),
        ("attn max_seqlen", lambda: K.varlen_attention(q, q, q, cu, -1)),
        ("attn plan", lambda: K.varlen_attention(q, q, q, cu, 6, tile_plan=K.TilePlan(torch.zeros(1, 2), 64))),
        ("plan block_m", lambda: K.varlen_tile_plan([0, 6], block_m=24)),
        ("plan start", lambda: K.varlen_tile_plan([1, 6])),
        ("mixed devices", lambda: K.swiglu(x, torch.randn(4, 8, device="meta"))),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises(case):
    with pytest.raises(ValueError):
        case[1]()
