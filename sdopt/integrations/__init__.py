"""Adapters for training frameworks: :mod:`sdopt.integrations.lightning` (a Lightning
``Callback``) and :mod:`sdopt.integrations.huggingface` (a ``transformers.TrainerCallback``).

Each submodule imports its framework when imported itself and raises an ``ImportError`` naming
the package to install when it is missing; ``import sdopt.integrations`` needs neither.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["check_loggers", "find_sd_optimizers", "logger_sink", "without_duplicate_sinks"]


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


def logger_sink(logger: Any) -> Hashable:
    """Where ``logger`` writes, so that two writers into one place can be told apart.

    ``"wandb"`` for sdopt's :class:`~sdopt.loggers.WandbLogger` and Lightning's ``WandbLogger``
    (both write into the process's ``wandb.run``), ``("file", path)`` for loggers with a
    ``path`` (sdopt's CSV and JSONL loggers), and the object itself for anything else.
    """
    cls = type(logger)
    if cls.__name__ == "WandbLogger" and cls.__module__.startswith(
        ("sdopt.", "lightning.", "pytorch_lightning.")
    ):
        return "wandb"
    path = getattr(logger, "path", None)
    if isinstance(path, (str, Path)):
        return ("file", str(Path(path).expanduser().resolve()))
    return ("object", id(logger))


def without_duplicate_sinks(
    loggers: Iterable[Any], taken: Iterable[Any], *, what: str, owner: str
) -> list[Any]:
    """``loggers`` without those that write where a logger in ``taken`` already writes.

    The records of an :class:`~sdopt.SDOptimizer` reach its own ``loggers`` without any
    callback; a callback that sent them to the same place again would log everything twice.
    One ``UserWarning`` names the loggers left out.

    Args:
        loggers: The loggers a callback would write to.
        taken: The SDOptimizer's own loggers (``opt.loggers``).
        what: How the left-out loggers are named in the warning.
        owner: How the SDOptimizer's loggers are named in the warning.
    """
    sinks = {logger_sink(lg) for lg in taken}
    kept, dropped = [], []
    for lg in loggers:
        (dropped if logger_sink(lg) in sinks else kept).append(lg)
    if dropped:
        names = ", ".join(type(lg).__name__ for lg in dropped)
        warnings.warn(
            f"sdopt: {owner} already writes its records where {what} {names} would write "
            f"them; the callback leaves {names} out so that each record is logged once",
            UserWarning,
            stacklevel=3,
        )
    return kept
