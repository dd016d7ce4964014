"""Package-level contract: the public API resolves and README, CI and packaging agree."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import sdopt

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(sdopt._EXPORTS))
def test_public_name_resolves(name: str) -> None:
    assert getattr(sdopt, name) is getattr(
        importlib.import_module(f"sdopt.{sdopt._EXPORTS[name]}"), name
    )


def test_unknown_attribute_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sdopt.nope


def test_readme_commands_are_the_ci_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block is not None, "README must open with a bash block of two commands"
    install_and_run, test = block.group(1).strip().splitlines()[:2]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    install_steps = [step.strip() for step in install_and_run.split("&&")]
    assert install_steps[-1] == "sdopt grok"
    for step in install_steps[:-1]:
        assert step in ci, f"README install step {step!r} missing from .ci/run"
    assert test.strip() in ci


def test_py_typed_marker_ships() -> None:
    assert (ROOT / "sdopt" / "py.typed").exists()
