"""Adapters for training frameworks: :mod:`sdopt.integrations.lightning` (a Lightning
``Callback``) and :mod:`sdopt.integrations.huggingface` (a ``transformers.TrainerCallback``).

Each submodule imports its framework when imported itself and raises an ``ImportError`` naming
the package to install when it is missing; ``import sdopt.integrations`` needs neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["check_loggers", "find_sd_optimizers"]


def find_sd_optimizers(optimizers: Iterable[Any]) -> list[Any]:
    """The :class:`sdopt.SDOptimizer` instances among ``optimizers``, unwrapping wrappers that
    keep the real optimizer in ``.optimizer`` (Lightning's ``LightningOptimizer``, accelerate's
    ``AcceleratedOptimizer``)."""
    from sdopt.optim import SDOptimizer

    found = []
    for opt in optimizers:
        seen = 0
        while opt is not None and not isinstance(opt, SDOptimizer) and seen < 4:
            opt = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
            seen += 1
        if isinstance(opt, SDOptimizer):
            found.append(opt)
    return found


def check_loggers(loggers: Any, method: str = "log") -> list[Any]:
    """``loggers`` as a list, each with a callable ``method``; ``ValueError`` naming the bad one."""
    if isinstance(loggers, (str, bytes)) or not isinstance(loggers, Iterable):
        raise ValueError(
            f"Invalid loggers: {loggers!r} (must be a list of loggers, objects with .{method}())"
        )
    out = list(loggers)
    for i, logger in enumerate(out):
        if not callable(getattr(logger, method, None)):
            raise ValueError(
                f"Invalid loggers[{i}]: {type(logger).__name__} (has no callable .{method}())"
            )
    return out
