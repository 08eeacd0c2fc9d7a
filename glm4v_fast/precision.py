"""The compute dtype picked when the user names none ("auto"), and why.

A user expects what transformers does: the checkpoint's stored dtype (bfloat16 for the released GLM-4V
checkpoints). That holds where the hardware multiplies that dtype natively: CUDA devices, and CPUs with AMX or
AVX512-BF16 (bfloat16) or AMX-FP16 (float16). Elsewhere a CPU emulates bfloat16 and float16 matrix multiplies
through float32 and runs them slower than float32 itself, so "auto" picks float32 there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import torch

logger = logging.getLogger("glm4v_fast")

# What the released GLM-4.1V / 4.5V / 4.6V checkpoints store; the default for random weights.
RELEASED_CHECKPOINT_DTYPE = torch.bfloat16
# /proc/cpuinfo flags (x86) that mean native matrix multiplies in a reduced-precision dtype.
_CPU_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16",)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def cpu_native_dtypes() -> frozenset[torch.dtype]:
    """The reduced-precision dtypes this CPU multiplies natively (faster than float32), as torch sees it.

    torch's own probes (which also check that the OS enables AMX) where this torch has them, else the CPU flags.
    """
    cpu = getattr(torch, "cpu", None)
    probes = {torch.bfloat16: ("_is_amx_tile_supported", "_is_avx512_bf16_supported"),
              torch.float16: ("_is_amx_fp16_supported",)}
    native = set()
    for dtype, names in probes.items():
        found = [getattr(cpu, name, None) for name in names]
        if all(probe is not None for probe in found):
            supported = any(probe() for probe in found)
        else:
            supported = bool(_cpuinfo_flags() & set(_CPU_FLAGS[dtype]))
        if supported:
            native.add(dtype)
    return frozenset(native)


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype "auto" resolved to on a device, with the reason in words."""

    dtype: torch.dtype
    reason: str

    def message(self) -> str:
        """One line for the user: what was chosen, why, and how to choose otherwise."""
        name = dtype_name(self.dtype)
        other = ("--dtype bfloat16 (dtype='bfloat16') to compute in bfloat16" if self.dtype == torch.float32
                 else "--dtype float32 (dtype='float32') for float32, slower and closer to the reference")
        return f"dtype auto -> {name}: {self.reason}; {other}"


def choose_dtype(device: torch.device, stored: torch.dtype | None) -> DtypeChoice:
    """The dtype for "auto": the stored dtype (`None`: random weights, which get the released checkpoints'
    bfloat16) where `device` multiplies it natively, else float32."""
    device = torch.device(device)
    origin = (f"the checkpoint's stored dtype is {dtype_name(stored)}" if stored is not None else
              f"random weights, stored like the released GLM-4V checkpoints in {dtype_name(RELEASED_CHECKPOINT_DTYPE)}")
    stored = stored or RELEASED_CHECKPOINT_DTYPE
    if stored not in _CPU_FLAGS:                # float32 (or float64: computed in float32, as for any dtype else)
        return DtypeChoice(torch.float32, origin)
    if device.type != "cpu":
        return DtypeChoice(stored, f"{origin}, which {device.type} devices compute natively")
    if stored in cpu_native_dtypes():
        return DtypeChoice(stored, f"{origin}, and this CPU multiplies it natively ({_cpu_features(stored)})")
    return DtypeChoice(torch.float32, f"{origin}, but this CPU has no native {dtype_name(stored)} matrix multiply "
                                      f"({' or '.join(_CPU_FLAGS[stored])}), where float32 is faster")


def _cpu_features(dtype: torch.dtype) -> str:
    flags = _cpuinfo_flags() & set(_CPU_FLAGS[dtype])
    return ", ".join(sorted(flags)) or "per torch"


def log_choice(choice: DtypeChoice) -> None:
    logger.info("glm4v-fast: %s", choice.message())


def auto_dtype(device: torch.device, checkpoint=None) -> DtypeChoice:
    """choose_dtype for a checkpoint directory (None: random weights), reading only its headers."""
    from .weights import stored_dtype

    return choose_dtype(device, stored_dtype(checkpoint) if checkpoint is not None else None)
