"""Training: forward + backward of glm4v-fast's VisionModel vs transformers' Glm4vVisionModel, pytest-benchmark,
and the activation memory each holds for backward, with and without activation checkpointing.

Both towers get the same seeded weights (transformers' state_dict loaded into ours, glm4v_fast.bench's
build_models), the same pixel_values and the same loss: the merged embeddings times a fixed random tensor,
summed. One timed step = forward, backward, gradients set to None. GPU: the GLM-4.1V tower in bf16 on the
workloads; CPU: the small tower in fp32 on the workloads' grids scaled down by 4 (ratios only).

Activation memory is measured the same way on every device: the bytes of the tensor storages created during the
forward that are still alive once it returns (what autograd holds for backward, plus the output), counted by a
TorchDispatchMode that sees every op's outputs. With checkpointing, a block holds only its input.

extra_info: seconds per step, patches/s, model TFLOP/s (3x the forward FLOP model), activation bytes, and for
ours the speed-up over transformers (same workload, same checkpointing) and the max relative difference of the
parameter gradients. Run: ``python -m pytest -q bench/test_bench_training.py`` (``--benchmark-json=...``).
"""
from __future__ import annotations

import importlib.util
import warnings
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from glm4v_fast import bench as gb
from glm4v_fast.config import VisionConfig
from glm4v_fast.packing import flops

from _tower_setup import DEVICE, DTYPE, GPU, ROUNDS, SEED, SMALL

WORKLOADS = ("single-448", "serving-mix", "hires-1120")

# transformers runs first in each (workload, checkpointing) group so that ours can report the speed-up over it.
CASES = [(w, ckpt, side) for w in WORKLOADS for ckpt in (False, True) for side in ("transformers", "glm4v_fast")]
_SECONDS: dict[tuple[str, bool, str], float] = {}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers is not installed (pip install 'glm4v-fast[test]')")


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated inside the mode that are still alive (views of tensors from outside
    it, such as the parameters, are not counted)."""

    def __init__(self):
        super().__init__()
        self.refs: dict[tuple, int] = {}
        self.sizes: dict[tuple, int] = {}

    @property
    def live(self) -> int:
        return sum(self.sizes[k] for k, n in self.refs.items() if n > 0)

    def _release(self, key) -> None:
        self.refs[key] -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outside = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if self.refs.get(key, 0) == 0:
                if storage.data_ptr() in outside or storage.nbytes() == 0:
                    continue
                self.refs[key], self.sizes[key] = 0, storage.nbytes()
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


@pytest.fixture(scope="module")
def towers():
    config = gb.small_config() if SMALL else VisionConfig()
    ours, hf = gb.build_models(config, DEVICE, DTYPE, seed=SEED)
    ours.train(), hf.train()
    yield SimpleNamespace(config=config, ours=ours, hf=hf)
    del ours, hf
    if GPU:
        torch.cuda.empty_cache()


def _set_checkpointing(model, on: bool, side: str) -> None:
    if side == "glm4v_fast":
        for block in model.blocks:                  # the per-block flag transformers' enable sets
            block.gradient_checkpointing = on
        return
    with warnings.catch_warnings():                 # 5.23 renamed it activation_checkpointing_*
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable() if on else model.gradient_checkpointing_disable()


def _step_fn(model, side, pixel_values, wl, weight):
    grid = wl.hf_grid().to(DEVICE) if side == "transformers" else wl.grid_tensor()

    def forward():
        out = model(pixel_values, grid)
        return gb.hf_embeddings(out) if side == "transformers" else out

    def step():
        (forward().float() * weight).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        gb.synchronize(DEVICE)
        return grads

    return forward, step


@pytest.mark.parametrize("workload,checkpointing,side", CASES,
                         ids=[f"{w}-{'ckpt' if c else 'full'}-{s}" for w, c, s in CASES])
def test_training_step(benchmark, towers, workload, checkpointing, side):
    config = towers.config
    model = towers.ours if side == "glm4v_fast" else towers.hf
    (wl,) = gb.workloads(SMALL, [workload])
    pixel_values = wl.pixel_values(config, DTYPE, DEVICE, seed=SEED + 1 + WORKLOADS.index(workload))
    gen = torch.Generator().manual_seed(SEED)
    weight = torch.randn(wl.patches // config.merge_unit, config.out_hidden_size, generator=gen).to(DEVICE)

    _set_checkpointing(model, checkpointing, side)
    try:
        forward, step = _step_fn(model, side, pixel_values, wl, weight)
        benchmark.group = f"training {workload}"
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        seconds = benchmark.stats.stats.median
        _SECONDS[(workload, checkpointing, side)] = seconds

        with LiveBytes() as mem:
            out = forward()
        activation_bytes = mem.live
        del out
    finally:
        _set_checkpointing(model, False, side)
        model.zero_grad(set_to_none=True)

    model_flops = 3 * flops(wl.seqlens, config)       # backward ~ twice the forward's matmuls
    info = benchmark.extra_info
    info.update(side=side, workload=wl.name, description=wl.description, checkpointing=checkpointing,
                device=gb.device_name(DEVICE), dtype=str(DTYPE).removeprefix("torch."),
                mode="small" if SMALL else "full", patches=wl.patches, seconds=seconds,
                patches_per_s=wl.patches / seconds, tflops=model_flops / seconds / 1e12,
                activation_bytes=activation_bytes, resolved=list(towers.ours.resolved()))
    if side == "glm4v_fast":
        hf_seconds = _SECONDS.get((workload, checkpointing, "transformers"))
        if hf_seconds is not None:
            info["speedup_vs_transformers"] = hf_seconds / seconds
        ours = step()
        theirs = _step_fn(towers.hf, "transformers", pixel_values, wl, weight)[1]()
        info["max_grad_rel_err_vs_transformers"] = max(gb.max_rel_err(ours[n], theirs[n]) for n in theirs)
    if not GPU:
        info["note"] = "CPU, small tower and grids / 4: compare ratios only"
