"""Linears on oneDNN-prepacked weights, for the compiled CPU path in bfloat16.

`F.linear` on a CPU hands oneDNN the weight in its plain (out, in) layout, and oneDNN reorders it into the blocked
layout its AMX / AVX512-BF16 kernels read on every call. Packing each weight once (`mkldnn._reorder_linear_weight`,
as inductor's freezing and vLLM's CPU linears do) saves that work: at the tower's shapes on a 2-core AMX Xeon the
four linears of a block took 16 % less time at 1024 rows (one 448x448 image) and the same at 3000 rows (docs/
results.md). The packed copies cost memory: one more copy of every bf16 Linear weight the path runs (about the
tower's size again).

The op (`glm4v_fast::cpu_prepacked_linear`) is opaque to the compiler and takes the plain weight, a graph input
as before, so the compiled graph and its on-disk cache do not change with the weights; it looks the packed copy up
by the weight's storage. `PrepackedLinears.refresh(model)`, run before each compiled call, packs what changed
(new storage after a move or load, or a bumped version counter after an in-place update) and drops what its model
no longer has; the copies go when their owner does. A weight without a packed copy runs the plain `F.linear`.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

# The dtypes whose linears run on prepacked weights; float32 keeps MKL's GEMM (its packing is not measured here).
PREPACK_DTYPES = (torch.bfloat16,)

# A weight's data_ptr -> (the weight, detached; its packed copy). Holding the weight keeps its storage alive, so
# that no other tensor can take its address while the packed copy is listed under it.
_PACKED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@torch.library.custom_op("glm4v_fast::cpu_prepacked_linear", mutates_args=(), device_types="cpu")
def prepacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, with the packed copy of `weight` when `PrepackedLinears.refresh` made one."""
    entry = _PACKED.get(weight.data_ptr())
    if entry is None or entry[1].dtype != weight.dtype or entry[1].shape != weight.shape:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, entry[1], bias, "none", [], "")


@prepacked_linear.register_fake
def _prepacked_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def prepacking_applies(dtype: torch.dtype) -> bool:
    return dtype in PREPACK_DTYPES and torch.backends.mkldnn.is_available()


def _drop(pointers: dict) -> None:
    for pointer in pointers:
        _PACKED.pop(pointer, None)
    pointers.clear()


class PrepackedLinears:
    """The packed copies of one model's plain nn.Linear weights (of a prepacked dtype), kept current."""

    def __init__(self):
        self._keys: dict[int, tuple] = {}         # data_ptr -> (version, shape, dtype) when packed
        self._finalizer = weakref.finalize(self, _drop, self._keys)

    def refresh(self, model: nn.Module) -> None:
        """Pack the weights that are new or changed since the last call; drop those the model no longer has."""
        from .model import _plain

        current: dict[int, tuple] = {}
        for module in model.modules():
            if not _plain(module, nn.Linear):
                continue
            weight = module.weight
            if weight.device.type != "cpu" or not prepacking_applies(weight.dtype):
                continue
            pointer = weight.data_ptr()
            key = (None if weight.is_inference() else weight._version, tuple(weight.shape), weight.dtype)
            current[pointer] = key
            if self._keys.get(pointer) != key or pointer not in _PACKED:
                source = weight.detach()
                with torch.no_grad():
                    _PACKED[pointer] = (source, torch.ops.mkldnn._reorder_linear_weight(source))
        for pointer in self._keys.keys() - current.keys():
            _PACKED.pop(pointer, None)
        self._keys.clear()
        self._keys.update(current)

    def clear(self) -> None:
        _drop(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


__all__ = ["PREPACK_DTYPES", "PrepackedLinears", "prepacked_linear", "prepacking_applies"]
