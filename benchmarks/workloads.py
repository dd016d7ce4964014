"""The two benchmark workloads of the curvature and top-k benchmarks (float32, CPU).

- ``"mlp"``: MLP 64→256→256→10 (tanh), 85,002 parameters, 1,024 inputs from a 10-component
  Gaussian mixture in 64 dimensions, label = mixture component, cross-entropy, full batch.
- ``"transformer"``: :class:`sdopt.tasks.grokking.GrokkingTransformer` (one layer, d_model 128,
  4 heads, MLP 512, no LayerNorm, 222,592 parameters) on ``modular_arithmetic(97, "add", 0.3)``
  (2,823 training pairs), full batch, after 200 full-batch AdamW steps (lr 1e-3, weight decay 1,
  betas 0.9/0.98) from seed 0. The trained state is cached in ``benchmarks/.cache`` (ignored by
  git) so later runs skip the training.

Usage from another benchmark script in this folder::

    from workloads import WORKLOADS, build_workload
    w = build_workload("transformer")
    op = sdopt.HessianOperator(w.model, w.loss_fn, w.data)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sdopt.tasks.grokking import GrokkingTransformer, modular_arithmetic

WORKLOADS = ("mlp", "transformer")
CACHE = Path(__file__).resolve().parent / ".cache"
TRAIN_STEPS = 200


@dataclass
class Workload:
    """A model, its loss and its full batch, ready for curvature."""

    name: str
    model: nn.Module
    loss_fn: Any
    data: tuple[Tensor, Tensor]
    description: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def gradient(self) -> tuple[Tensor, ...]:
        """One plain eager gradient of the full-batch loss (the unit of every ratio)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss = self.loss_fn(self.model(self.data[0]), self.data[1])
        return torch.autograd.grad(loss, params)


def gaussian_mixture(n: int = 1024, dim: int = 64, classes: int = 10, seed: int = 0):
    """``n`` points of a ``classes``-component Gaussian mixture; label = component."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(classes, dim, generator=g) / dim**0.5
    labels = torch.randint(0, classes, (n,), generator=g)
    x = means[labels] + torch.randn(n, dim, generator=g) / dim**0.5
    return x, labels


def build_mlp(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )
    x, y = gaussian_mixture(seed=seed)
    return Workload(
        "mlp",
        model,
        F.cross_entropy,
        (x, y),
        "MLP 64-256-256-10 tanh, 1,024 Gaussian-mixture inputs, at initialisation",
    )


def _train_transformer(model: nn.Module, data, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    losses = []
    x, y = data
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    return losses


def build_transformer(seed: int = 0, steps: int = TRAIN_STEPS, cache: bool = True) -> Workload:
    task = modular_arithmetic(97, "add", 0.3, seed=seed)
    torch.manual_seed(seed)
    model = GrokkingTransformer(vocab_size=task.vocab_size, num_classes=task.num_classes)
    path = CACHE / f"grokking_transformer_seed{seed}_adamw{steps}.pt"
    info: dict[str, Any] = {}
    if cache and path.exists():
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        info["final_train_loss"] = state["final_train_loss"]
        info["train_seconds"] = 0.0
    else:
        start = time.perf_counter()
        losses = _train_transformer(model, task.train, steps)
        info["train_seconds"] = time.perf_counter() - start
        info["final_train_loss"] = losses[-1]
        if cache:
            CACHE.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "final_train_loss": losses[-1]}, path)
    return Workload(
        "transformer",
        model,
        F.cross_entropy,
        task.train,
        f"grokking transformer, (a+b) mod 97, 30% train ({len(task.train_targets):,} pairs), "
        f"after {steps} full-batch AdamW steps",
        info,
    )


def build_workload(name: str, **kwargs: Any) -> Workload:
    """``"mlp"`` or ``"transformer"``."""
    if name == "mlp":
        return build_mlp(**kwargs)
    if name == "transformer":
        return build_transformer(**kwargs)
    raise ValueError(f"Invalid workload: {name!r} (must be one of {WORKLOADS})")
