"""Adapters for training frameworks: :mod:`sdopt.integrations.lightning` (a Lightning
``Callback``) and :mod:`sdopt.integrations.huggingface` (a ``transformers.TrainerCallback``).

Each submodule imports its framework when imported itself and raises an ``ImportError`` naming
the package to install when it is missing; ``import sdopt.integrations`` needs neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["find_sd_optimizers"]


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
