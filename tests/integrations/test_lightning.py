"""Lightning adapter: real Trainers with an SDOptimizer; records reach callback_metrics (so
ModelCheckpoint, EarlyStopping and the progress bar see them) and each logger once, at the step
of the parameters they measured, also after a resume."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

L = pytest.importorskip("lightning.pytorch")

from sdopt.integrations.lightning import SharpnessDimensionCallback  # noqa: E402
from sdopt.optim import SDOptimizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:lightning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)


class _Module(L.LightningModule):
    def __init__(self, batch, *, every=2, sd_loggers=()):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.batch = batch
        self.every = every
        self.sd_loggers = list(sd_loggers)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=0.5)
        return SDOptimizer(
            base,
            model=self,
            loss_fn=F.cross_entropy,
            data=self.batch,
            every=self.every,
            k=2,
            loggers=self.sd_loggers,
        )


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

    def sd_rows(self):
        return [(step, m) for step, m in self.rows if "sdopt/step" in m]


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    return (x, y), loader  # 4 batches an epoch


def _trainer(tmp_path, callbacks, logger, **kwargs):
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        **kwargs,
    )


def test_records_reach_loggers_once_at_the_step_of_their_parameters(tmp_path) -> None:
    batch, loader = _data()
    recorder = _Recorder()
    trainer = _trainer(tmp_path, [SharpnessDimensionCallback()], recorder, max_steps=6)
    trainer.fit(_Module(batch), loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, SDOptimizer) and opt.step_count == 6
    rows = recorder.sd_rows()
    assert [m["sdopt/step"] for _, m in rows] == [0, 2, 4]
    # the record of the parameters after s steps is logged at step s, where Lightning logs the
    # training loss of the batch trained on those same parameters
    assert [step for step, _ in rows] == [0, 2, 4]
    loss_steps = [step for step, m in recorder.rows if "train_loss" in m]
    assert loss_steps == [0, 1, 2, 3, 4, 5]
    assert rows[-1][1]["sdopt/lambda_max"] == opt.last_estimate.lambda_max


def test_model_checkpoint_selects_by_an_sdopt_metric_and_progress_bar_shows_it(tmp_path) -> None:
    batch, loader = _data()
    best = L.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        monitor="sdopt/lambda_max",
        mode="max",
        save_top_k=1,
        every_n_train_steps=1,
    )
    callback = SharpnessDimensionCallback(prog_bar=("sharpness_dimension",))
    trainer = _trainer(
        tmp_path, [callback, best], _Recorder(), max_steps=8, enable_checkpointing=True
    )
    trainer.fit(_Module(batch, every=1), loader)
    opt = trainer.optimizers[0]
    lams = [r.lambda_max for r in opt.history]
    assert len(lams) == 8 and len(set(lams)) == 8
    top = max(range(8), key=lambda i: lams[i])
    assert best.best_model_score.item() == pytest.approx(lams[top], rel=1e-6)
    saved = torch.load(best.best_model_path, weights_only=False)
    history = saved["optimizer_states"][0]["sdopt"]["history"]
    assert history[-1]["step"] == top  # the checkpoint of the parameters with the largest λ
    assert trainer.callback_metrics["sdopt/lambda_max"].item() == pytest.approx(lams[-1], rel=1e-6)
    shown = trainer.progress_bar_metrics
    assert "sdopt/sharpness_dimension" in shown and "sdopt/lambda_max" not in shown


def test_early_stopping_sees_an_sdopt_metric(tmp_path) -> None:
    batch, loader = _data()
    stop = L.callbacks.EarlyStopping(
        monitor="sdopt/lambda_max", mode="max", stopping_threshold=0.0, patience=10
    )
    trainer = _trainer(tmp_path, [SharpnessDimensionCallback(), stop], _Recorder(), max_epochs=3)
    trainer.fit(_Module(batch), loader)
    assert trainer.global_step == 4  # stopped at the end of the first epoch: λ_max > 0
    assert stop.stopped_epoch == 0


def test_resume_from_checkpoint_logs_no_restored_record_again(tmp_path) -> None:
    batch, loader = _data()
    first = _Recorder()
    save = L.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1
    )
    trainer = _trainer(
        tmp_path,
        [SharpnessDimensionCallback(), save],
        first,
        max_steps=8,
        enable_checkpointing=True,
    )
    trainer.fit(_Module(batch, every=3), loader)
    full = trainer.optimizers[0]
    assert [m["sdopt/step"] for _, m in first.sd_rows()] == [0, 3, 6]

    resumed = _Recorder()
    trainer = _trainer(tmp_path, [SharpnessDimensionCallback()], resumed, max_steps=8)
    trainer.fit(
        _Module(batch, every=3), loader, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    )
    opt = trainer.optimizers[0]
    assert [r.step for r in opt.history] == [0, 3, 6]  # restored 0 and 3, made 6
    rows = resumed.sd_rows()
    assert [(step, m["sdopt/step"]) for step, m in rows] == [(6, 6)]
    assert rows[0][1]["sdopt/lambda_max"] == full.history[-1].lambda_max


def test_a_wandb_run_gets_each_record_once_with_both_wandb_loggers(tmp_path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    from sdopt.loggers import WandbLogger

    batch, loader = _data()
    monkeypatch.setenv("WANDB_SILENT", "true")
    framework = L.loggers.WandbLogger(mode="disabled", save_dir=str(tmp_path))
    run = framework.experiment
    assert wandb.run is run  # the run sdopt's WandbLogger reuses
    rows = []
    monkeypatch.setattr(run, "log", lambda data, *a, **k: rows.append(dict(data)))
    module = _Module(batch, sd_loggers=[WandbLogger()])
    trainer = _trainer(tmp_path, [SharpnessDimensionCallback()], framework, max_steps=6)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, loader)
    finally:
        run.finish()
        wandb.teardown()  # a disabled run's global settings would leak into later wandb tests
    # sdopt's WandbLogger logs each record; the callback leaves Lightning's WandbLogger out
    assert [r["sdopt/step"] for r in rows if "sdopt/lambda_max" in r] == [0, 2, 4]
    assert any("train_loss" in r for r in rows)  # the framework logger still logs the rest
    said = [str(w.message) for w in caught if "each record is logged once" in str(w.message)]
    assert len(said) == 1 and "WandbLogger" in said[0]


def test_prog_bar_must_name_fields() -> None:
    with pytest.raises(ValueError, match="Invalid prog_bar"):
        SharpnessDimensionCallback(prog_bar="lambda_max")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SharpnessDimensionCallback(prog_bar=["lambda_max"])


@pytest.mark.parametrize("log_skipped", [True, False])
def test_a_skipped_estimate_puts_no_nan_into_callback_metrics(tmp_path, log_skipped) -> None:
    batch, loader = _data()
    x, y = batch
    module = _Module((torch.full_like(x, float("nan")), y))  # the curvature loss is NaN
    recorder = _Recorder()
    stop = L.callbacks.EarlyStopping(monitor="sdopt/skipped", mode="max", patience=10)
    callback = SharpnessDimensionCallback(log_skipped=log_skipped)
    trainer = _trainer(tmp_path, [callback] + [stop] * log_skipped, recorder, max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sdopt: estimate ... skipped
        trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert [r.status for r in opt.history] == ["skipped", "skipped"]
    rows = recorder.sd_rows()
    if not log_skipped:
        assert rows == [] and "sdopt/skipped" not in trainer.callback_metrics
        return
    assert [m["sdopt/skipped"] for _, m in rows] == [1, 1]
    assert rows[0][1]["sdopt/lambda_max"] != rows[0][1]["sdopt/lambda_max"]  # NaN in the logs
    metrics = trainer.callback_metrics
    assert metrics["sdopt/skipped"].item() == 1 and "sdopt/lambda_max" not in metrics
    assert trainer.global_step == 4 and not stop.stopped_epoch  # finite: no early stop
