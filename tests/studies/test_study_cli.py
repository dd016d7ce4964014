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


def test_study_datasets_and_seeds_flags_parse():
    args = build_parser().parse_args(
        ["study", "correlation", "--datasets", "mnist1d", "--seeds", "1", "2"]
    )
    assert (args.datasets, args.seeds) == (["mnist1d"], [1, 2])
    args = build_parser().parse_args(["study", "grokking"])
    assert (args.datasets, args.seeds) == (None, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["study", "correlation", "--datasets", "cifar"], "invalid choice: 'cifar'"),
        (["study", "correlation", "--seeds", "x"], "invalid int value: 'x'"),
        (["study", "grokking", "--datasets", "digits"], "--datasets applies to the correlation"),
        (["study", "correlation", "--seeds", "0", "0"], "Invalid seeds: (0, 0)"),
    ],
)
def test_study_misuse_exits_2_with_a_message(argv, message, capsys, tmp_path):
    from sdopt.cli import main

    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main([*argv, "--out", str(tmp_path / "o")]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
