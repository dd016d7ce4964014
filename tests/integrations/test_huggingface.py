"""Hugging Face adapter: the TrainerCallback forwards records (skipped without transformers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("transformers")

from sdopt.integrations.huggingface import SharpnessDimensionTrainerCallback
from sdopt.optim import SDOptimizer


class _Collect:
    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)


def test_callback_forwards_new_records_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = SDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=F.cross_entropy,
        data=(x, y),
        every=2,
        k=2,
    )
    sink = _Collect()
    callback = SharpnessDimensionTrainerCallback(loggers=[sink])
    state = SimpleNamespace(global_step=0, log_history=[], is_world_process_zero=True)
    wrapped = SimpleNamespace(optimizer=opt)  # like accelerate's AcceleratedOptimizer
    for step in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        state.global_step = step + 1
        callback.on_step_end(None, state, None, optimizer=wrapped)
    assert [r.step for r in sink.records] == [0, 2, 4]
    assert [e["sdopt/step"] for e in state.log_history] == [0, 2, 4]
    assert state.log_history[0]["step"] == 1
