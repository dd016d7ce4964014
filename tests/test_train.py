"""The shared training loop: optimizers, Grokfast, SDOptimizer modes, files, resume, errors."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from sdopt.train import (
    METRIC_FIELDS,
    GrokfastEMA,
    TrainConfig,
    build_optimizer,
    load_checkpoint,
    train,
)

TINY = {
    "p": 7,
    "train_fraction": 0.5,
    "model": "mlp",
    "model_kwargs": {"width": 8},
    "lr": 1e-2,
    "steps": 12,
    "eval_every": 4,
    "progress": False,
    "plot": False,
}


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**(TINY | kw))


def test_grokfast_filter_matches_the_formula() -> None:
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    f = GrokfastEMA([w, frozen], alpha=0.9, lamb=2.0)
    grads = [
        torch.tensor([1.0, -2.0, 0.5]),
        torch.tensor([0.0, 1.0, 1.0]),
        torch.tensor([3.0, 0.0, -1.0]),
    ]
    h = None
    for g in grads:
        w.grad = g.clone().double()
        f.apply()
        h = g.double().clone() if h is None else 0.9 * h + 0.1 * g.double()
        torch.testing.assert_close(w.grad, g.double() + 2.0 * h)
    state = f.state_dict()
    g2 = GrokfastEMA([w], alpha=0.5, lamb=0.0)
    g2.load_state_dict(state)
    assert g2.alpha == 0.9 and g2.lamb == 2.0
    torch.testing.assert_close(g2.ema[0], h)


def test_grokfast_rejects_bad_arguments() -> None:
    w = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match=r"Invalid alpha: 1\.0"):
        GrokfastEMA([w], alpha=1.0)
    with pytest.raises(ValueError, match="Invalid lamb: -1"):
        GrokfastEMA([w], lamb=-1)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("adamw", torch.optim.AdamW),
        ("adam", torch.optim.Adam),
        ("sgd", torch.optim.SGD),
        ("grokfast-sgd", torch.optim.SGD),
    ],
)
def test_build_optimizer(name: str, cls: type) -> None:
    model = torch.nn.Linear(2, 2)
    opt, grokfast = build_optimizer(tiny(optimizer=name, momentum=0.5, weight_decay=0.1), model)
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["weight_decay"] == 0.1
    assert (grokfast is not None) == name.startswith("grokfast-")


def test_plain_run_metrics_and_summary() -> None:
    rows = []
    result = train(tiny(), callback=rows.append)
    assert [r["step"] for r in result.metrics] == [0, 4, 8, 12]
    assert rows == result.metrics
    assert set(result.metrics[0]) == set(METRIC_FIELDS)
    s = result.summary
    assert s["steps"] == 12 and s["diverged"] is False
    assert s["final_val_accuracy"] == result.metrics[-1]["val_accuracy"]
    assert s["num_parameters"] == 15 * 8 + 9 * 7
    assert s["sd_estimates"] == 0 and result.records == []
    # the loop actually trains: full-batch AdamW lowers the training loss
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
    # evaluation matches a direct computation
    x, y = result.dataset.val
    with torch.no_grad():
        acc = (result.model(x).argmax(1) == y).double().mean().item()
    assert math.isclose(result.metrics[-1]["val_accuracy"], acc)


def test_stop_at_val_accuracy_reached_at_the_start_stops_at_once() -> None:
    v0 = train(tiny(steps=1, eval_every=1)).metrics[0]["val_accuracy"]
    assert v0 > 0  # 4 of 25 validation pairs right by chance at initialisation (seed 0)
    stopped = train(tiny(stop_at_val_accuracy=v0, steps=8))
    assert stopped.summary["steps"] == 0 and len(stopped.metrics) == 1
    not_reached = train(tiny(stop_at_val_accuracy=1.0, steps=8))
    assert not_reached.summary["steps"] == 8


@pytest.mark.slow
def test_stop_at_val_accuracy_and_steps_to_threshold() -> None:
    # p=31, 60 % train, width 128: validation accuracy climbs past 10 % within ~350 steps
    kw = {
        "p": 31,
        "train_fraction": 0.6,
        "model_kwargs": {"width": 128},
        "steps": 400,
        "eval_every": 25,
    }
    stopped = train(tiny(**kw, stop_at_val_accuracy=0.1))
    rows = stopped.metrics
    assert rows[-1]["val_accuracy"] >= 0.1 > max(r["val_accuracy"] for r in rows[:-1])
    assert stopped.summary["steps"] == rows[-1]["step"] < 400
    fit = next(r["step"] for r in rows if r["train_accuracy"] >= 0.99)
    assert stopped.summary["steps_to_99_train_accuracy"] == fit
    assert stopped.summary["steps_to_95_val_accuracy"] is None  # stopped before 95 %
    assert stopped.summary["seconds_to_95_val_accuracy"] is None


def test_steps_to_95_is_the_first_evaluation_at_threshold() -> None:
    from sdopt.train import _summary

    rows = [
        {
            "step": s,
            "train_accuracy": t,
            "val_accuracy": v,
            "train_loss": 1.0,
            "val_loss": 1.0,
            "elapsed_seconds": s / 10,
        }
        for s, t, v in [
            (0, 0.1, 0.0),
            (10, 1.0, 0.2),
            (20, 1.0, 0.96),
            (30, 1.0, 0.94),
            (40, 1.0, 0.99),
        ]
    ]
    s = _summary(tiny(), rows, [], 40, 4.0, False, object())
    assert s["steps_to_95_val_accuracy"] == 20
    assert s["seconds_to_95_val_accuracy"] == 2.0
    assert s["steps_to_99_train_accuracy"] == 10
    assert s["grokking_delay_steps"] == 10
    assert s["best_val_accuracy"] == 0.99 and s["final_val_accuracy"] == 0.99


def test_monitor_mode_does_not_change_training() -> None:
    plain = train(tiny(dtype="float64"))
    monitored = train(tiny(dtype="float64", sd_mode="monitor", sd_every=4, sd_k=2))
    for a, b in zip(plain.model.parameters(), monitored.model.parameters()):
        assert torch.equal(a, b)
    assert monitored.summary["sd_estimates"] == 3  # steps 0, 4, 8
    assert monitored.metrics[-1]["sharpness_dimension"] is not None
    rec = monitored.records[-1]
    assert math.isclose(monitored.metrics[-1]["lr_lambda_max"], rec["lr"] * rec["lambda_max"])


@pytest.mark.parametrize("mode", ["lr", "penalty"])
def test_steering_modes_run(mode: str) -> None:
    result = train(tiny(dtype="float64", sd_mode=mode, sd_every=4, sd_k=2))
    assert result.summary["sd_estimates"] >= 1
    assert all(r["mode"] == mode for r in result.records)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_minibatch_training_is_seeded() -> None:
    a = train(tiny(batch_size=5, seed=3))
    b = train(tiny(batch_size=5, seed=3))
    c = train(tiny(batch_size=5, seed=4))
    assert a.metrics[-1]["train_loss"] == b.metrics[-1]["train_loss"]
    assert a.metrics[-1]["train_loss"] != c.metrics[-1]["train_loss"]


def test_files_written(tmp_path) -> None:
    result = train(
        tiny(out_dir=str(tmp_path), metrics_format="jsonl", sd_mode="monitor", sd_every=4, sd_k=2)
    )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 4, 8, 12]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_to_95_val_accuracy"] == result.summary["steps_to_95_val_accuracy"]
    assert summary["config"]["metrics_format"] == "jsonl"
    records = [json.loads(x) for x in (tmp_path / "sdopt_records.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4, 8]
    assert (tmp_path / "checkpoint.pt").exists()


def _strip_time(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_seconds"} for r in rows]


@pytest.mark.parametrize(
    "kw",
    [
        {"optimizer": "grokfast-adamw", "sd_mode": "monitor", "sd_every": 5, "sd_k": 2},
        {"optimizer": "sgd", "batch_size": 6, "sd_mode": "lr", "sd_every": 5, "sd_k": 2},
    ],
)
def test_resume_continues_exactly(tmp_path, kw) -> None:
    kw = kw | {"dtype": "float64"}
    full = train(tiny(out_dir=str(tmp_path / "full"), **kw))
    train(tiny(out_dir=str(tmp_path / "cut"), steps=6, **kw))  # "interrupted" at step 6
    resumed = train(tiny(out_dir=str(tmp_path / "cut"), resume=True, **kw))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert _strip_time(full.metrics) == _strip_time(resumed.metrics)
    timing = {"seconds", "overhead_fraction"}

    def untimed(records):
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        return [{k: clean(v) for k, v in r.items() if k not in timing} for r in records]

    assert len(full.records) == 3  # steps 0, 5, 10 (one before and two after the cut at 6)
    assert untimed(full.records) == untimed(resumed.records)
    lines = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + len(full.metrics)  # header + no duplicated rows


def test_resume_accepts_another_thread_count(tmp_path) -> None:
    # checkpoints of the earlier CLI default (threads=None) resume at the new default of 1
    train(tiny(out_dir=str(tmp_path), steps=4, threads=None))
    resumed = train(tiny(out_dir=str(tmp_path), steps=8, threads=1, resume=True))
    assert resumed.summary["steps"] == 8


def test_resume_rejects_a_different_run(tmp_path) -> None:
    train(tiny(out_dir=str(tmp_path), steps=4))
    with pytest.raises(ValueError, match=r"Invalid resume: lr=0\.5"):
        train(tiny(out_dir=str(tmp_path), lr=0.5, resume=True))
    with pytest.raises(ValueError, match="Invalid steps: 2"):
        train(tiny(out_dir=str(tmp_path), steps=2, resume=True))


class _Planted:
    """Unpickling this creates ``marker``: a checkpoint that would run code when loaded."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_resume_never_runs_code_from_a_planted_checkpoint(tmp_path, how: str) -> None:
    train(tiny(out_dir=str(tmp_path), steps=4))
    path = tmp_path / "checkpoint.pt"
    marker = tmp_path / "code-ran"
    if how == "pickle":
        path.write_bytes(pickle.dumps(_Planted(marker)))
    else:  # a real checkpoint with one planted object inside
        ckpt = torch.load(path, weights_only=True)
        ckpt["metrics"].append(_Planted(marker))
        torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"Invalid resume: .*checkpoint\.pt .*refused"):
        train(tiny(out_dir=str(tmp_path), steps=8, resume=True))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"garbage " * 64, "corrupt or not a PyTorch checkpoint"),
        ("truncated", "truncated, corrupt or not a PyTorch checkpoint"),
        ("tensor", r"not an sdopt grok checkpoint \(holds a Tensor"),
        ("foreign", r"not an sdopt grok checkpoint .missing keys \['version'"),
        ("version", "checkpoint version 7"),
        ("shapes", "does not fit this run"),
    ],
)
def test_unreadable_checkpoints_are_one_line_errors_naming_the_file(
    tmp_path, content, match
) -> None:
    train(tiny(out_dir=str(tmp_path), steps=4))
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif content == "tensor":
        torch.save(torch.zeros(2), path)
    elif content == "foreign":
        torch.save({"model_state": {}, "epoch": 1}, path)
    elif content == "version":
        torch.save(ckpt | {"version": 7}, path)
    else:
        first = next(iter(ckpt["model"]))
        ckpt["model"][first] = torch.zeros(1, 1)
        torch.save(ckpt, path)
    with pytest.raises(ValueError, match=match) as info:
        train(tiny(out_dir=str(tmp_path), steps=8, resume=True))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    if content != "shapes":  # the file itself is unusable: load_checkpoint says the same
        with pytest.raises(ValueError, match=match):
            load_checkpoint(path)


def test_resume_says_where_it_starts(tmp_path, capsys) -> None:
    train(tiny(out_dir=str(tmp_path / "a"), resume=True, steps=4))
    assert "no checkpoint at" in capsys.readouterr().err
    train(tiny(out_dir=str(tmp_path / "a"), resume=True, steps=8))
    assert "resumed from step 4 of" in capsys.readouterr().err


def test_divergence_stops_before_corrupting_parameters() -> None:
    result = train(
        tiny(optimizer="sgd", lr=1e30, momentum=0.0, weight_decay=0.0, steps=20, eval_every=1)
    )
    assert result.summary["diverged"] is True
    assert result.summary["steps"] < 20
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"p": 8}, "Invalid p: 8"),
        ({"operation": "pow"}, "Invalid operation: 'pow'"),
        ({"train_fraction": 1.5}, "Invalid train_fraction: 1.5"),
        ({"model": "rnn"}, "Invalid model: 'rnn'"),
        ({"model_kwargs": [1]}, "Invalid model_kwargs"),
        ({"optimizer": "lion"}, "Invalid optimizer: 'lion'"),
        ({"lr": 0.0}, "Invalid lr: 0.0"),
        ({"weight_decay": -1.0}, "Invalid weight_decay: -1.0"),
        ({"betas": (0.9,)}, "Invalid betas"),
        ({"betas": (0.9, 1.0)}, "Invalid betas: 1.0"),
        ({"momentum": 1.0}, "Invalid momentum: 1.0"),
        ({"grokfast_alpha": -0.1}, "Invalid grokfast_alpha: -0.1"),
        ({"grokfast_lamb": -1.0}, "Invalid grokfast_lamb: -1.0"),
        ({"steps": 0}, "Invalid steps: 0"),
        ({"batch_size": 0}, "Invalid batch_size: 0"),
        ({"eval_every": 0}, "Invalid eval_every: 0"),
        ({"sd_mode": "sam"}, "Invalid sd_mode: 'sam'"),
        ({"sd_every": 0}, "Invalid sd_every: 0"),
        ({"sd_k": 0}, "Invalid sd_k: 0"),
        ({"sd_options": None}, "Invalid sd_options: None"),
        ({"seed": "a"}, "Invalid seed: 'a'"),
        ({"dtype": "float16"}, "Invalid dtype: 'float16'"),
        ({"metrics_format": "xml"}, "Invalid metrics_format: 'xml'"),
        ({"wandb": "on"}, "Invalid wandb: 'on'"),
        ({"checkpoint_every": -1}, "Invalid checkpoint_every: -1"),
        ({"stop_at_val_accuracy": 1.5}, "Invalid stop_at_val_accuracy: 1.5"),
        ({"threads": 0}, "Invalid threads: 0"),
        ({"resume": True}, "Invalid resume: True"),
    ],
)
def test_config_rejects_bad_values(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        train(tiny(**kw))


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    c = tiny(betas=(0.8, 0.9))
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="Invalid config keys: \\['nope'\\]"):
        TrainConfig.from_dict({"nope": 1})


def test_progress_falls_back_to_lines_without_tqdm(monkeypatch, capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # makes `from tqdm.auto import tqdm` fail
    train(tiny(progress=True, steps=20))
    err = capsys.readouterr().err
    assert "tqdm not installed" in err and "sdopt[progress]" in err
    assert "sdopt grok: step 20/20 train=" in err


def test_progress_bar_with_tqdm(capsys) -> None:
    pytest.importorskip("tqdm")
    train(tiny(progress=True))
    assert "sdopt grok" in capsys.readouterr().err
