"""Lightning adapter: a real Trainer with an SDOptimizer; records reach the trainer's logger."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

L = pytest.importorskip("lightning.pytorch")

from sdopt.integrations.lightning import SharpnessDimensionCallback  # noqa: E402
from sdopt.optim import SDOptimizer  # noqa: E402


class _Module(L.LightningModule):
    def __init__(self, batch):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.batch = batch

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=0.1)
        return SDOptimizer(base, model=self, loss_fn=F.cross_entropy, data=self.batch, every=2, k=2)


class _Recorder(L.loggers.Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_lightning_trainer_logs_records(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = _Module((x, y))
    recorder = _Recorder()
    trainer = L.Trainer(
        max_steps=6,
        logger=recorder,
        callbacks=[SharpnessDimensionCallback()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, SDOptimizer) and opt.step_count == 6
    rows = [m for _, m in recorder.rows if "sdopt/step" in m]
    assert [m["sdopt/step"] for m in rows] == [0, 2, 4]
    assert rows[-1]["sdopt/lambda_max"] == opt.last_estimate.lambda_max
