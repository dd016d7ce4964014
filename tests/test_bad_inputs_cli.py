"""The CLI rows of the bad-input table: every misuse exits 2 with one line naming the flag.

Each case runs ``sdopt.cli.main`` in-process: an uncaught exception (a traceback) fails the
test; ``argparse`` errors (``SystemExit(2)``) print the usage and then one error line. The
others print exactly one line, ``sdopt <command>: error: Invalid <flag>: ...``.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sdopt.cli import main

TINY = [
    "--p",
    "7",
    "--width",
    "8",
    "--steps",
    "4",
    "--eval-every",
    "2",
    "--every",
    "2",
    "--k",
    "2",
    "--no-progress",
    "--no-plot",
]
MARKER = "unpickled-code-ran"


class _Planted:
    """Unpickling this creates a marker file: a checkpoint that would run code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad_inputs") / "run"
    assert main(["grok", *TINY, "--out", str(out)]) == 0
    return out


def _copy_run(out: Path, finished: Path) -> None:
    shutil.copytree(finished, out)


def _plant(content: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    """A setup that writes ``OUT/checkpoint.pt`` with ``content(path, finished_run)``."""

    def setup(out: Path, finished: Path) -> None:
        out.mkdir(parents=True)
        content(out / "checkpoint.pt", finished)

    return setup


def _empty(path: Path, finished: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path, finished: Path) -> None:
    data = (finished / "checkpoint.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path, finished: Path) -> None:
    path.write_bytes(b"not a checkpoint at all\n" * 20)


def _tensor(path: Path, finished: Path) -> None:
    torch.save(torch.ones(3), path)


def _foreign_dict(path: Path, finished: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)


def _future_version(path: Path, finished: Path) -> None:
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)
    ckpt["version"] = 99
    torch.save(ckpt, path)


def _bad_model(path: Path, finished: Path) -> None:
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)
    ckpt["model"] = {"nonsense.weight": torch.ones(2)}
    torch.save(ckpt, path)


def _bad_config(path: Path, finished: Path) -> None:
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)
    ckpt["config"] = {"no_such_field": 1}
    torch.save(ckpt, path)


def _pickle_payload(path: Path, finished: Path) -> None:
    with path.open("wb") as f:
        pickle.dump(_Planted(path.parent / MARKER), f)


def _torch_payload(path: Path, finished: Path) -> None:
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)
    ckpt["metrics"] = [_Planted(path.parent / MARKER)]
    torch.save(ckpt, path)


def _file(out: Path, finished: Path) -> None:
    out.write_text("a file\n")


def _under_file(out: Path, finished: Path) -> None:
    out.parent.write_text("a file\n")


def _read_only(out: Path, finished: Path) -> None:
    out.mkdir()
    out.chmod(0o555)


def _sweep_run(out: Path, finished: Path) -> None:
    _copy_run(out / "sgd_none_seed0", finished)


def _sweep_table(out: Path, finished: Path) -> None:
    out.mkdir()
    (out / "sweep.csv").write_text("optimizer,mode\n")


# (id, argv after the command, setup of OUT or None, command, what the message must contain)
GROK = "grok"
SWEEP = "sweep"
CASES: list[tuple[str, list[str], Callable[[Path, Path], None] | None, str, list[str]]] = [
    # values of the task, model, optimizer and run flags (argparse or TrainConfig)
    ("steps-zero", ["--steps", "0"], None, GROK, ["Invalid --steps: 0"]),
    ("steps-text", ["--steps", "ten"], None, GROK, ["--steps", "'ten'"]),
    ("lr-negative", ["--lr", "-1"], None, GROK, ["Invalid --lr: -1.0"]),
    ("lr-nan", ["--lr", "nan"], None, GROK, ["Invalid --lr: nan"]),
    ("p-not-prime", ["--p", "12"], None, GROK, ["Invalid --p: 12"]),
    ("p-one", ["--p", "1"], None, GROK, ["Invalid --p: 1"]),
    ("train-fraction", ["--train-fraction", "1.5"], None, GROK, ["Invalid --train-fraction: 1.5"]),
    ("train-fraction-zero", ["--train-fraction", "0"], None, GROK, ["--train-fraction: 0"]),
    ("every-zero", ["--every", "0"], None, GROK, ["Invalid --every: 0"]),
    ("k-zero", ["--k", "0"], None, GROK, ["Invalid --k: 0"]),
    ("eval-every-zero", ["--eval-every", "0"], None, GROK, ["Invalid --eval-every: 0"]),
    ("batch-size-zero", ["--batch-size", "0"], None, GROK, ["Invalid --batch-size: 0"]),
    ("weight-decay", ["--weight-decay", "-1"], None, GROK, ["Invalid --weight-decay: -1.0"]),
    ("momentum-one", ["--momentum", "1"], None, GROK, ["Invalid --momentum: 1.0"]),
    ("grokfast-alpha", ["--grokfast-alpha", "1"], None, GROK, ["Invalid --grokfast-alpha: 1.0"]),
    ("grokfast-lamb", ["--grokfast-lamb", "-1"], None, GROK, ["Invalid --grokfast-lamb: -1.0"]),
    ("checkpoint-every", ["--checkpoint-every", "-1"], None, GROK, ["--checkpoint-every: -1"]),
    ("stop-at-zero", ["--stop-at", "0"], None, GROK, ["Invalid --stop-at: 0.0"]),
    ("stop-at-above-one", ["--stop-at", "1.5"], None, GROK, ["Invalid --stop-at: 1.5"]),
    ("threads-zero", ["--threads", "0"], None, GROK, ["Invalid --threads: 0"]),
    ("width-zero", ["--width", "0"], None, GROK, ["Invalid --width: 0"]),
    ("mode-choice", ["--mode", "sam"], None, GROK, ["--mode", "'sam'"]),
    ("optimizer-choice", ["--optimizer", "lion"], None, GROK, ["--optimizer", "'lion'"]),
    ("wandb-choice", ["--wandb", "on"], None, GROK, ["--wandb", "'on'"]),
    ("format-choice", ["--format", "xml"], None, GROK, ["--format", "'xml'"]),
    ("dtype-choice", ["--dtype", "float16"], None, GROK, ["--dtype", "'float16'"]),
    ("unknown-flag", ["--bogus"], None, GROK, ["unrecognized arguments: --bogus"]),
    # --sd-option, --target-sd, --penalty-strength
    ("sd-option-syntax", ["--sd-option", "nonsense"], None, GROK, ["--sd-option", "'nonsense'"]),
    ("sd-option-unknown", ["--sd-option", "bogus=1"], None, GROK, ["--sd-option", "'bogus'"]),
    (
        "sd-option-duplicate",
        ["--sd-option", "penalty_every=2", "--sd-option", "penalty_every=3"],
        None,
        GROK,
        ["--sd-option", "penalty_every", "already given"],
    ),
    (
        "sd-option-duplicates-flag",
        ["--mode", "lr", "--target-sd", "2", "--sd-option", "target_sd=3"],
        None,
        GROK,
        ["--sd-option", "--target-sd", "already given"],
    ),
    ("sd-option-reserved", ["--sd-option", 'mode="lr"'], None, GROK, ["--sd-option", "--mode"]),
    ("sd-option-reserved-k", ["--sd-option", "k=4"], None, GROK, ["--sd-option", "--k"]),
    (
        "sd-option-value",
        ["--sd-option", "penalty_every=-1"],
        None,
        GROK,
        ["Invalid --sd-option penalty_every: -1"],
    ),
    (
        "sd-option-type",
        ["--sd-option", "controller=5"],
        None,
        GROK,
        ["Invalid --sd-option controller: 5"],
    ),
    (
        "exponent-map-adam-over-sgd",
        ["--optimizer", "sgd", "--exponent-map", "adam"],
        None,
        GROK,
        ["Invalid --exponent-map: 'adam'"],
    ),
    (
        "sd-option-exponent-map-reserved",
        ["--sd-option", 'exponent_map="gd"'],
        None,
        GROK,
        ["Invalid --sd-option", "--exponent-map"],
    ),
    ("exponent-map-choice", ["--exponent-map", "sgd"], None, GROK, ["--exponent-map"]),
    ("layers-one", ["--layers", "1"], None, GROK, ["Invalid --layers: 1"]),
    ("init-scale-zero", ["--init-scale", "0"], None, GROK, ["Invalid --init-scale: 0"]),
    ("target-sd", ["--mode", "lr", "--target-sd", "-2"], None, GROK, ["Invalid --target-sd: -2"]),
    (
        "penalty-strength",
        ["--mode", "penalty", "--penalty-strength", "-1"],
        None,
        GROK,
        ["Invalid --penalty-strength: -1"],
    ),
    # --out
    ("out-is-a-file", [], _file, GROK, ["Invalid --out", "is a file"]),
    ("out-under-a-file", [], _under_file, GROK, ["Invalid --out", "under the file"]),
    ("out-cannot-be-created", ["--out", "/proc/sdopt-no/run"], None, GROK, ["Invalid --out"]),
    ("out-read-only", [], _read_only, GROK, ["Invalid --out", "not writable"]),
    ("out-holds-a-run", [], _copy_run, GROK, ["Invalid --out", "--resume", "--overwrite"]),
    ("resume-and-overwrite", ["--resume", "--overwrite"], None, GROK, ["--overwrite", "--resume"]),
    # --resume with a checkpoint that cannot be used
    ("resume-empty", ["--resume"], _plant(_empty), GROK, ["Invalid --resume", "empty"]),
    ("resume-truncated", ["--resume"], _plant(_truncated), GROK, ["Invalid --resume", "corrupt"]),
    ("resume-garbage", ["--resume"], _plant(_garbage), GROK, ["Invalid --resume", "corrupt"]),
    ("resume-tensor", ["--resume"], _plant(_tensor), GROK, ["Invalid --resume", "Tensor"]),
    ("resume-foreign", ["--resume"], _plant(_foreign_dict), GROK, ["Invalid --resume", "missing"]),
    ("resume-version", ["--resume"], _plant(_future_version), GROK, ["Invalid --resume", "99"]),
    ("resume-model", ["--resume"], _plant(_bad_model), GROK, ["Invalid --resume", "does not fit"]),
    ("resume-config", ["--resume"], _plant(_bad_config), GROK, ["Invalid --resume", "config"]),
    ("resume-pickle", ["--resume"], _plant(_pickle_payload), GROK, ["Invalid --resume", "refused"]),
    ("resume-payload", ["--resume"], _plant(_torch_payload), GROK, ["Invalid --resume", "refused"]),
    ("resume-seed", ["--resume", "--seed", "5"], _copy_run, GROK, ["Invalid --resume: --seed=5"]),
    ("resume-mode", ["--resume", "--mode", "lr"], _copy_run, GROK, ["Invalid --resume: --mode="]),
    ("resume-steps", ["--resume", "--steps", "2"], _copy_run, GROK, ["Invalid --steps: 2"]),
    # sdopt sweep
    ("sweep-seeds", ["--seeds", "x"], None, SWEEP, ["--seeds", "'x'"]),
    ("sweep-modes", ["--modes", "sam"], None, SWEEP, ["--modes", "'sam'"]),
    ("sweep-optimizers", ["--optimizers", "lion"], None, SWEEP, ["--optimizers", "'lion'"]),
    ("sweep-steps", ["--steps", "0"], None, SWEEP, ["Invalid --steps: 0"]),
    ("sweep-out-file", [], _file, SWEEP, ["Invalid --out", "is a file"]),
    ("sweep-out-run", [], _sweep_run, SWEEP, ["Invalid --out", "--overwrite"]),
    ("sweep-out-table", [], _sweep_table, SWEEP, ["Invalid --out", "sweep.csv", "--overwrite"]),
    ("sweep-resume", ["--resume"], None, SWEEP, ["unrecognized arguments: --resume"]),
    ("grid-out-run", ["--grid"], _sweep_run, GROK, ["Invalid --out", "--resume", "--overwrite"]),
]


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("argv", "setup", "command", "fragments"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_cli_misuse_exits_2_with_one_line_naming_the_flag(
    argv, setup, command, fragments, tmp_path: Path, finished_run: Path, capsys
) -> None:
    if setup is _read_only and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories (the /proc case covers root)")
    out = tmp_path / "parent" / "run" if setup is _under_file else tmp_path / "run"
    if setup is not None:
        setup(out, finished_run)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    grid = ["--optimizers", "sgd", "--modes", "none", "--seeds", "0"] if command == SWEEP else []
    full = [command, *TINY, *grid, "--out", str(out), *argv]  # the last of a repeated flag wins
    try:
        code = main(full)
    except SystemExit as exc:  # argparse: usage, then one error line
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    unrecognized = lines[-1].startswith("sdopt: error: unrecognized arguments")  # top parser
    assert unrecognized or lines[-1].startswith(f"sdopt {command}: error: "), lines
    if not (unrecognized or lines[-1].startswith(f"sdopt {command}: error: argument")):
        assert len(lines) == 1, lines  # not an argparse error: exactly one line
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    assert not list(tmp_path.rglob(MARKER)), "loading the checkpoint ran code from it"
    if setup in (_copy_run, _sweep_run, _sweep_table):  # a refused run leaves files as they were
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if setup is _read_only:
        out.chmod(0o755)
