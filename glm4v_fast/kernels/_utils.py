"""Shared plumbing for the kernels: optional Triton import, launch checks and op registration.

Triton is an optional dependency of the package (there is no Linux wheel everywhere, and the pure-PyTorch
path needs none), so importing ``glm4v_fast.kernels`` must work without it. The kernel modules therefore
import ``triton`` and ``tl`` from here: when Triton is missing they get a stand-in whose ``jit`` leaves
the function undecorated and whose ``tl.constexpr`` only serves as an annotation. Nothing in a kernel body
runs in that case, because every wrapper calls :func:`check_launchable` first.

Triton decides at *decoration* time whether ``@triton.jit`` builds a compiled kernel or an interpreted one
(``TRITON_INTERPRET=1``), so the state is read once, from a probe kernel decorated at import.

Launches: every launcher is registered as a ``torch.ops.glm4v_fast`` op (:func:`register_op`) so that
torch.compile and ``torch.export`` trace one op per launch, but eager calls skip the dispatcher and call the
launcher directly (the registered op costs tens of microseconds of Python per call).

Autograd (the Liger-Kernel pattern): each public wrapper runs its plain forward when no gradient is needed
(:func:`needs_grad` is False: grad mode off, or no input requires grad), and otherwise a
``torch.autograd.Function`` whose backward launches the op's Triton backward kernel.
"""
from __future__ import annotations

import functools
import threading
import types
from typing import Callable, Iterable, Optional

import torch

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only on machines without triton
    _IMPORT_ERROR = exc

    def _undecorated(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    class _Constexpr:  # stands in for tl.constexpr in annotations and module-level constants
        def __init__(self, value=None):
            self.value = value

    triton = types.SimpleNamespace(jit=_undecorated)
    tl = types.SimpleNamespace(constexpr=_Constexpr)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _jit_builds_interpreted_kernels() -> bool:
    """Whether ``@triton.jit`` builds interpreted kernels in this process (``TRITON_INTERPRET=1`` at import).

    The probe kernel is local to this function, and the module keeps only the answer: torch's ``triton_op``
    looks for an op's kernels by following the names its launcher uses, and a module-level probe reachable
    that way was recorded as every op's kernel.
    """
    if _IMPORT_ERROR is not None:
        return False

    @triton.jit
    def probe(x_ptr):
        tl.store(x_ptr, 1)

    return type(probe).__name__ == "InterpretedFunction"


_KERNELS_INTERPRETED = _jit_builds_interpreted_kernels()

# Two interpreter bugs (triton 3.9, runtime/interpreter.py) that the helpers below work around; on a GPU
# the flag is a False constexpr and the workaround branches are pruned at compile time.
# - cast_impl turns fp32 into bf16 by truncation, not round-to-nearest-even, so CPU runs would disagree
#   with the GPU and with torch by one bf16 ulp;
# - create_dot multiplies bf16 operands as their raw uint16 bit patterns.
_INTERPRETING = tl.constexpr(_KERNELS_INTERPRETED)


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """x.to(dtype) with round-to-nearest-even on every backend (see _INTERPRETING)."""
    if _INTERPRETING and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (see _INTERPRETING for the interpreter branch)."""
    if _INTERPRETING:
        # Exact: fp16/bf16 values are representable in fp32, and accumulation is fp32 either way.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


def triton_available() -> bool:
    """True when the ``triton`` package could be imported."""
    return _IMPORT_ERROR is None


def interpreter_enabled() -> bool:
    """True when the kernels were built for the Triton CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _KERNELS_INTERPRETED


def can_run_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    if not triton_available():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def check_launchable(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise a clear error when ``op`` cannot launch on these tensors (all on one device, runnable there)."""
    if not triton_available():
        raise RuntimeError(
            f"{op}: the Triton kernels need the 'triton' package ({_IMPORT_ERROR}); "
            "install it or use kernels='torch'"
        )
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present[1:]:
        if t.device != device:
            raise ValueError(f"{op}: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if not interpreter_enabled():
            raise ValueError(
                f"{op}: CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1 before triton is "
                "imported, or use kernels='torch'"
            )
        return
    raise ValueError(f"{op}: unsupported device {device}; use CUDA tensors or kernels='torch'")


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes: Iterable[torch.dtype] = SUPPORTED_DTYPES) -> None:
    if t.dtype not in tuple(dtypes):
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected one of {tuple(dtypes)}")


def check_out(op: str, out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """Return ``out`` after checking it, or a fresh contiguous tensor when it is None."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{op}: out must be {tuple(shape)} {dtype} on {device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    return out


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def row_num_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: enough threads to hold the row in registers (Liger/unsloth)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """True when autograd must record this call: grad mode is on and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_no_out_under_grad(op: str, **outs: Optional[torch.Tensor]) -> None:
    """``out=`` buffers are not differentiable (as in torch): refuse them when a gradient is needed."""
    given = [name for name, t in outs.items() if t is not None]
    if given:
        raise ValueError(f"{op}: {', '.join(given)}= cannot be used when a gradient is needed (an input requires "
                         "grad and grad mode is on); drop it, or call under torch.no_grad()")


def as_rows(op: str, name: str, t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """View t as (rows, n_cols) with unit column stride; copies only when no such view exists."""
    if t.shape[-1] != n_cols:
        raise ValueError(f"{op}: {name} has last dim {t.shape[-1]}, expected {n_cols}")
    t2 = t.reshape(-1, n_cols) if t.dim() != 2 else t
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def row_programs(n_rows: int, device: torch.device) -> int:
    """Programs for a backward kernel that loops over rows and sums weight gradients per program.

    CUDA: up to 512, about 4 per SM on an H100 (132 SMs), so that several programs per SM keep loads in
    flight while each walks its rows; the (programs, C) fp32 partial sums stay a few MB. A fixed count rather
    than one from the device's SM count: nothing to query while torch.compile traces, and the same reduction
    order (so the same dweight bits) on every GPU. The interpreter runs programs one after another, so a few
    suffice (more than one, to exercise the sum).
    """
    return max(1, min(n_rows, 512 if device.type == "cuda" else 4))


TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Set while a launcher runs as a direct eager call (see register_op): its launches need no tracing wrapper.
_direct_call = threading.local()


def kernel_launcher(kernel, grid):
    """``kernel[grid]`` for launching; use it in every registered launcher.

    Called directly in eager mode it is the plain Triton launch. Inside a registered op it is
    ``wrap_triton(kernel)[grid]``, which lets torch.compile trace the launch (and launches directly when the
    op runs eagerly). wrap_triton costs microseconds per call outside a trace (a wrapper object, and a
    higher-order-op dispatch unless triton_op disabled it), which the direct path skips.
    """
    if getattr(_direct_call, "active", False):
        return kernel[grid]
    from torch.library import wrap_triton

    return wrap_triton(kernel)[grid]


def launched_kernels(launcher: Callable) -> list:
    """The ``@triton.jit`` kernels a launcher names (module globals it refers to), in the order it names them."""
    from triton.runtime.jit import JITFunction

    found = (launcher.__globals__.get(name) for name in launcher.__code__.co_names)
    return [k for k in dict.fromkeys(found) if isinstance(k, JITFunction)]


def _record_kernels(qualname: str, launcher: Callable) -> None:
    """Tell torch which kernels the op ``qualname`` launches.

    AOTAutograd's cache key includes the source of every kernel of the ``triton_op``s in a graph, which torch
    finds by reading the launcher for ``wrap_triton(<kernel>)`` calls. Our launchers launch through
    :func:`kernel_launcher`, which that reading cannot follow, so the kernels are named here; without them an
    edited kernel could be served from a stale cache entry. The registry is torch's own (absent in releases
    without the cache key: nothing to do there).
    """
    registry = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
    if isinstance(registry, dict):
        registry[qualname] = launched_kernels(launcher)


def register_op(name: str, mutates_args: Iterable[str]) -> Callable[[Callable], Callable]:
    """Register a launcher as ``torch.ops.glm4v_fast.<name>`` and return a function that calls it.

    Compiled Triton with a CUDA device: ``torch.library.triton_op``, which lets Inductor trace through
    ``wrap_triton`` launches. Interpreter (or no Triton): ``wrap_triton`` cannot capture an interpreted kernel
    and would hand fake tensors to it under torch.compile, so the launcher is an opaque ``custom_op`` instead;
    it still runs eagerly, and torch.compile treats it as a black box. Every op mutates only its ``out``
    buffers and returns None, so the fake implementation has nothing to do. Without a CUDA device compiled
    kernels cannot launch at all, so the op is a ``custom_op`` there too: ``triton_op`` inspects the launcher
    with Inductor's code utilities, whose import costs over a second (``glm4v-fast info`` on a CPU machine).

    The returned function goes through the registered op only while torch.compile (or torch.export) traces;
    in eager mode it calls the launcher directly, skipping the dispatcher's Python overhead
    (``bench/test_bench_launch.py`` measures the difference), and the launcher's :func:`kernel_launcher`
    calls launch without the tracing wrapper. ``.op`` is the registered op, ``.direct`` the launcher.
    """
    mutates_args = tuple(mutates_args)

    def decorate(fn: Callable) -> Callable:
        qualname = f"glm4v_fast::{name}"
        if triton_available() and not interpreter_enabled() and torch.cuda.is_available():
            op = torch.library.triton_op(qualname, fn, mutates_args=mutates_args)
            _record_kernels(qualname, fn)
        else:
            op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
            op.register_fake(lambda *args, **kwargs: None)

        @functools.wraps(fn)
        def launch(*args, **kwargs):
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            outer = getattr(_direct_call, "active", False)
            _direct_call.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                _direct_call.active = outer

        launch.op = op
        launch.direct = fn
        return launch

    return decorate
