"""The ``sdopt`` command line: files, summary keys, resume, errors, W&B offline, sweeps."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdopt import cli
from sdopt.cli import GROK_DEFAULTS, build_parser, config_from_args, main

TINY = [
    "--p",
    "7",
    "--width",
    "8",
    "--steps",
    "12",
    "--eval-every",
    "4",
    "--every",
    "4",
    "--k",
    "2",
    "--no-progress",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {
    "steps_to_95_val_accuracy",
    "seconds_to_95_val_accuracy",
    "steps_to_99_train_accuracy",
    "final_train_accuracy",
    "final_val_accuracy",
    "wall_time_seconds",
    "steps",
    "config",
}


def test_grok_writes_metrics_plot_and_summary(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["grok", *TINY, "--out", str(out)]) == 0
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 4, 8, 12]
    assert rows[-1]["sharpness_dimension"] != ""  # the default mode is monitor
    png = (out / "grokking.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 12
    assert summary["config"]["sd_mode"] == "monitor"
    assert summary["config"]["model_kwargs"] == {
        "width": 8,
        "num_layers": 3,
        "bias": False,
        "init_scale": 3.0,
    }
    assert (out / "checkpoint.pt").exists()
    printed = capsys.readouterr().out
    assert "grokking (validation ≥ 95 %)" in printed and str(out) in printed


def test_grok_jsonl_and_flags_reach_the_config(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        "grok",
        *TINY,
        "--out",
        str(out),
        "--format",
        "jsonl",
        "--optimizer",
        "grokfast-sgd",
        "--mode",
        "lr",
        "--seed",
        "3",
        "--lr",
        "0.05",
        "--weight-decay",
        "0.5",
        "--operation",
        "div",
        "--train-fraction",
        "0.6",
        "--target-sd",
        "2",
        "--sd-option",
        "penalty_every=8",
        "--no-plot",
    ]
    assert main(argv) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 4, 8, 12]
    config = json.loads((out / "summary.json").read_text())["config"]
    assert (
        config["optimizer"] == "grokfast-sgd" and config["sd_mode"] == "lr" and config["seed"] == 3
    )
    assert config["lr"] == 0.05 and config["weight_decay"] == 0.5 and config["operation"] == "div"
    # the exponent map is the optimizer's own (heavy ball: SGD with the default momentum 0.9)
    assert config["sd_options"] == {
        "target_sd": 2.0,
        "penalty_every": 8,
        "exponent_map": "momentum",
    }
    assert not (out / "grokking.png").exists()


def test_grok_resume_equals_uninterrupted(tmp_path: Path) -> None:
    common = [
        *TINY[:-5],
        "--eval-every",
        "4",
        "--mode",
        "monitor",
        "--dtype",
        "float64",
        "--no-progress",
        "--no-plot",
    ]
    common = [a for a in common if a not in ("--steps", "12")]
    assert main(["grok", *common, "--steps", "12", "--out", str(tmp_path / "full")]) == 0
    assert main(["grok", *common, "--steps", "8", "--out", str(tmp_path / "cut")]) == 0
    assert main(["grok", *common, "--steps", "12", "--out", str(tmp_path / "cut"), "--resume"]) == 0

    def rows(name):
        with (tmp_path / name / "metrics.csv").open() as f:
            return [
                {k: v for k, v in r.items() if k != "elapsed_seconds"} for r in csv.DictReader(f)
            ]

    assert rows("full") == rows("cut")
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "cut" / "summary.json").read_text())
    for key in ("final_train_accuracy", "final_val_accuracy", "final_sharpness_dimension", "steps"):
        assert a[key] == b[key]


def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["grok", *TINY, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for argv in (TINY, [*TINY, "--mode", "lr"]):  # the same run again; a second mode
        assert main(["grok", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert err.startswith(f"sdopt grok: error: Invalid --out: '{out}' already holds a run")
        assert "--resume" in err and "--overwrite" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost


def test_overwrite_replaces_the_run_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["grok", *TINY, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    argv = ["grok", *TINY, "--out", str(out), "--mode", "none", "--no-plot", "--overwrite"]
    assert main(argv) == 0
    assert "--overwrite: replaced the run files in" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["sd_mode"] == "none"
    assert not (out / "grokking.png").exists()  # --no-plot: the old plot is gone, not stale
    assert (out / "notes.txt").read_text() == "mine\n"  # only sdopt's own files are replaced


def test_sweep_refuses_existing_runs_and_overwrites_on_request(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", *TINY, "--out", str(out), "--modes", "none", "--optimizers", "adamw"]
    argv += ["--seeds", "0"]
    assert main(argv) == 0
    table = (out / "sweep.csv").read_text()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Invalid --out" in err and "--overwrite" in err and "--resume" not in err
    assert (out / "sweep.csv").read_text() == table
    assert main([*argv, "--overwrite"]) == 0
    assert "--overwrite: replaced" in capsys.readouterr().err


def test_resume_prints_the_step_it_resumed_from(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["grok", *TINY, "--steps", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["grok", *TINY, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from step 8 of {out / 'checkpoint.pt'} (to step 12)" in err


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.returncode} {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run to start")
        time.sleep(0.1)


LONG = ["--p", "7", "--width", "8", "--mode", "none", "--eval-every", "50", "--no-progress"]
LONG += ["--no-plot", "--checkpoint-every", "0", "--threads", "1"]


def _start(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sdopt", "grok", *LONG, "--steps", "10000000", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.csv"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, proc)
    return proc


def test_sigterm_saves_a_checkpoint_and_resume_continues_from_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    proc = _start(out)  # --checkpoint-every 0: only the end (or a signal) writes a checkpoint
    assert not (out / "checkpoint.pt").exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    step = ckpt["step"]
    assert step >= 100  # metrics.csv had the rows of steps 0, 50 and 100
    argv = ["grok", *LONG, "--steps", str(step + 7), "--out", str(out), "--resume"]
    assert main(argv) == 0
    assert f"resumed from step {step} of" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == step + 7
    with (out / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == sorted(set(steps)) and steps[-1] == step + 7


def test_a_second_signal_exits_at_once_without_a_traceback(tmp_path: Path) -> None:
    # the first signal raises KeyboardInterrupt (train saves a checkpoint); a second one,
    # during that save or during shutdown, exits at once: status 128 + signal, one line
    code = "\n".join(
        [
            "import os, signal, time",
            "from sdopt.cli import _Interrupts",
            "with _Interrupts('grok', keep=True):",
            "    try:",
            "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)",
            "    except KeyboardInterrupt:",
            "        print('first', flush=True)",
            "        os.kill(os.getpid(), signal.SIGINT); time.sleep(30)",
            "        print('not reached', flush=True)",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, proc
    assert proc.stdout.split() == ["first"]
    assert "interrupted again: exiting now" in proc.stderr and "Traceback" not in proc.stderr
    # in-process (keep=False, as main(argv) runs): the handlers are restored afterwards
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with cli._Interrupts("grok"):
        assert signal.getsignal(signal.SIGINT) != before[0]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_ctrl_c_twice_on_a_real_run_exits_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130: our handler's exit; -SIGINT: the second signal came during interpreter shutdown,
    # after Python restored the default handler (the shell shows both as status 130)
    assert proc.returncode in (128 + signal.SIGINT, -signal.SIGINT), err
    assert "Traceback" not in err and "interrupted" in err
    if (out / "checkpoint.pt").exists():  # saved unless the second signal cut the save short
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["grok", "--steps", "0"], "Invalid --steps: 0"),
        (["grok", "--lr", "-1"], "Invalid --lr: -1.0"),
        (["grok", "--p", "12"], "Invalid --p: 12"),
        (["grok", "--train-fraction", "1.5"], "Invalid --train-fraction: 1.5"),
        (["grok", "--every", "0"], "Invalid --every: 0"),
        (["grok", "--sd-option", "nonsense"], "Invalid --sd-option: 'nonsense'"),
        (["grok", "--mode", "sam"], "invalid choice: 'sam'"),
        (["grok", "--optimizer", "lion"], "invalid choice: 'lion'"),
        (["grok", "--wandb", "on"], "invalid choice: 'on'"),
        (["grok", "--steps", "ten"], "invalid int value: 'ten'"),
        (["grok", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_invalid_flags_exit_nonzero_with_a_clear_message(argv, message, capsys, tmp_path) -> None:
    try:
        code = main([*argv, "--out", str(tmp_path)])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    assert code != 0
    assert message in capsys.readouterr().err


def test_no_command_prints_help(capsys) -> None:
    assert main([]) == 2
    assert "grok" in capsys.readouterr().out


def test_defaults_are_the_documented_ones() -> None:
    args = build_parser().parse_args(["grok"])
    assert args.p == GROK_DEFAULTS["p"] and args.mode == "monitor" and args.optimizer == "sgd"
    assert args.steps == GROK_DEFAULTS["steps"] and args.wandb == "disabled"
    # one thread: measured faster than torch's one-per-core on a shared CPU (docs/cli.md)
    assert args.threads == 1 and build_parser().parse_args(["sweep"]).threads == 1
    assert config_from_args(args).threads == 1


@pytest.mark.parametrize("command", ["grok", "sweep", "study"])
def test_docs_show_the_current_help(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/cli.md pastes `COLUMNS=100 sdopt <command> --help`; defaults must not go stale there
    monkeypatch.setenv("COLUMNS", "100")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices[command].format_help().rstrip("\n")
    page = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    assert "```text\n" + text + "\n```" in page


def test_python_dash_m_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sdopt", "grok", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for flag in (
        "--steps",
        "--optimizer",
        "--mode",
        "--seed",
        "--out",
        "--wandb",
        "--resume",
        "--grid",
    ):
        assert flag in proc.stdout


def test_wandb_offline_creates_an_offline_run(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "run"
    assert main(["grok", *TINY, "--out", str(out), "--wandb", "offline", "--no-plot"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run has no transaction log"


def test_sweep_writes_one_table_and_a_wandb_yaml(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        *TINY,
        "--out",
        str(out),
        "--optimizers",
        "adamw",
        "grokfast-adamw",
        "--modes",
        "none",
        "--seeds",
        "0",
        "1",
        "--no-plot",
    ]
    assert main(argv) == 0
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["optimizer"], r["seed"]) for r in rows] == [
        ("adamw", "0"),
        ("adamw", "1"),
        ("grokfast-adamw", "0"),
        ("grokfast-adamw", "1"),
    ]
    for r in rows:
        assert json.loads((Path(r["out_dir"]) / "summary.json").read_text())[
            "final_val_accuracy"
        ] == float(r["final_val_accuracy"])
    md = (out / "sweep.md").read_text()
    assert "Median over seeds" in md and "| grokfast-adamw | 0.003 | none | " in md
    yaml_text = (out / "wandb_sweep.yaml").read_text()
    import yaml

    assert yaml_text.startswith("# W&B sweep written by `sdopt sweep`")
    spec = yaml.safe_load(yaml_text)
    assert spec["program"] == "sdopt" and spec["command"][-1] == "${args}"
    assert spec["parameters"]["optimizer"] == {"values": ["adamw", "grokfast-adamw"]}
    assert spec["parameters"]["seed"] == {"values": [0, 1]}
    assert spec["method"] == "grid" and spec["parameters"]["p"] == {"value": 7}


def test_sweep_over_learning_rates_compares_fixed_lrs_with_the_controller(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", *TINY, "--out", str(out), "--optimizers", "sgd", "--lrs", "0.5", "2",
            "--modes", "none", "lr", "--seeds", "0", "--every", "2", "--no-plot"]  # fmt: skip
    assert main(argv) == 0
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["lr"], r["mode"]) for r in rows] == [
        ("0.5", "none"), ("0.5", "lr"), ("2.0", "none"), ("2.0", "lr"),
    ]  # fmt: skip
    for r in rows:
        summary = json.loads((Path(r["out_dir"]) / "summary.json").read_text())
        assert (
            summary["config"]["lr"] == float(r["lr"])
            and summary["config"]["sd_mode"] == (r["mode"])
        )
        assert ("_lr0.5_" in r["out_dir"]) == (r["lr"] == "0.5")
    assert float(rows[0]["final_lr_scale"]) == 1.0  # a fixed LR
    md = (out / "sweep.md").read_text()
    assert "| sgd | 0.5 | none | " in md and "| sgd | 2 | lr | " in md
    import yaml

    spec = yaml.safe_load((out / "wandb_sweep.yaml").read_text())
    assert spec["parameters"]["lr"] == {"values": [0.5, 2.0]}
    assert spec["parameters"]["mode"] == {"values": ["none", "lr"]}


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_sweep_refuses_a_nonpositive_learning_rate(tmp_path: Path, capsys, value: str) -> None:
    argv = ["sweep", *TINY, "--out", str(tmp_path / "s"), "--lrs", "1", value, "--no-plot"]
    assert main(argv) == 2
    assert "--lrs" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    scripts = Path(sys.executable).parent
    exe = scripts / ("sdopt.exe" if os.name == "nt" else "sdopt")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "sdopt" in proc.stdout


@pytest.mark.parametrize(
    "argv, optimizer, lr, wd, exponent_map",
    [
        ([], "sgd", 2.0, 5e-4, "momentum"),
        (["--momentum", "0"], "sgd", 2.0, 5e-4, "gd"),
        (["--optimizer", "adamw"], "adamw", 3e-3, 1.0, "adam"),
        (["--optimizer", "grokfast-adam", "--lr", "1e-3"], "grokfast-adam", 1e-3, 1.0, "adam"),
        (["--exponent-map", "gd", "--weight-decay", "0"], "sgd", 2.0, 0.0, "gd"),
    ],
)
def test_optimizer_defaults_and_the_own_exponent_map(argv, optimizer, lr, wd, exponent_map) -> None:
    config = config_from_args(build_parser().parse_args(["grok", *argv]))
    assert (config.optimizer, config.lr, config.weight_decay) == (optimizer, lr, wd)
    assert config.sd_options["exponent_map"] == exponent_map
    assert config.model_kwargs == {"width": 32, "num_layers": 3, "bias": False, "init_scale": 3.0}


@pytest.mark.slow
def test_the_default_job_sits_at_the_edge_and_groks(tmp_path: Path) -> None:
    """Issue 13's main job: `sdopt grok` at its defaults is at the edge of stability of its own
    (heavy-ball) map in at least a quarter of the estimates, and groks within its 1,200 steps."""
    args = build_parser().parse_args(["grok", "--out", str(tmp_path / "run"), "--no-plot"])
    config = config_from_args(args)
    from sdopt.train import train

    result = train(dataclasses.replace(config, progress=False))
    ratios = [r["edge_ratio"] for r in result.records if r["status"] == "ok"]
    assert len(ratios) == 12
    assert sum(r >= 0.8 for r in ratios) >= len(ratios) / 4, ratios
    assert max(ratios) < 1.5 and not result.summary["diverged"]
    assert result.summary["steps_to_95_val_accuracy"] is not None
    assert result.summary["steps_to_95_val_accuracy"] <= 1000
