"""The embedding server under hostile input and load (issue 12), in-process and on 127.0.0.1 only.

One uvicorn server runs in a thread of the test process (the same protocol, limits and timeouts as
`glm4v-fast serve`) with the tiny checkpoint; the batcher tests need no server at all. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import socket
import threading
import time
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from glm4v_fast.serving.batcher import DynamicBatcher, EncodeFailed, Job  # noqa: E402


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------------
# 1. nothing a request leaves behind outlives it
# ---------------------------------------------------------------------------------------------------------------
def _submit(batcher, loop, rows: int, value: float = 1.0):
    """Submit one job of `rows` patch rows; returns its future and a weak reference to its pixels."""
    pixel_values = torch.full((rows, 8), value)
    ref = weakref.ref(pixel_values)
    future = loop.create_future()
    batcher.reserve()
    batcher.submit(Job(pixel_values, torch.tensor([[1, rows // 4, 4]]), future, loop))
    return future, ref


def test_failed_batch_keeps_no_tensors_alive():
    """A forward that fails (here: out of memory) leaves neither its inputs nor its activations behind, without
    waiting for the garbage collector or for the next batch."""
    activations = []

    def encode(pixel_values, grid):
        hidden = pixel_values.repeat(64, 1)          # an activation the failing forward holds in its frame
        activations.append(weakref.ref(hidden))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    batcher = DynamicBatcher(encode, merge_unit=4, max_batch_tokens=1024, max_wait_s=0.2, max_queue=8)

    async def scenario():
        loop = asyncio.get_running_loop()
        submitted = [_submit(batcher, loop, 16, float(i)) for i in range(3)]  # one batch, then each alone
        results = await asyncio.wait_for(asyncio.gather(*(f for f, _ in submitted), return_exceptions=True), 10)
        return results, [ref for _, ref in submitted]

    gc.disable()  # reference cycles would otherwise be freed by luck of timing; the batch must not need them
    batcher.start()
    try:
        results, input_refs = asyncio.run(scenario())
        assert all(isinstance(r, EncodeFailed) and "out of memory" in str(r) for r in results), results
        assert len(activations) == 4  # the batched forward, then each request alone
        # Once the results are delivered the worker lets go of the batch: no cycle, no lingering local.
        wait_until(lambda: all(r() is None for r in input_refs + activations), what="the batch's tensors to be freed")
        assert all(r.__traceback__ is None for r in results)  # nothing of the forward rides along
    finally:
        gc.enable()
        assert batcher.join(timeout=10)


def test_last_batch_is_not_kept_until_the_next():
    batcher = DynamicBatcher(lambda pv, grid: pv.view(-1, 4, pv.shape[1]).mean(1), merge_unit=4,
                             max_batch_tokens=1024, max_wait_s=0.0, max_queue=8)

    async def scenario():
        loop = asyncio.get_running_loop()
        future, ref = _submit(batcher, loop, 8)
        result = await asyncio.wait_for(future, 10)
        return result, ref

    gc.disable()
    batcher.start()
    try:
        result, ref = asyncio.run(scenario())
        assert result[0].shape == (2, 8)
        wait_until(lambda: ref() is None, what="the served batch's pixels to be freed")
    finally:
        gc.enable()
        assert batcher.join(timeout=10)
