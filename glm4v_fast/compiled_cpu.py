"""The compiled CPU forward: VisionModel's packed forward under `torch.compile` (inductor) on a CPU.

What runs where:

- the linears go to oneDNN (bf16, AMX / AVX512-BF16) and MKL (float32) GEMMs on the weights, which are graph
  inputs. Inductor's `freezing` (weights as constants, prepacked for oneDNN by `cpp.weight_prepack`) is available
  (`CompiledCpuForward.freeze`, `FREEZE_DTYPES`) but off: on the full tower in bf16 it measured no faster than
  the plain GEMMs (docs/results.md), while it doubles the weights' memory (the packed copies), doubles the cold
  compile and keeps the graph out of the on-disk caches (inductor cannot pickle oneDNN-packed tensors; AOT
  autograd's cache refuses frozen graphs). In float32 inductor packs no linear whose row count is dynamic. The
  path is for inference: a forward that needs a gradient runs eagerly;
- the element-wise work (RMSNorm with the residual add, rotary, SiLU·mul, LayerNorm·GELU) is the PyTorch twins
  of the Triton kernels, fused by inductor into C++/OpenMP loops;
- attention is SDPA's CPU flash kernel, one call per run of equal-length segments (as the eager `sdpa`
  backend), behind an opaque custom op (`glm4v_fast::cpu_segment_attention`) that reads the runs from a small
  host tensor: the graph does not depend on how the tokens split into images.

Shapes: the token count and the number of runs are dynamic dimensions (`torch._dynamo.mark_dynamic`), so one
compiled graph serves every image size and mix, with no recompilation per shape and no padding.

Compile cost and cache: the first call of a process traces the tower (dynamo) and compiles it (inductor); the
cost at full size is measured in docs/results.md. The compiled code is kept on disk in `TORCHINDUCTOR_CACHE_DIR`
when the environment sets it, else in `default_cache_dir()` (~/.cache/glm4v-fast/inductor, or under
$XDG_CACHE_HOME). The graph is kept whole by inductor's FX graph cache and AOT autograd's cache: a later process
with the same torch, model shape and dtype traces the tower again but compiles nothing. (A frozen graph is not
kept whole: a later process lowers it again and reuses only the compiled C++ kernels.)

Without a C++ compiler (inductor needs one, g++ or $CXX), the model runs eagerly and says so once in the log; a
compile that fails at run time does the same.
"""
from __future__ import annotations

import logging
import os
import types
from typing import NamedTuple

import torch

from .options import COMPILE_CHOICES

logger = logging.getLogger("glm4v_fast")

# Overrides what compile="auto" picks, for a whole process: "off" keeps every model eager, "cpu" compiles where
# the path can run. An explicit compile="cpu" / "off" on the model is not affected.
ENV_VAR = "GLM4V_FAST_COMPILE"

# The dtypes in which "auto" compiles on a CPU: those measured faster than the eager path in ranges that do not
# overlap (bench/cpu_towers.py; docs/results.md). float16 is not measured on a CPU and stays eager.
AUTO_DTYPES = (torch.float32, torch.bfloat16)
# The dtypes compiled with inductor's freezing (weights prepacked for oneDNN): none, see the module docstring.
FREEZE_DTYPES: tuple[torch.dtype, ...] = ()



# ---------------------------------------------------------------------------------------------------------------
# Attention: SDPA's CPU kernel per run of equal-length segments, opaque to the compiler
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("glm4v_fast::cpu_segment_attention", mutates_args=(), device_types="cpu")
def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Attention within each segment; `runs` (3R,) int64 on the host: (first token, segments, length) per run,
    flat so that its length is never 1 (dynamo would specialise a dimension of size 1 and recompile)."""
    from .attention import _sdpa_runs

    return _sdpa_runs(q, k, v, runs.reshape(-1, 3).tolist(), scale)


@segment_attention.register_fake
def _segment_attention_fake(q, k, v, runs, scale):
    return q.new_empty(q.shape)


class CompiledLayout(NamedTuple):
    """What the compiled forward reads of a layout: the rotary tables and the attention runs (a flat host tensor)."""

    cos: torch.Tensor
    sin: torch.Tensor
    runs: torch.Tensor


def _attention(q, k, v, layout: CompiledLayout, scale: float) -> torch.Tensor:
    return segment_attention(q, k, v, layout.runs, scale)


def _packed_forward(model, pixel_values, positions, layout):
    out = model.forward_packed(pixel_values, layout, positions=positions, attention=_attention)
    return out.last_hidden_state, out.pooler_output


# ---------------------------------------------------------------------------------------------------------------
# Environment: the C++ compiler and the compile cache
# ---------------------------------------------------------------------------------------------------------------
def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use ($CXX, else g++), or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:       # inductor raises InvalidCxxCompiler; an import failure means no inductor at all
        return None


def default_cache_dir() -> str:
    """Where the compiled code is kept unless TORCHINDUCTOR_CACHE_DIR says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "glm4v-fast", "inductor")


def cache_dir() -> str:
    """The compile cache directory of this process: TORCHINDUCTOR_CACHE_DIR, set to `default_cache_dir()` when
    the environment does not set it (inductor reads the variable for every cache it keeps). torch writes its own
    default (/tmp/torchinductor_<user>) into the variable the first time it looks (importing torch._dynamo
    does): that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path or os.path.abspath(path) == os.path.abspath(torch_default()):
        path = os.environ["TORCHINDUCTOR_CACHE_DIR"] = default_cache_dir()
    os.makedirs(path, exist_ok=True)
    return path


def check_choice(choice: str) -> str:
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {choice!r}")
    return choice


def effective_choice(choice: str) -> str:
    """`choice` with GLM4V_FAST_COMPILE applied to "auto"."""
    if choice != "auto":
        return choice
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return "auto"
    if env not in COMPILE_CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {COMPILE_CHOICES}, got {os.environ[ENV_VAR]!r}")
    return env


NO_COMPILER = "no C++ compiler (inductor needs g++ or $CXX)"


def decide(choice: str, device: torch.device, dtype: torch.dtype, kernels: str) -> tuple[bool, str]:
    """(compile?, why) for a model's compile option on (device, dtype, resolved kernels), gradients aside;
    no compile without a C++ compiler (`NO_COMPILER`)."""
    choice = effective_choice(check_choice(choice))
    if choice == "off":
        return False, "compile='off'"
    if device.type != "cpu":
        return False, f"the compiled path is for CPU tensors, not {device.type}"
    if kernels != "torch":
        return False, f"kernels={kernels!r}: the compiled path fuses the PyTorch kernels"
    if choice == "auto" and dtype not in AUTO_DTYPES:
        return False, f"compile='auto' keeps {str(dtype).removeprefix('torch.')} eager on a CPU (not measured faster)"
    if cxx_compiler() is None:
        return False, NO_COMPILER
    return True, f"compile={choice!r}"


# ---------------------------------------------------------------------------------------------------------------
# The compiled forward of one model
# ---------------------------------------------------------------------------------------------------------------
class CompiledCpuForward:
    """A VisionModel's compiled CPU forward, built on first use.

    The model owns one (`VisionModel(compile=...)`) and asks `applies` before each packed forward. Unfrozen, the
    weights are inputs of the compiled graph, which follows any change of them. Frozen (`freeze`: None follows
    FREEZE_DTYPES; True or False forces it, as the benchmark does), they are constants of the compiled code,
    which is then keyed on every parameter's storage and version: an in-place update (load_state_dict, copy_) or
    a move rebuilds it (weights made under torch.inference_mode have no version counter: an in-place edit of
    those inside inference_mode is not seen, as for the eager path's cached derived weights).
    """

    _logged: set[str] = set()   # one log line per reason and process, however many models fall back

    freeze: bool | None = None

    def __init__(self, choice: str = "auto"):
        self.choice = check_choice(choice)
        self._decisions: dict[tuple, tuple[bool, str]] = {}
        self._fn = None
        self._weights_key = None
        self.failed: str | None = None      # why the path was given up at run time (the model then runs eagerly)

    def clear(self) -> None:
        """Drop the compiled code (the model moved or changed dtype)."""
        self._fn, self._weights_key = None, None

    def decision(self, model) -> tuple[bool, str]:
        """(compile?, why) for the model's device, dtype and kernels, ignoring gradients (cached per key)."""
        from .model import select_ops

        device, dtype = model.device, model.dtype
        key = (device, dtype, model.kernels, effective_choice(self.choice))
        if key not in self._decisions:
            use, why = decide(self.choice, device, dtype, select_ops(model.kernels, device).name)
            if use:
                cache_dir()     # before inductor is imported: torch sets its own default dir on first use
            if why == NO_COMPILER:
                self._log_once("no-compiler", "glm4v-fast: no C++ compiler found (g++ or $CXX), so the vision tower "
                                              "runs eagerly on the CPU instead of compiled")
            self._decisions[key] = (use, why)
        return self._decisions[key]

    def applies(self, model, pixel_values: torch.Tensor, layout) -> bool:
        """Whether this packed forward runs compiled: CPU, no gradient needed, a PackedBatch layout."""
        if self.failed is not None or not hasattr(layout, "equal_runs"):
            return False
        if torch.is_grad_enabled() and (pixel_values.requires_grad or any(p.requires_grad for p in model.parameters())):
            return False
        return self.decision(model)[0]

    def __call__(self, model, pixel_values: torch.Tensor, layout, positions: torch.Tensor | None):
        from .model import VisionOutput

        if positions is None:
            positions = model.position_embeddings(layout)
        x = pixel_values if pixel_values.device == model.device else pixel_values.to(model.device)
        runs = torch.tensor(layout.equal_runs, dtype=torch.int64).reshape(-1)
        compiled_layout = CompiledLayout(layout.cos, layout.sin, runs)
        for t in (x, positions, layout.cos, layout.sin, runs):
            torch._dynamo.mark_dynamic(t, 0)
        try:
            # Patched for the call, not passed as torch.compile options: dynamo reads `freezing` while it traces
            # (to make the parameters graph constants), before inductor's options apply.
            from torch._inductor import config as inductor_config

            with inductor_config.patch(freezing=self.frozen(model)):
                features, merged = self._compiled(model)(model, x, positions, compiled_layout)
        except Exception as exc:    # a compiler error must not take the encoder down: run eagerly from now on
            if isinstance(exc, (KeyboardInterrupt, MemoryError)):
                raise
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.clear()
            self._log_once("failed", f"glm4v-fast: compiling the vision tower failed ({self.failed}); it runs eagerly")
            return None
        return VisionOutput(last_hidden_state=features, pooler_output=merged)

    def frozen(self, model) -> bool:
        """Whether the model's compiled code has its weights frozen (prepacked constants)."""
        return self.freeze if self.freeze is not None else model.dtype in FREEZE_DTYPES

    def _compiled(self, model):
        key = None
        if self.frozen(model):
            key = tuple((p.data_ptr(), None if p.is_inference() else p._version) for p in model.parameters())
        if self._fn is None or key != self._weights_key:
            cache_dir()
            # A fresh code object per compiled model: dynamo keeps its compiled entries on the code object, so a
            # shared one would make models count against each other's recompile limit (and keep stale frozen
            # weights alive); the entries go with the model.
            code = _packed_forward.__code__.replace()
            fn = types.FunctionType(code, _packed_forward.__globals__, "_packed_forward")
            self._fn = torch.compile(fn)
            self._weights_key = key
        return self._fn

    @classmethod
    def _log_once(cls, reason: str, message: str) -> None:
        if reason not in cls._logged:
            cls._logged.add(reason)
            logger.warning(message)


__all__ = ["AUTO_DTYPES", "ENV_VAR", "FREEZE_DTYPES", "CompiledCpuForward", "CompiledLayout", "cache_dir",
           "cxx_compiler", "decide", "default_cache_dir", "effective_choice", "segment_attention"]
