"""Ahead-of-time compilation specs: every kernel configuration a launcher can choose, as data.

Each kernel module exposes ``aot_specs() -> list[AotSpec]``. ``tests/test_aot.py`` (``pytest -m aot``)
compiles every spec for sm_90a and sm_80 with the installed triton's compiler on a machine without a GPU,
and checks that the GLM bf16/fp16 configurations compile without register spills.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["AotSpec"]


@dataclass(frozen=True)
class AotSpec:
    """One kernel configuration, described the way a real launch would specialise it.

    name: a readable id, e.g. ``"rms_norm/bf16/C=1536"``.
    kernel: the ``@triton.jit`` function.
    signature: every runtime (non-constexpr) argument -> triton type string (``"*bf16"``, ``"*fp32"``,
        ``"*i32"``, ``"i32"``, ``"i64"``, ``"fp32"``), in the kernel's argument order.
    constexprs: every ``tl.constexpr`` argument -> its value.
    num_warps, num_stages: the launch options the launcher passes.
    aligned: arguments a real launch specialises as divisible by 16 (pointers 16-byte aligned; integer
        strides and sizes multiples of 16, as GLM's are).
    no_spills: True for the bf16/fp16 configurations GLM shapes use: they must compile without spills.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()
    no_spills: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
