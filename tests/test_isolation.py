"""isolate_failures: a failed batch is redone item by item, so only the bad items fail, and no exception (with the
frames of the failed work) is kept."""
from __future__ import annotations

import gc
import weakref

import pytest

from glm4v_fast.isolation import Outcome, isolate_failures, reason


def _doubling(calls):
    def run(items):
        calls.append(list(items))
        if any(item < 0 for item in items):
            raise ValueError(f"negative item in {list(items)}")
        return [2 * item for item in items]
    return run


def test_good_batch_runs_once():
    calls = []
    assert isolate_failures([1, 2, 3], _doubling(calls), lambda exc, item: reason(exc)) == ([2, 4, 6], None)
    assert calls == [[1, 2, 3]]


def test_bad_item_costs_only_itself():
    calls, told = [], []
    whole, alone = isolate_failures([1, -2, 3], _doubling(calls), lambda exc, item: (item, reason(exc)),
                                    on_batch_failure=told.append)
    assert whole is None and calls == [[1, -2, 3], [1], [-2], [3]]
    assert alone == [Outcome([2]), Outcome(error=(-2, "ValueError: negative item in [-2]")), Outcome([6])]
    assert [o.ok for o in alone] == [True, False, True]
    assert len(told) == 1 and "[1, -2, 3]" in str(told[0])


def test_single_item_is_not_redone():
    calls = []
    assert isolate_failures([-1], _doubling(calls), lambda exc, item: reason(exc)) == \
        (None, [Outcome(error="ValueError: negative item in [-1]")])
    assert calls == [[-1]]


def test_describe_may_stop_at_the_first_bad_item():
    def stop(exc, item):
        raise RuntimeError(f"cannot encode item {item}") from exc

    with pytest.raises(RuntimeError, match="cannot encode item -2") as caught:
        isolate_failures([1, -2, -3], _doubling([]), stop)
    assert isinstance(caught.value.__cause__, ValueError)


def test_failed_work_keeps_nothing_alive():
    """The failed run's locals (a forward's activations) are freed once it has failed, without the garbage
    collector, even where the caller keeps the exception itself."""
    held = []

    class Activation:
        pass

    def run(items):
        activation = Activation()       # what a failed forward's frame holds
        held.append(weakref.ref(activation))
        raise ValueError("bad")

    gc.disable()
    try:
        _, alone = isolate_failures([1, 2], run, lambda exc, item: exc)
        assert [reason(o.error) for o in alone] == ["ValueError: bad"] * 2
        assert len(held) == 3 and all(ref() is None for ref in held)
    finally:
        gc.enable()
