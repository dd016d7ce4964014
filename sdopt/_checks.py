"""Argument validation: every check raises ``ValueError`` naming the argument and its value."""

from __future__ import annotations

import math
from collections.abc import Container
from typing import Any


def _fmt(value: Any) -> str:
    return repr(value)


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """``value > 0`` (or ``>= 0`` with ``allow_zero``) and finite."""
    try:
        ok = math.isfinite(float(value)) and (value >= 0 if allow_zero else value > 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {_fmt(value)} (must be a finite number {bound})")
    return float(value)


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An integer (not bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise ValueError(f"Invalid {name}: {_fmt(value)} (must be an integer)") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"Invalid {name}: {_fmt(value)} (must be >= {minimum})")
    if maximum is not None and value > maximum:
        raise ValueError(f"Invalid {name}: {_fmt(value)} (must be <= {maximum})")
    return int(value)


def check_in_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite number in the interval given by ``low``, ``high`` and openness flags."""
    try:
        v = float(value)
        ok = math.isfinite(v)
    except (TypeError, ValueError):
        ok = False
    if ok:
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: {_fmt(value)} (must be in {lb}{low}, {high}{hb})")
    return float(value)


def check_choice(name: str, value: Any, choices: Container[Any]) -> Any:
    """``value`` is one of ``choices``."""
    if value not in choices:
        options = (
            ", ".join(repr(c) for c in choices)
            if isinstance(choices, (list, tuple, set, frozenset))
            else str(choices)
        )
        raise ValueError(f"Invalid {name}: {_fmt(value)} (must be one of {options})")
    return value
