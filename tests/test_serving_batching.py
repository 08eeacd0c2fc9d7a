"""Dynamic batching: requests packed in order within --max-batch-tokens, each getting its own rows back; a failed
forward keeps nothing alive; the work of a client that has gone is dropped before it reaches the model.
"""
from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import weakref

import pytest
import torch

# The serve extra (starlette, uvicorn, prometheus-client): skipped without it.
pytest.importorskip("uvicorn")
pytest.importorskip("glm4v_fast.serving.app")

from glm4v_fast.serving.batcher import DynamicBatcher, EncodeFailed, Job  # noqa: E402

from _serving import assert_healthy, concurrent_posts, live_fixture, wait_until  # noqa: E402
from _tiny import b64, png_bytes  # noqa: E402

live = live_fixture(max_wait_ms=2, decode_workers=1, cache_mb=0)  # every request encoded


def test_batcher_packs_in_order_within_max_batch_tokens():
    seen = []

    def encode(pixel_values, grid):  # one output row per 4 patch rows: the mean of the 4
        seen.append(int(pixel_values.shape[0]))
        return pixel_values.view(-1, 4, pixel_values.shape[1]).mean(1)

    batcher = DynamicBatcher(encode, merge_unit=4, max_batch_tokens=96, max_wait_s=0.05, max_queue=64)
    grids = [torch.tensor([[1, 4, 4]]), torch.tensor([[1, 2, 4], [1, 4, 2]]), torch.tensor([[1, 8, 4]])] * 4

    async def run():
        loop = asyncio.get_running_loop()
        jobs = []
        for i, grid in enumerate(grids):
            pv = torch.full((int(grid.prod(-1).sum()), 3), float(i))
            batcher.reserve()
            jobs.append(loop.create_future())
            batcher.submit(Job(pv, grid, jobs[-1], loop))
        return await asyncio.wait_for(asyncio.gather(*jobs), 10)

    batcher.start()
    try:
        results = asyncio.run(run())
    finally:
        assert batcher.join(timeout=10)
    assert sum(seen) == sum(int(g.prod(-1).sum()) for g in grids)
    assert len(seen) < len(grids) and all(n <= 96 for n in seen)
    for i, (grid, per_image) in enumerate(zip(grids, results)):
        assert [r.shape[0] for r in per_image] == (grid.prod(-1) // 4).tolist()
        assert all(torch.all(r == i) for r in per_image)  # each job got its own rows back


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


def test_queued_work_of_a_gone_client_is_dropped(live, monkeypatch):
    gate, busy, seen = threading.Event(), threading.Event(), []
    real = live.service.batcher.encode

    def gated_encode(pixel_values, grid):
        seen.append(int(pixel_values.shape[0]))
        busy.set()
        assert gate.wait(30)
        return real(pixel_values, grid)

    monkeypatch.setattr(live.service.batcher, "encode", gated_encode)
    first = png_bytes(56, 56, seed=1)
    gone = png_bytes(112, 112, seed=2)
    abandoned = live.metric("glm4v_abandoned_requests_total")
    with concurrent_posts(live, [{"images": [b64(first)]}]) as results:
        assert busy.wait(30)            # the model is busy with the first request
        body = json.dumps({"images": [b64(gone)] * 4}).encode()
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            wait_until(lambda: live.service.batcher.depth == 1, 10, "the request to be queued")
        # The client is gone: its queued job is dropped (and its reservation given back) while the model is busy.
        wait_until(lambda: live.metric("glm4v_abandoned_requests_total") > abandoned, 10, "the drop")
        assert live.service.batcher.depth == 0
        gate.set()
    assert results[0].status_code == 200
    # The abandoned request's patches never reached the model: one forward, of the first request alone.
    assert seen == [live.service.processor.get_number_of_image_patches(56, 56)]
    assert_healthy(live)
