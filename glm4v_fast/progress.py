"""Progress that moves inside a packed forward.

A batch of full-size images is one forward of the tower, minutes long on a CPU; counting finished images alone
leaves a bar at 0 for all that time. The tower's blocks cost the same, so each finished block is 1/depth of the
forward: `block_progress` reports that fraction through forward hooks on the blocks' MLPs (the last module each
block calls), and `ProgressBar` shows fractional counts with the average rate since the start.

On CUDA the hooks fire as the blocks are queued, not as they finish; a GPU batch is short anyway.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def block_progress(model: nn.Module, on_fraction: Callable[[float], None]) -> Iterator[None]:
    """Within the context, each forward of `model` calls `on_fraction(k / depth)` after its k-th block."""
    blocks = model.blocks
    depth = len(blocks)

    def hook(k: int):
        def report(module, args, output) -> None:
            on_fraction(k / depth)      # and return None: a hook's return value would replace the MLP's output
        return report

    handles = [block.mlp.register_forward_hook(hook(k + 1)) for k, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_only(callback: Callable[[float], None]) -> Callable[[float], None]:
    """`callback`, called only with values above the last one (a failed packed forward that is retried one item
    at a time reports its blocks again)."""
    last = float("-inf")

    def report(done: float) -> None:
        nonlocal last
        if done > last:
            last = done
            callback(done)
    return report


def _fractional_bar(tqdm_class):
    """tqdm showing a fractional count to one decimal ("2.4/13"; a whole count as "7/13")."""

    class FractionalBar(tqdm_class):
        @staticmethod
        def format_meter(n, total, elapsed, **kwargs):
            count = f"{n:.1f}".removesuffix(".0")
            kwargs["bar_format"] = ("{l_bar}{bar}| " + count + "/{total_fmt} [{elapsed}<{remaining}, "
                                    "{rate_fmt}{postfix}]")
            return tqdm_class.format_meter(n, total, elapsed, **kwargs)

    return FractionalBar


class ProgressBar:
    """A tqdm bar over `total` items that takes fractional counts (`to`), with an honest rate and ETA: the
    average since the start (no smoothing, so a slow first batch is not forgotten)."""

    def __init__(self, total: int, unit: str, desc: str, disable: bool = False):
        from tqdm.auto import tqdm

        self.bar = _fractional_bar(tqdm)(total=total, unit=unit, desc=desc, disable=disable, smoothing=0)

    @property
    def n(self) -> float:
        return self.bar.n

    def to(self, done: float) -> None:
        """Move the bar forward to `done` items (never back)."""
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
