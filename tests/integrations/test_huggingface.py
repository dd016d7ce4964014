"""Hugging Face adapter: real Trainers with an SDOptimizer wrapped around the Trainer's own
optimizer; records land in state.log_history at the step of the parameters they measured, are
not sent again after a resume, and reach each sink once."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments

from sdopt.integrations.huggingface import SharpnessDimensionTrainerCallback
from sdopt.optim import SDOptimizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


class _Collect:
    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)


class _Classifier(nn.Module):
    """Biases and a LayerNorm: the Trainer's weight decay skips them."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _loss(outputs, targets):
    return F.cross_entropy(outputs["logits"], targets)


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    return (x[:16], y[:16]), [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]


def _model():
    torch.manual_seed(0)
    return _Classifier()


class _SDTrainer(Trainer):
    """The documented pattern: wrap the optimizer the Trainer builds itself."""

    sd_options: ClassVar[dict] = {}

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if not isinstance(optimizer, SDOptimizer):
            self.optimizer = SDOptimizer(optimizer, model=self.model, **self.sd_options)
        return self.optimizer


def _args(out, **kwargs):
    defaults = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def _sd_trainer(
    model, out, batch, dataset, callbacks, *, every=2, sd_loggers=(), eval_dataset=None, **kwargs
):
    trainer = _SDTrainer(
        model=model,
        args=_args(out, **kwargs),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )
    trainer.sd_options = dict(
        loss_fn=_loss, data=batch, every=every, k=2, tol=1e-8, loggers=list(sd_loggers)
    )
    return trainer


def _sd_entries(trainer):
    return [e for e in trainer.state.log_history if "sdopt/step" in e]


def test_hand_driven_callback_forwards_new_records_once() -> None:
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
    assert [e["step"] for e in state.log_history] == [0, 2, 4]


class _Snapshots(TrainerCallback):
    """The model's parameters at every global_step."""

    def __init__(self):
        self.params = {}

    def _take(self, state, model):
        self.params[state.global_step] = torch.nn.utils.parameters_to_vector(
            model.parameters()
        ).detach()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._take(state, model)


def _dense_lambda_max(model, flat, batch):
    """λ_max of the loss Hessian at parameters ``flat``: dense, float64, by double backward
    (``torch.autograd.functional.hessian``; torch 2.13's ``torch.func.hessian`` is wrong in the
    LayerNorm weight's rows: vmap over the reverse pass of ``layer_norm``)."""
    model = copy.deepcopy(model).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    x, y = batch[0].double(), batch[1]

    def loss(v):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = v[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return _loss(torch.func.functional_call(model, params, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss, flat.double())
    return torch.linalg.eigvalsh(hessian)[-1].item()


def test_records_land_in_log_history_at_the_step_of_their_parameters(tmp_path) -> None:
    batch, dataset = _data()
    model = _model()
    snaps = _Snapshots()
    sink = _Collect()
    trainer = _sd_trainer(
        model,
        tmp_path,
        batch,
        dataset,
        [snaps, SharpnessDimensionTrainerCallback(loggers=[sink])],
        eval_strategy="steps",
        eval_steps=2,
        eval_dataset=dataset[:16],
    )
    trainer.train()
    entries = _sd_entries(trainer)
    assert [e["sdopt/step"] for e in entries] == [0, 2, 4] == [r.step for r in sink.records]
    # the record of the parameters after s steps goes with step s: the step whose evaluation
    # and checkpoint see those parameters
    assert [e["step"] for e in entries] == [0, 2, 4]
    for e in entries:
        s = e["step"]
        assert e["sdopt/lambda_max"] == pytest.approx(
            _dense_lambda_max(model, snaps.params[s], batch), rel=1e-5
        )
        assert e["sdopt/lambda_max"] != pytest.approx(
            _dense_lambda_max(model, snaps.params[s + 1], batch), rel=1e-3
        )
    evals = {e["step"] for e in trainer.state.log_history if "eval_loss" in e}
    assert {2, 4} <= evals  # HF's metrics of the same steps
    steps = [e["step"] for e in trainer.state.log_history]
    assert steps == sorted(steps)  # the history stays in step order


def test_create_optimizer_override_is_bit_identical_to_a_plain_trainer(tmp_path) -> None:
    batch, dataset = _data()
    args = dict(weight_decay=0.1, learning_rate=0.01)

    plain = Trainer(model=_model(), args=_args(tmp_path / "plain", **args), train_dataset=dataset)
    plain.train()

    wrapped = _sd_trainer(
        _model(),
        tmp_path / "sd",
        batch,
        dataset,
        [SharpnessDimensionTrainerCallback()],
        **args,
    )
    wrapped.train()
    sd = wrapped.optimizer.optimizer  # accelerate's wrapper around the SDOptimizer
    assert isinstance(sd, SDOptimizer) and [r.step for r in sd.history] == [0, 2, 4]
    decay = [g["weight_decay"] for g in sd.base_optimizer.param_groups]
    assert decay == [0.1, 0.0]  # the Trainer's grouping: no decay on biases and the LayerNorm
    for a, b in zip(plain.model.parameters(), wrapped.model.parameters(), strict=True):
        assert torch.equal(a, b)

    # the route the docs showed before, optimizers=(SDOptimizer(AdamW(all parameters)), None),
    # decays every parameter alike: a different run
    model = _model()
    base = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    opt = SDOptimizer(base, model=model, loss_fn=_loss, data=batch, every=2, k=2)
    old = Trainer(
        model=model,
        args=_args(tmp_path / "old", **args),
        train_dataset=dataset,
        optimizers=(opt, None),
    )
    old.train()
    assert not all(
        torch.equal(a, b) for a, b in zip(plain.model.parameters(), old.model.parameters())
    )


def test_resume_from_checkpoint_sends_no_restored_record_again(tmp_path) -> None:
    batch, dataset = _data()
    first_sink = _Collect()
    first = _sd_trainer(
        _model(),
        tmp_path / "a",
        batch,
        dataset,
        [SharpnessDimensionTrainerCallback(loggers=[first_sink])],
        save_strategy="steps",
        save_steps=3,
    )
    first.train()
    assert [r.step for r in first_sink.records] == [0, 2, 4]

    sink = _Collect()
    resumed = _sd_trainer(
        _model(),
        tmp_path / "b",
        batch,
        dataset,
        [SharpnessDimensionTrainerCallback(loggers=[sink])],
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert [r.step for r in resumed.optimizer.optimizer.history] == [0, 2, 4]
    assert [r.step for r in sink.records] == [4]  # 0 and 2 were restored, not made
    entries = _sd_entries(resumed)
    assert [(e["step"], e["sdopt/step"]) for e in entries] == [(0, 0), (2, 2), (4, 4)]
    keys = ("step", "sdopt/lambda_max", "sdopt/sharpness_dimension", "sdopt/eigenvalue_2")
    assert [[e[k] for k in keys] for e in entries] == [
        [e[k] for k in keys] for e in _sd_entries(first)
    ]  # as the uninterrupted run


def test_a_logger_the_optimizer_already_has_gets_each_record_once(tmp_path) -> None:
    batch, dataset = _data()
    sink = _Collect()
    trainer = _sd_trainer(
        _model(),
        tmp_path,
        batch,
        dataset,
        [SharpnessDimensionTrainerCallback(loggers=[sink])],
        sd_loggers=[sink],
        max_steps=4,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert [r.step for r in sink.records] == [0, 2]
    said = [str(w.message) for w in caught if "each record is logged once" in str(w.message)]
    assert len(said) == 1 and "_Collect" in said[0]
    assert [e["sdopt/step"] for e in _sd_entries(trainer)] == [0, 2]  # log_history still has them
