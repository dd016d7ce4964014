"""Argument validation: every check raises ``ValueError`` naming the argument and its value."""

from __future__ import annotations

import math
import os
from collections.abc import Container
from pathlib import Path
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


def check_finite(name: str, value: Any) -> float:
    """A finite real number (any sign)."""
    try:
        ok = not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"Invalid {name}: {_fmt(value)} (must be a finite number)")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not a truthy string or number)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {_fmt(value)} (must be True or False)")
    return value


def check_str(name: str, value: Any) -> str:
    """A string (e.g. a key prefix; ``""`` allowed)."""
    if not isinstance(value, str):
        raise ValueError(f"Invalid {name}: {_fmt(value)} (must be a string)")
    return value


def check_output_path(name: str, value: Any) -> Path:
    """A path a file can be created at: not a directory, and not under a file.

    Missing parent directories are fine (writers create them); the nearest existing ancestor
    must be a writable directory.
    """
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise ValueError(f"Invalid {name}: {_fmt(value)} (must be a file path, str or Path)")
    path = Path(value)
    if path.is_dir():
        raise ValueError(f"Invalid {name}: {str(path)!r} (is a directory; must be a file path)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"Invalid {name}: {str(path)!r} (its ancestor {str(parent)!r} is a file, not a "
            "directory)"
        )
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"Invalid {name}: {str(path)!r} (the file is not writable)")
    elif not os.access(parent, os.W_OK):
        raise ValueError(
            f"Invalid {name}: {str(path)!r} (directory {str(parent)!r} is not writable)"
        )
    return path
