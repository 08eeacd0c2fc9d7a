"""What the kernel tests share: the devices they run on and the error rule they hold the kernels to.

Devices: every kernel test takes ``device`` from ``DEVICES``. The CPU case runs the kernels on CPU tensors
through the Triton interpreter and is marked ``interpreter`` (skipped where the kernels are compiled, as on a
CUDA machine, where CPU tensors cannot reach them); the CUDA case is marked ``gpu`` (skipped without a CUDA
device). tests/conftest.py applies both skips.

Rules (docs/design.md, "Numerics and tests"):
- float32: max|ours - ref| / max|ref| <= 1e-5, with ref the twin evaluated in float64;
- bf16/fp16: max|ours - ref| <= 2 * max|twin - ref| + atol, where twin is the PyTorch op in the same
  precision, plus a relative-norm bound ||ours - ref|| / ||ref||.
"""
import pytest
import torch

import glm4v_fast.kernels as K

DEVICES = [pytest.param("cpu", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.gpu)]
LOW_PRECISION = [torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float32, *LOW_PRECISION]
# atol of the low-precision rule, relative to max|ref|: a fraction of one bf16/fp16 ulp at the largest output.
ATOL_FRACTION = {torch.bfloat16: 2**-10, torch.float16: 2**-13}
REL_NORM = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

# For a test module's `pytestmark`: without triton no kernel runs anywhere.
needs_triton = pytest.mark.skipif(not K.triton_available(), reason="the Triton kernels need the triton package")


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
