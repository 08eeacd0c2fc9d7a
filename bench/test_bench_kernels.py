"""Each Triton kernel vs its eager PyTorch twin and torch.compile of the twin (pytest-benchmark).

GPU: the sizes of one 32k-token packed batch of the GLM-4.1V tower (hidden 1536, MLP 4096, 12 heads of 128,
merger 4096 over T/4 tokens), bf16. CPU: tiny shapes, because the kernels run in the Triton interpreter
there; only the ratios mean anything. Run: ``pytest bench/test_bench_kernels.py``
(``--benchmark-json=...`` to keep the numbers).
"""
import pytest
import torch

import glm4v_fast.kernels as K

VARIANTS = ["torch", "triton", "compiled"]   # torch first: the others report their speed-up over it

GPU = torch.cuda.is_available()
DTYPE = torch.bfloat16
TOKENS = 32768 if GPU else 64
HIDDEN, MLP, HEADS, HEAD_DIM, MERGER = 1536, 4096, 12, 128, 4096
# GPU: 8 images of 64x64 patches. CPU: two short segments.
SEGMENTS = [4096] * 8 if GPU else [24, 40]
ATTN_HEADS = HEADS if GPU else 2

if not K.can_run_on("cuda" if GPU else "cpu"):
    pytest.skip("Triton kernels cannot run here", allow_module_level=True)


def _pick(variant, kernel, twin):
    """The callable under test, or a skip when torch.compile cannot build the twin on this machine."""
    if variant == "triton":
        return kernel
    if variant == "torch":
        return twin
    torch._dynamo.reset()
    compiled = torch.compile(twin, dynamic=False)
    return compiled


def _bench(run_bench, variant, kernel, twin, args, **metrics):
    fn = _pick(variant, kernel, twin)
    if variant == "compiled":
        try:
            fn(*args)
        except Exception as exc:  # Inductor needs a C++ toolchain on CPU; report instead of failing
            pytest.skip(f"torch.compile of the twin failed here: {type(exc).__name__}: {str(exc)[:200]}")
    return run_bench(lambda: fn(*args), variant=variant, **metrics)


def _es(dtype=DTYPE):
    return torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("variant", VARIANTS)
def test_add_rms_norm(run_bench, bench_device, variant):
    x = torch.randn(TOKENS, HIDDEN, device=bench_device, dtype=DTYPE)
    r = torch.randn_like(x)
    w = torch.randn(HIDDEN, device=bench_device, dtype=DTYPE)
    _bench(run_bench, variant, K.rms_norm, K.rms_norm_reference, (x, w, 1e-5, r),
           op="add_rms_norm", tokens=TOKENS, bytes_moved=4 * x.numel() * _es() + w.numel() * _es())


@pytest.mark.parametrize("variant", VARIANTS)
def test_rms_norm(run_bench, bench_device, variant):
    x = torch.randn(TOKENS, HIDDEN, device=bench_device, dtype=DTYPE)
    w = torch.randn(HIDDEN, device=bench_device, dtype=DTYPE)
    _bench(run_bench, variant, K.rms_norm, K.rms_norm_reference, (x, w, 1e-5),
           op="rms_norm", tokens=TOKENS, bytes_moved=2 * x.numel() * _es() + w.numel() * _es())


def rotary_bytes(tokens: int, heads: int, head_dim: int, element_size: int) -> dict[str, int]:
    """Bytes apply_rotary_qk reads and writes, by kernel design (fp32 cos and sin tables in HF's (T, D) layout).

    q and k (2H heads) are read and written once either way. The tables: the earlier grid, (token block,
    head), had every one of the 2H head programs of a token block load both halves of its cos and sin rows,
    2H * 2 * T * D * 4 bytes requested (served from L2 while the rows stay there; above ~40k tokens they
    are evicted between heads and come from HBM). The current grid loads each token's rows once for all
    heads, and only their first half: 2 * T * D/2 * 4 bytes.
    """
    qk = 2 * (2 * tokens * heads * head_dim) * element_size
    before = 2 * heads * 2 * tokens * head_dim * 4
    after = 2 * tokens * (head_dim // 2) * 4
    return {"qk_bytes": qk, "table_bytes_before": before, "table_bytes_after": after,
            "bytes_moved_before": qk + before, "bytes_moved_after": qk + after}


@pytest.mark.parametrize("variant", VARIANTS)
def test_rotary_qk(run_bench, benchmark, bench_device, variant):
    qkv = torch.randn(TOKENS, 3 * HEADS * HEAD_DIM, device=bench_device, dtype=DTYPE)
    angles = torch.rand(TOKENS, HEAD_DIM // 2, device=bench_device) * 40
    angles = torch.cat((angles, angles), -1)     # HF's cat(freqs, freqs) layout
    cos, sin = angles.cos(), angles.sin()
    moved = rotary_bytes(TOKENS, HEADS, HEAD_DIM, _es())
    seconds = _bench(run_bench, variant, K.apply_rotary_qk, K.apply_rotary_qk_reference, (qkv, cos, sin, HEADS),
                     op="rotary_qk", tokens=TOKENS, bytes_moved=moved["bytes_moved_after"])
    benchmark.extra_info.update(moved, gb_per_s_if_bytes_before=moved["bytes_moved_before"] / seconds / 1e9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_swiglu(run_bench, bench_device, variant):
    gate_up = torch.randn(TOKENS, 2 * MLP, device=bench_device, dtype=DTYPE)
    gate, up = gate_up[:, :MLP], gate_up[:, MLP:]
    _bench(run_bench, variant, K.swiglu, K.swiglu_reference, (gate, up),
           op="swiglu", tokens=TOKENS, bytes_moved=3 * TOKENS * MLP * _es())


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_norm_gelu(run_bench, bench_device, variant):
    rows = TOKENS // 4   # the merger runs on 2x2-merged tokens
    x = torch.randn(rows, MERGER, device=bench_device, dtype=DTYPE)
    w = torch.randn(MERGER, device=bench_device, dtype=DTYPE)
    b = torch.randn(MERGER, device=bench_device, dtype=DTYPE)
    _bench(run_bench, variant, K.layer_norm_gelu, K.layer_norm_gelu_reference, (x, w, b, 1e-5),
           op="layer_norm_gelu", tokens=rows, bytes_moved=2 * x.numel() * _es() + 2 * MERGER * _es())


@pytest.mark.parametrize("variant", VARIANTS)
def test_varlen_attention(run_bench, bench_device, variant):
    total = sum(SEGMENTS)
    qkv = torch.randn(total, 3, ATTN_HEADS, HEAD_DIM, device=bench_device, dtype=DTYPE)
    q, k, v = qkv.unbind(1)
    bounds = torch.tensor([0] + SEGMENTS).cumsum(0).to(torch.int32)
    cu = bounds.to(bench_device)
    max_len = max(SEGMENTS)
    plan = K.varlen_tile_plan(bounds, HEAD_DIM, bench_device)   # once per batch, as the model does

    def kernel(q, k, v, cu, max_len):
        return K.varlen_attention(q, k, v, cu, max_len, tile_plan=plan)

    flops = 4 * sum(n * n for n in SEGMENTS) * ATTN_HEADS * HEAD_DIM   # QK^T and PV, 2 FLOP per MAC
    _bench(run_bench, variant, kernel, K.varlen_attention_reference, (q, k, v, cu, max_len),
           op="varlen_attention", tokens=total, flops=flops,
           bytes_moved=4 * total * ATTN_HEADS * HEAD_DIM * _es(), inner=5 if GPU else 1)
