"""The examples run end to end (tiny settings) and their own asserts hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_quickstart(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = _run("quickstart.py", "--steps", "40", cwd=tmp_path)
    assert "SD estimates" in out and "step    0" in out


def test_grokking_example(tmp_path: Path) -> None:
    out = _run(
        "grokking.py", "--p", "11", "--steps", "30", "--out", str(tmp_path / "run"), cwd=tmp_path
    )
    assert "grokked (val ≥ 95 %)" in out
    assert (tmp_path / "run" / "grokking.png").read_bytes().startswith(b"\x89PNG")


def test_wandb_example(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    out = _run("wandb_logging.py", "--steps", "20", "--dir", str(tmp_path / "w"), cwd=tmp_path)
    assert "offline run written to" in out
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*"))
