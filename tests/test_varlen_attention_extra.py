"""Varlen attention at head dims whose strides are not multiples of 16 (the STRIDE_ALIGN hint).

The launcher passes the largest power of two (<= 16) dividing every stride; below 16 the kernel rewrites
each stride as ``s // A * A`` so the compiler sees the factor. These tests run that branch (in the
interpreter on CPU, compiled on CUDA) against an fp64 reference; tests/test_aot.py checks what it
compiles to.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from glm4v_fast import kernels as K

va = importlib.import_module("glm4v_fast.kernels.varlen_attention")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ATOL_FRACTION = {torch.bfloat16: 2**-10, torch.float16: 2**-13}


@pytest.mark.parametrize("strides,align", [
    ((3 * 12 * 72, 72, 12 * 72, 72), 8),     # head dim 72 in a packed qkv: head strides are multiples of 8
    ((3 * 12 * 128, 128, 12 * 128, 128), 16),
    ((3 * 2 * 36, 36), 4),
    ((99, 33), 1),
    ((48, 0), 16),                           # a zero stride (one head) constrains nothing
])
def test_stride_align(strides, align):
    assert va._stride_align(*strides) == align


def _check(q, k, v, cu, dtype):
    lengths = (cu[1:] - cu[:-1]).tolist()
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=q.device)
    y = K.varlen_attention(q, k, v, cu, max(lengths), out=out)
    twin = K.varlen_attention_reference(q, k, v, cu, max(lengths))
    ref = K.varlen_attention_reference(q.double(), k.double(), v.double(), cu, max(lengths)).double()
    assert torch.isfinite(y).all()
    scale = ref.abs().max()
    err = (y.double() - ref).abs().max()
    if dtype == torch.float32:
        assert err / scale <= 1e-5, float(err / scale)
    else:
        twin_err = (twin.double() - ref).abs().max()
        assert err <= 2 * twin_err + ATOL_FRACTION[dtype] * scale, (float(err), float(twin_err))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim,dtype", [(72, torch.bfloat16), (72, torch.float32), (36, torch.float16),
                                            (33, torch.float32)])
def test_unaligned_head_strides(device, head_dim, dtype):
    # q, k, v: views of one packed (T, 3, H, D) buffer, so the head stride is D itself.
    lengths = [3, 70]
    qkv = torch.randn(sum(lengths), 3, 2, head_dim, device=device, dtype=dtype)
    q, k, v = qkv.unbind(1)
    assert va._stride_align(q.stride(0), q.stride(1)) < 16
    cu = torch.tensor([0, 3, 73], dtype=torch.int32, device=device)
    _check(q, k, v, cu, dtype)

