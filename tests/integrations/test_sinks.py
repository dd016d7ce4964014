"""One writer per sink: which loggers write to the same place (sdopt.integrations)."""

from __future__ import annotations

import warnings

import pytest

from sdopt.integrations import logger_sink, without_duplicate_sinks
from sdopt.loggers import CSVLogger, JSONLLogger


class _Collect:
    def log(self, record):
        pass


def test_file_loggers_on_one_path_share_a_sink(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert logger_sink(CSVLogger("sd.csv")) == logger_sink(CSVLogger(tmp_path / "sd.csv"))
    assert logger_sink(CSVLogger("sd.csv")) == logger_sink(JSONLLogger("./sd.csv"))
    assert logger_sink(CSVLogger("a.csv")) != logger_sink(CSVLogger("b.csv"))


def test_wandb_loggers_share_the_run() -> None:
    pytest.importorskip("wandb")
    from sdopt.loggers import WandbLogger

    assert logger_sink(WandbLogger()) == logger_sink(WandbLogger(prefix="x/")) == "wandb"
    L = pytest.importorskip("lightning.pytorch")
    assert logger_sink(L.loggers.WandbLogger(mode="disabled")) == "wandb"


def test_other_loggers_are_their_own_sink() -> None:
    a, b = _Collect(), _Collect()
    assert logger_sink(a) == logger_sink(a) != logger_sink(b)


def test_duplicates_are_left_out_with_one_warning(tmp_path) -> None:
    mine, shared = _Collect(), _Collect()
    csv = CSVLogger(tmp_path / "sd.csv")
    with pytest.warns(UserWarning, match="leaves _Collect, CSVLogger out") as caught:
        kept = without_duplicate_sinks(
            [mine, shared, CSVLogger(tmp_path / "sd.csv")],
            [shared, csv],
            what="the callback's",
            owner="SDOptimizer(loggers=...)",
        )
    assert kept == [mine] and len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert without_duplicate_sinks([mine], [shared], what="w", owner="o") == [mine]
