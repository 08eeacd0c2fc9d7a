"""Host-side cost of one kernel-op call: through the registered ``torch.ops.glm4v_fast`` op vs a direct call.

Eager calls go straight to the launcher (kernels/_utils.register_op); the registered op is used only while
torch.compile traces. This measures what that saves per call, on the host, with no device work in it:

- ``noop``: a launcher that does nothing, registered exactly as the kernels are (``triton_op`` with compiled
  Triton, ``custom_op`` under the interpreter or without Triton): the pure dispatcher overhead, any device.
- ``launch_wrapper``: building the launch callable, ``wrap_triton(kernel)[grid]`` (what a launcher inside a
  registered op needs, so torch.compile can trace it) vs ``kernel[grid]`` (what the direct path uses, see
  ``kernel_launcher``); outside a trace, wrap_triton's call also goes through a higher-order-op dispatch
  (not included here: it needs a launch).
- ``rms_norm`` (CUDA only): the real RMSNorm launcher on a (1, 1536) bf16 row, host time per call with
  launches queued asynchronously (the kernel itself takes a few microseconds; the loop is host-bound). On
  CPU the interpreter runs the kernel inside the call, which would drown the difference.

extra_info: microseconds per call, and the same times 120 (about the launches of one GLM-4.1V forward:
24 blocks x 5 element-wise/attention ops). Run: ``python -m pytest -q bench/test_bench_launch.py``.
"""
import importlib

import pytest
import torch

from glm4v_fast.kernels import _utils

GPU = torch.cuda.is_available()
CALLS = 2000
LAUNCHES_PER_FORWARD = 120


@_utils.register_op("bench_noop", mutates_args=("out",))
def _noop(x: torch.Tensor, out: torch.Tensor) -> None:
    return None


def _per_call(benchmark, fn, args, path):
    def loop():
        for _ in range(CALLS):
            fn(*args)
        if GPU:
            torch.cuda.synchronize()

    loop()   # warm-up: first-call caches (dispatcher, Triton's launcher) stay out of the timing
    benchmark.pedantic(loop, rounds=5, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median / CALLS
    benchmark.extra_info.update(path=path, us_per_call=seconds * 1e6,
                                us_per_forward=seconds * 1e6 * LAUNCHES_PER_FORWARD,
                                registration="triton_op" if _utils.triton_available()
                                and not _utils.interpreter_enabled() else "custom_op",
                                device=torch.cuda.get_device_name() if GPU else "cpu", torch=torch.__version__)
    return seconds


@pytest.mark.parametrize("path", ["registered", "direct"])
def test_noop_dispatch(benchmark, path):
    x = torch.empty(4, device="cuda" if GPU else "cpu")
    # "direct" goes through the function register_op returns, as every eager call does.
    fn = _noop.op if path == "registered" else _noop
    _per_call(benchmark, fn, (x, x), path)


@pytest.mark.parametrize("path", ["wrap_triton", "plain"])
def test_launch_wrapper(benchmark, path):
    from torch.library import wrap_triton

    kernel = importlib.import_module("glm4v_fast.kernels.rms_norm")._rms_norm_kernel
    if path == "wrap_triton":
        def fn():
            return wrap_triton(kernel)[(4,)]
    else:
        def fn():
            return kernel[(4,)]
    _per_call(benchmark, fn, (), path)


@pytest.mark.skipif(not GPU, reason="on CPU the interpreter runs the kernel inside the call")
@pytest.mark.parametrize("path", ["registered", "direct"])
def test_rms_norm_launch(benchmark, path):
    launcher = importlib.import_module("glm4v_fast.kernels.rms_norm")._rms_norm_op
    x = torch.randn(1, 1536, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(1536, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    fn = launcher.op if path == "registered" else launcher
    _per_call(benchmark, fn, (x, w, 1e-5, out), path)

