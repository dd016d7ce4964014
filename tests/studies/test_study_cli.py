"""`sdopt study ...` is registered on the main parser and parses its flags."""

from __future__ import annotations

import pytest

from sdopt.cli import build_parser


def test_study_subcommand_parses_flags():
    args = build_parser().parse_args(["study", "grokking", "--quick", "--out", "o", "--cache", "c"])
    assert (args.command, args.name, args.quick, args.out, args.cache, args.threads) == (
        "study", "grokking", True, "o", "c", 1,
    )  # fmt: skip
    args = build_parser().parse_args(["study", "correlation"])
    assert (args.name, args.quick, args.out, args.cache) == ("correlation", False, None, None)


def test_study_rejects_unknown_name(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "mnist"])
    assert "invalid choice: 'mnist'" in capsys.readouterr().err
