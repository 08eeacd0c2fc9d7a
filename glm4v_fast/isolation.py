"""Isolating the bad item: when work on a batch fails, redo it item by item so that only the failing items fail.

Used wherever several inputs share one step: the pipeline's preprocessing and packed forward, the Ray Data
embedder's chunks, and the server's batches of requests. One bad image (or one request whose input breaks the
forward) must not cost the others their results.
"""
from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


class Outcome(NamedTuple):
    """One item's result when its batch had to be redone item by item."""

    value: Any = None   # run([item]) for this item alone; None when it failed
    error: Any = None   # describe(exception, item) when it failed, else None

    @property
    def ok(self) -> bool:
        return self.error is None


def isolate_failures(items: Sequence, run: Callable[[Sequence], Any], describe: Callable[[Exception, Any], Any],
                     on_batch_failure: Callable[[Exception], None] | None = None) -> tuple[Any, list[Outcome] | None]:
    """`run(items)`; when it raises, `run([item])` for each item alone.

    Returns `(run(items), None)` when the batch succeeds, else `(None, outcomes)`: an Outcome per item, in order.
    A failed item's exception is handed to `describe(exception, item)`, and what that returns is kept (a message,
    an error without a traceback); `describe` may also raise to stop at the first bad item. `on_batch_failure` is
    told of the batch's own failure before the items are redone (a single item is not redone: its failure is
    described at once). Exceptions are never kept: the frames of a failed forward hold its activations, so they
    are cleared before anything else runs.
    """
    try:
        return run(items), None
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)
        if len(items) == 1:
            return None, [Outcome(error=describe(exc, items[0]))]
        if on_batch_failure is not None:
            on_batch_failure(exc)
    outcomes = []
    for item in items:
        try:
            outcomes.append(Outcome(value=run([item])))
        except Exception as exc:
            traceback.clear_frames(exc.__traceback__)
            outcomes.append(Outcome(error=describe(exc, item)))
    return None, outcomes


def reason(exc: BaseException) -> str:
    """How a failed item's error is reported in results: "ValueError: <message>"."""
    return f"{type(exc).__name__}: {exc}"
