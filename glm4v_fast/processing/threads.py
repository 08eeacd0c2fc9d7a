"""Torch's intra-op threads inside the processor's own worker threads.

The processor spreads images over a few threads of its own; if each torch resize there also forked a team of
torch's intra-op threads (one per core by default), the threads would multiply beyond the cores, and a model
running beside the preprocessing makes that far worse (OpenMP threads wait for each other by spinning). So a
resize inside a worker thread runs on that thread alone. Torch has no per-thread setting for this;
``torch.set_num_threads`` would also change the count every thread torch sees later starts with. OpenMP's own
``omp_set_num_threads`` sets the calling thread's team size only, which is what is wanted: it is called on
the OpenMP runtime torch loaded. Where that runtime is not found (torch built without OpenMP, no
``/proc/self/maps``) nothing changes.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch


@functools.lru_cache(maxsize=1)
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch uses, or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "omp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            runtime = ctypes.CDLL(path)
            runtime.omp_set_num_threads, runtime.omp_get_max_threads  # noqa: B018  (both must exist)
        except (OSError, AttributeError):
            continue
        return runtime
    return None


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Torch ops of the calling thread run on that thread alone inside the block; other threads are unaffected."""
    runtime = _openmp()
    if runtime is None:
        yield
        return
    torch.get_num_threads()  # torch sets a thread's team size when the thread first uses it: do that first
    previous = runtime.omp_get_max_threads()
    runtime.omp_set_num_threads(1)
    try:
        yield
    finally:
        runtime.omp_set_num_threads(previous)


def in_single_threaded_torch(fn):
    """``fn`` wrapped to run under :func:`single_threaded_torch` (for the processor's worker threads)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with single_threaded_torch():
            return fn(*args, **kwargs)
    return wrapped


__all__ = ["single_threaded_torch", "in_single_threaded_torch"]
