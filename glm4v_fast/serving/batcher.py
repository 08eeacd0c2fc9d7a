"""Dynamic batching: requests that arrive close together share one packed varlen forward.

The vision tower packs any number of images into one sequence (attention never crosses image boundaries), so
batching changes no result beyond float rounding: every request gets exactly the rows its own images produce.

Threading model: request handlers run on the asyncio event loop and only *submit* jobs; one dedicated worker
thread owns the model, collects jobs, runs the forward and hands results back to the loop with
`call_soon_threadsafe`. The loop therefore never blocks on the model, and the model never runs two batches at
once (which on a GPU would only make both slower).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from ..isolation import isolate_failures

logger = logging.getLogger("glm4v_fast.serving")


class QueueFull(Exception):
    """Admission refused: --max-queue requests are already waiting for the model."""


class ShuttingDown(Exception):
    """Admission refused: the server is draining."""


@dataclass(eq=False)  # identity: a queue removes *this* job, and tensors have no boolean ==
class Job:
    """One request's images, preprocessed: packed pixel rows and their (K, 3) grid."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        """Patch rows this job adds to a forward (what the attention and GEMM cost scales with)."""
        return int(self.pixel_values.shape[0])


class EncodeFailed(Exception):
    """What a request whose forward failed receives: the original error's type and message, without its traceback.

    The traceback of an exception raised inside the model references the forward's frames and, through them,
    every activation; handing that exception to the request would keep them alive for as long as anything holds
    the exception (the future, a log record, a reference cycle). The traceback is logged here as text instead.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _failure(exc: BaseException, what: str) -> EncodeFailed:
    """Log `exc` with its traceback (as text: a log record holding exc_info would keep the frames alive), free
    the frames' locals, and return the traceback-free error to hand to the waiting requests."""
    logger.error("%s failed:\n%s", what, "".join(traceback.format_exception(exc)).rstrip())
    traceback.clear_frames(exc.__traceback__)
    return EncodeFailed(type(exc).__name__, str(exc))


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    # Runs on the event loop. The handler may have gone away (client disconnected, task cancelled): then the
    # future is already done and the result is simply dropped.
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DynamicBatcher:
    """Collects jobs for up to `max_wait_s` (from the oldest one) or until `max_batch_tokens` patch rows, in
    arrival order, and encodes them in one forward on a worker thread.

    Admission is two-step so that an overloaded server refuses work before spending CPU on decoding it:
    `reserve()` when a request arrives (False when `max_queue` requests already wait), then `submit()` the
    preprocessed job, or `release()` the reservation if preprocessing failed. A reservation counts as queued
    until its job is taken into a batch.

    Args:
        encode: `encode(pixel_values, grid_thw) -> (tokens, D) tensor`, the model call (run on the worker thread).
        merge_unit: patch rows per output token (spatial_merge_size ** 2), to split the output per image.
        metrics: a ServerMetrics (or None).
    """

    def __init__(self, encode, merge_unit: int, max_batch_tokens: int, max_wait_s: float, max_queue: int,
                 metrics=None):
        if max_batch_tokens <= 0 or max_queue <= 0 or max_wait_s < 0:
            raise ValueError("max_batch_tokens and max_queue must be positive and max_wait_s non-negative")
        self.encode = encode
        self.merge_unit = merge_unit
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._reserved = 0          # admitted requests not yet taken into a batch (being decoded, or in _jobs)
        self._closing = False       # no new admissions; the worker exits once _jobs is empty
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- admission (event loop side)
    def reserve(self) -> None:
        """Admit one request or raise QueueFull / ShuttingDown."""
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if self._reserved >= self.max_queue:
                raise QueueFull(f"{self._reserved} requests are already waiting (--max-queue {self.max_queue})")
            self._reserved += 1
            self._set_depth()

    def release(self) -> None:
        """Give back a reservation whose request never became a job (bad input, client gone)."""
        with self._cond:
            self._reserved -= 1
            self._set_depth()
            self._cond.notify_all()

    def abandon(self, job: Job) -> bool:
        """Drop a job whose client has gone, if it is still queued (True then); its pixels are freed at once."""
        with self._cond:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False  # already taken into a batch (or never submitted)
            self._reserved -= 1
            self._set_depth()
            job.pixel_values = None
            self._cond.notify_all()
            return True

    def submit(self, job: Job) -> None:
        """Queue a job under a reservation taken with reserve(). Jobs reserved before shutdown are still run."""
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        return self._reserved

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._reserved)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="glm4v-batcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Refuse new requests; jobs already admitted are still encoded."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Close, wait for every admitted job to be encoded and the worker to exit. True if it did in time."""
        self.close()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # ---------------------------------------------------------------- worker thread
    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is ready; None when closing and nothing is left to do."""
        with self._cond:
            # Wait for a first job. While closing, reservations still being decoded may yet submit theirs.
            while not self._jobs:
                if self._closing and self._reserved == 0:
                    return None
                self._cond.wait(0.1 if self._closing else None)
            batch = [self._jobs.popleft()]
            tokens = batch[0].tokens
            deadline = batch[0].enqueued_at + self.max_wait_s
            while tokens < self.max_batch_tokens:
                if self._jobs:
                    # FIFO: a job that does not fit ends the batch rather than being overtaken.
                    if tokens + self._jobs[0].tokens > self.max_batch_tokens:
                        break
                    job = self._jobs.popleft()
                    batch.append(job)
                    tokens += job.tokens
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing:
                    break
                self._cond.wait(remaining)
            self._reserved -= len(batch)
            self._set_depth()
            return batch

    def _run(self) -> None:
        with torch.inference_mode():
            # The batch lives only inside _serve_one: nothing of it is held while waiting for the next one.
            while self._serve_one():
                pass

    def _serve_one(self) -> bool:
        batch = self._next_batch()
        if batch is None:
            return False
        try:
            self._encode_batch(batch)
        except BaseException as exc:  # never let the worker die: fail this batch, keep serving
            error = _failure(exc, f"batch of {len(batch)} requests")
            for job in batch:
                self._deliver(job, error=error)
        finally:
            for job in batch:  # whatever else still holds a Job (a pending callback) must not hold its pixels
                job.pixel_values = None
        return True

    def _encode_batch(self, batch: list[Job]) -> None:
        def retrying(exc: Exception) -> None:
            logger.warning("batched forward of %d requests failed (%s: %s); retrying them one by one",
                           len(batch), type(exc).__name__, exc)

        # One job's input must not fail the others: a failed batch is encoded again job by job.
        results, alone = isolate_failures(batch, self._forward, lambda exc, job: _failure(exc, "request"),
                                          on_batch_failure=retrying)
        if alone is None:
            for job, result in zip(batch, results):
                self._deliver(job, result=result)
            return
        for job, outcome in zip(batch, alone):
            if outcome.ok:
                self._deliver(job, result=outcome.value[0])
            else:
                self._deliver(job, error=outcome.error)

    def _forward(self, batch: list[Job]) -> list:
        """One packed forward of `batch`: each job's per-image output rows (float32, CPU), in job order."""
        started = time.monotonic()
        pixel_values = torch.cat([job.pixel_values for job in batch]) if len(batch) > 1 else batch[0].pixel_values
        grid = torch.cat([job.grid_thw for job in batch]) if len(batch) > 1 else batch[0].grid_thw
        tokens = int(pixel_values.shape[0])
        out = self.encode(pixel_values, grid)
        del pixel_values
        # Output rows per image, then per job, in packing order; float32 on the CPU for the response.
        out = out.float().cpu()
        per_image = torch.split(out, (grid.prod(-1) // self.merge_unit).tolist())
        del out
        results, k = [], 0
        for job in batch:
            n = job.grid_thw.shape[0]
            results.append(per_image[k:k + n])
            k += n
        if self.metrics is not None:
            now = time.monotonic()
            self.metrics.batch_images.observe(int(grid.shape[0]))
            self.metrics.batch_tokens.observe(tokens)
            self.metrics.batch_requests.observe(len(batch))
            self.metrics.forward_seconds.observe(now - started)
            for job in batch:
                self.metrics.queue_seconds.observe(started - job.enqueued_at)
        return results

    @staticmethod
    def _deliver(job: Job, result=None, error: BaseException | None = None) -> None:
        try:
            job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
        except RuntimeError:
            pass  # the event loop is closed: nobody is waiting for this result any more
