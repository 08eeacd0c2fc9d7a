"""The checks every option and argument goes through, with one wording: "<name> must be <what>, got <value>".

Used by the processor, the config, the server's settings and requests, video sampling, the pipeline and the Ray
integrations, so that the same mistake reads the same wherever it is made.
"""
from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np

_INTEGERS = (int, np.integer)
_NUMBERS = (int, float, np.integer, np.floating)


def is_int(value: Any) -> bool:
    """An integer, bools excluded (True is not a count)."""
    return isinstance(value, _INTEGERS) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A finite int or float, bools excluded."""
    return isinstance(value, _NUMBERS) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def is_positive_number(value: Any) -> bool:
    return is_number(value) and value > 0


def _require(ok: bool, value: Any, name: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def positive_int(value: Any, name: str) -> int:
    _require(is_int(value) and value > 0, value, name, "a positive integer")
    return int(value)


def non_negative_int(value: Any, name: str) -> int:
    _require(is_int(value) and value >= 0, value, name, "a non-negative integer")
    return int(value)


def positive_number(value: Any, name: str) -> float:
    _require(is_positive_number(value), value, name, "a positive number")
    return float(value)


def non_negative_number(value: Any, name: str) -> float:
    _require(is_number(value) and value >= 0, value, name, "a non-negative number")
    return float(value)


def one_of(value: Any, choices: Collection, name: str) -> Any:
    _require(value in choices, value, name, f"one of {', '.join(repr(c) for c in choices)}")
    return value


def boolean(value: Any, name: str) -> bool:
    _require(isinstance(value, (bool, np.bool_)), value, name, "a bool")
    return bool(value)
