"""Averaging curvature across ``torch.distributed`` ranks.

When every rank holds an equal-sized shard of the global batch and the loss is a mean, the
Hessian of the global mean loss is the average of the per-rank Hessians, so
``H v = (1/R) Σ_r H_r v``: one ``all_reduce`` (sum) of the product, divided by the world size.
The same holds for the loss and the gradient. Every rank then sees the same operator, so a
deterministic eigensolver with the same generator seed returns the same eigenvectors on all
ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["average_across_ranks", "resolve_distributed"]


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve_distributed(distributed: Any) -> bool:
    """``None``: average when ``torch.distributed`` is initialised; ``True``: require it;
    ``False``: never average."""
    if distributed is None:
        return _initialised()
    if not isinstance(distributed, bool):
        raise ValueError(f"Invalid distributed: {distributed!r} (must be None, True or False)")
    if distributed and not _initialised():
        raise ValueError(
            "Invalid distributed: True (torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first, or pass distributed=None)"
        )
    return distributed


def average_across_ranks(tensor: Tensor) -> Tensor:
    """In-place mean of ``tensor`` over all ranks of the default process group."""
    world = torch.distributed.get_world_size()
    if world > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        tensor.div_(world)
    return tensor
