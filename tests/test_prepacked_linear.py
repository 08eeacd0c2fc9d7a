"""The compiled CPU path's linears on oneDNN-prepacked weights (glm4v_fast/prepacked_linear.py), without compiling:
the op against an fp64 reference, and the packed copies following the weights (in-place updates, moves, loads,
the model's end)."""
import gc

import pytest
import torch
from torch import nn

from glm4v_fast import prepacked_linear as P

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


def _reference(x, weight, bias):
    out = x.double() @ weight.double().t()
    return out + bias.double() if bias is not None else out


def _bf16_error_bound(x, weight):
    # Products of bf16 inputs summed in fp32, rounded once to bf16: a relative error of a few bf16 ulps of the
    # output's scale (2^-8 each), well above what a wrong layout or a stale weight would give.
    return 4 * 2**-8 * (x.double().abs() @ weight.double().abs().t()).max()


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(40, 72)
        self.b = nn.Linear(72, 24, bias=False)
        self.norm = nn.LayerNorm(24)          # not a Linear: never packed


@pytest.mark.parametrize("rows", [1, 7, 130])
@pytest.mark.parametrize("bias", [True, False])
def test_op_equals_the_fp64_reference(rows, bias):
    torch.manual_seed(rows)
    model = _Tiny().to(torch.bfloat16)
    linear = model.a
    packer = P.PrepackedLinears()
    packer.refresh(model)
    b = linear.bias if bias else None
    x = torch.randn(rows, 40, dtype=torch.bfloat16)
    out = P.prepacked_linear(x, linear.weight, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 72)
    assert (out.double() - _reference(x, linear.weight, b)).abs().max() <= _bf16_error_bound(x, linear.weight)
    # A strided view (every other row of a wider buffer) and an empty batch
    wide = torch.randn(2 * rows, 40, dtype=torch.bfloat16)[::2]
    assert (P.prepacked_linear(wide, linear.weight, b).double() - _reference(wide, linear.weight, b)).abs().max() \
        <= _bf16_error_bound(wide, linear.weight)
    assert P.prepacked_linear(x[:0], linear.weight, b).shape == (0, 72)


def test_refresh_packs_each_plain_linear_once():
    model = _Tiny().to(torch.bfloat16)
    packer = P.PrepackedLinears()
    packer.refresh(model)
    assert len(packer) == 2
    first = {id(P._PACKED[m.weight.data_ptr()][1]) for m in (model.a, model.b)}
    packer.refresh(model)
    assert {id(P._PACKED[m.weight.data_ptr()][1]) for m in (model.a, model.b)} == first     # not packed again


def test_float32_and_wrapped_linears_are_not_packed():
    model = _Tiny()                                     # float32: MKL's GEMM, no packing
    packer = P.PrepackedLinears()
    packer.refresh(model)
    assert len(packer) == 0
    model = _Tiny().to(torch.bfloat16)
    model.a.register_forward_hook(lambda *args: None)   # a hooked module is called as a module, never packed
    packer.refresh(model)
    assert len(packer) == 1 and model.b.weight.data_ptr() in P._PACKED


def test_unpacked_weights_run_the_plain_gemm():
    torch.manual_seed(0)
    x, w = torch.randn(5, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16)
    assert torch.equal(P.prepacked_linear(x, w, None), torch.nn.functional.linear(x, w))


def test_packed_copies_follow_in_place_updates_loads_and_moves():
    torch.manual_seed(1)
    model = _Tiny().to(torch.bfloat16)
    packer = P.PrepackedLinears()
    x = torch.randn(9, 40, dtype=torch.bfloat16)

    def check():
        packer.refresh(model)
        w, b = model.a.weight, model.a.bias
        assert (P.prepacked_linear(x, w, b).double() - _reference(x, w, b)).abs().max() <= _bf16_error_bound(x, w)

    check()
    with torch.no_grad():
        model.a.weight.mul_(-2)                          # in place: the version counter moves
    check()
    model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
    check()
    old = model.a.weight.data_ptr()
    model.a.weight = nn.Parameter(torch.randn(72, 40, dtype=torch.bfloat16))    # new storage
    check()
    assert old not in P._PACKED                          # the replaced weight's copy is gone


def test_copies_go_with_their_owner():
    model = _Tiny().to(torch.bfloat16)
    packer = P.PrepackedLinears()
    packer.refresh(model)
    pointers = [model.a.weight.data_ptr(), model.b.weight.data_ptr()]
    assert all(p in P._PACKED for p in pointers)
    del packer
    gc.collect()
    assert not any(p in P._PACKED for p in pointers)
