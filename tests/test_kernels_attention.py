"""The varlen attention kernel vs its PyTorch twin and a float64 reference, and its tile plan.

Segments of every length class (1, shorter than a tile, one to two tiles, longer), padded head dims, small
tiles with an empty segment, no leak across segments, and head strides that are not multiples of 16 (the
launcher passes the largest power of two <= 16 dividing every stride as STRIDE_ALIGN; below 16 the kernel
rewrites each stride as ``s // A * A`` so the compiler sees the factor; tests/test_aot.py checks what that
compiles to). Device cases and the error rule: tests/_kernel_checks.py.
"""
import importlib

import pytest
import torch

import glm4v_fast.kernels as K
from _kernel_checks import ALL_DTYPES, DEVICES, assert_matches, nan_like, needs_triton
from _property import given, settings, st  # hypothesis, or stand-ins that skip only the property tests

pytestmark = needs_triton
va = importlib.import_module("glm4v_fast.kernels.varlen_attention")


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
@pytest.mark.parametrize("head_dim", [64, pytest.param(128, marks=pytest.mark.slow)])
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


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_attention_no_cross_segment_leak(device):
    # Changing keys/values of one segment must not change another segment's output.
    q, k, v, cu = _packed_qkv([20, 30], 2, 64, torch.float32, device)
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


@pytest.mark.parametrize("strides,align", [
    ((3 * 12 * 72, 72, 12 * 72, 72), 8),     # head dim 72 in a packed qkv: head strides are multiples of 8
    ((3 * 12 * 128, 128, 12 * 128, 128), 16),
    ((3 * 2 * 36, 36), 4),
    ((99, 33), 1),
    ((48, 0), 16),                           # a zero stride (one head) constrains nothing
])
def test_stride_align(strides, align):
    assert va._stride_align(*strides) == align


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim,dtype", [(72, torch.bfloat16), (72, torch.float32), (36, torch.float16),
                                            (33, torch.float32)])
def test_varlen_attention_unaligned_head_strides(device, head_dim, dtype):
    # q, k, v: views of one packed (T, 3, H, D) buffer, so the head stride is D itself.
    q, k, v, cu = _packed_qkv([3, 70], 2, head_dim, dtype, device)
    assert va._stride_align(q.stride(0), q.stride(1)) < 16
    _check_attention(q, k, v, cu, dtype)
