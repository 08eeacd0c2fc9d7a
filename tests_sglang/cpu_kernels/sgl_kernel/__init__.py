"""A test-only stand-in for SGLang's `sgl_kernel` CPU build, so that SGLang runs on this project's CI machines.

Why: with `SGLANG_USE_CPU_ENGINE=1`, SGLang imports `sgl_kernel` (its C++ kernel library) at module level, but
the package index has CUDA builds of it only; the CPU build is compiled from SGLang's sources (`-march=native`,
libnuma). SGLang's CPU model code uses those kernels only where `torch.ops.sgl_kernel` offers them (the Intel AMX
backend): this module registers no operator, so SGLang takes its plain-torch paths (`attention_backend=
"torch_native"`, PyTorch linear layers and norms). What remains is one KV-cache helper, written here in plain
torch. Every other name imports (SGLang imports many at module level) but raises when called, naming itself, so
a path that needs a real kernel fails loudly instead of computing something else.
"""
from __future__ import annotations

import torch

__version__ = "0.0.0+glm4v-fast-tests"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing_kernel(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not in the test stand-in (tests_sglang/cpu_kernels): "
                                  "this SGLang path needs the real sgl_kernel build")

    missing_kernel.__name__ = name
    return missing_kernel
