"""Records and loggers: flattening, CSV/JSONL/console output, and a real offline W&B run read back."""

from __future__ import annotations

import csv
import io
import json
import math
import struct
import threading
import time
from pathlib import Path

import pytest

from sdopt.loggers import ConsoleLogger, CSVLogger, JSONLLogger, WandbLogger
from sdopt.records import EstimateRecord

# the SD range and decomposition every record carries since issue 10
DECOMPOSITION = ("sd_low", "sd_high", "n_edge", "n_neg", "total_exponent", "j_star", "lambda_min")


def _record(step: int = 10, **kw) -> EstimateRecord:
    base = dict(
        step=step,
        mode="lr",
        sharpness_dimension=2.5,
        uncertainty=0.25,
        sd_low=2.0,
        sd_high=3.5,
        n_edge=1.0,
        n_neg=3.0,
        total_exponent=-0.5,
        j_star=2.0,
        lambda_max=40.0,
        lambda_min=-0.01,
        trace=100.0,
        eigenvalues=[40.0, 20.0, 5.0],
        lr=0.05,
        base_lr=0.1,
        lr_scale=0.5,
        predicted_sharpness_dimension=0.0,
        edge_ratio=1.0,
        loss=0.75,
        num_products=12,
        seconds=0.5,
        overhead_fraction=0.04,
        method="topk",
        protocol="full-batch",
    )
    base.update(kw)
    return EstimateRecord(**base)


def test_record_to_dict_flattens_numbers_under_prefix() -> None:
    d = _record().to_dict()
    assert d["sdopt/step"] == 10 and isinstance(d["sdopt/step"], int)
    assert d["sdopt/sharpness_dimension"] == 2.5
    assert [d[f"sdopt/eigenvalue_{i}"] for i in (1, 2, 3)] == [40.0, 20.0, 5.0]
    assert d["sdopt/skipped"] == 0 and d["sdopt/converged"] == 1
    assert math.isnan(d["sdopt/penalty"])
    assert all(isinstance(v, (int, float)) for v in d.values())
    assert "sdopt/mode" not in d and "sdopt/eigenvalues" not in d
    text = _record(status="skipped", reason="non-finite loss").to_dict("", include_text=True)
    assert text["status"] == "skipped" and text["reason"] == "non-finite loss"
    assert text["skipped"] == 1


def test_record_round_trips_through_asdict() -> None:
    from dataclasses import asdict

    rec = _record()
    assert EstimateRecord.from_dict(asdict(rec)) == rec


def test_csv_logger_widens_header_when_eigenvalues_appear(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "sd.csv"
    logger = CSVLogger(path)
    logger.log(EstimateRecord(step=0, status="skipped", reason="non-finite loss"))
    logger.log(_record(step=5))
    logger.close()
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["0", "5"]
    assert rows[0]["reason"] == "non-finite loss" and rows[0]["eigenvalue_1"] == ""
    assert float(rows[1]["eigenvalue_2"]) == 20.0
    assert float(rows[1]["sharpness_dimension"]) == 2.5


def test_csv_logger_append_keeps_a_resumed_runs_rows(tmp_path: Path) -> None:
    path = tmp_path / "sd.csv"
    with CSVLogger(path) as logger:
        logger.log(EstimateRecord(step=0, status="skipped", reason="non-finite loss"))
    with CSVLogger(path, append=True) as logger:  # the resumed run: a wider record comes
        logger.log(_record(step=5))
        logger.log(_record(step=10))
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["0", "5", "10"]
    assert rows[0]["reason"] == "non-finite loss" and float(rows[2]["eigenvalue_2"]) == 20.0
    with CSVLogger(path) as logger:  # without append a new run starts the file afresh
        logger.log(_record(step=20))
    assert [r["step"] for r in csv.DictReader(path.open())] == ["20"]
    with CSVLogger(tmp_path / "new.csv", append=True) as logger:  # nothing to append to
        logger.log(_record(step=1))
    assert [r["step"] for r in csv.DictReader((tmp_path / "new.csv").open())] == ["1"]


def test_csv_logger_writes_the_range_and_decomposition(tmp_path: Path) -> None:
    path = tmp_path / "sd.csv"
    with CSVLogger(path) as logger:
        logger.log(EstimateRecord(step=0, status="skipped", reason="non-finite loss"))
        logger.log(_record(step=5))
    header = path.read_text().splitlines()[0].split(",")
    for key in DECOMPOSITION:
        assert key in header
    rows = list(csv.DictReader(path.open()))
    assert all(rows[0][k] == "nan" or rows[0][k] == "" for k in DECOMPOSITION)
    assert float(rows[1]["sd_low"]) == 2.0 and float(rows[1]["sd_high"]) == 3.5
    assert float(rows[1]["n_edge"]) == 1.0 and float(rows[1]["n_neg"]) == 3.0
    assert float(rows[1]["total_exponent"]) == -0.5 and float(rows[1]["j_star"]) == 2.0
    assert float(rows[1]["lambda_min"]) == -0.01


def test_jsonl_logger_writes_valid_json_with_null_for_nan(tmp_path: Path) -> None:
    path = tmp_path / "sd.jsonl"
    with JSONLLogger(path) as logger:
        logger.log(_record(step=1))
        logger.log(_record(step=2, penalty=0.5))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["penalty"] is None and rows[1]["penalty"] == 0.5
    assert rows[0]["mode"] == "lr" and rows[0]["eigenvalue_1"] == 40.0
    assert rows[0]["n_neg"] == 3.0 and rows[0]["lambda_min"] == -0.01
    assert rows[0]["sd_low"] == 2.0 and rows[0]["total_exponent"] == -0.5


def test_console_logger_prints_every_nth() -> None:
    stream = io.StringIO()
    logger = ConsoleLogger(stream, every=2)
    for step in range(4):
        logger.log(_record(step=step))
    logger.log(EstimateRecord(step=9, status="skipped", reason="estimate failed: boom"))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(
        "[sdopt] step 0: SD 2.5 ± 0.25 [2, 3.5] | n_edge 1, n_neg 3, T -0.5, j* 2 | "
        "λmax 4.000e+01 | λmin -1.000e-02 |"
    )
    assert "edge ratio 1.000" in lines[0] and "12 HVPs" in lines[0] and "4.0% overhead" in lines[0]
    assert lines[1].startswith("[sdopt] step 2")
    assert lines[2] == "[sdopt] step 9: estimate skipped (estimate failed: boom)"


def test_console_logger_shows_the_range_only_when_wide() -> None:
    narrow = ConsoleLogger.format(_record(sd_low=2.0, sd_high=3.0))  # = SD ± 2 uncertainties
    assert narrow.startswith("[sdopt] step 10: SD 2.5 ± 0.25 | n_edge 1,")
    unknown = ConsoleLogger.format(_record(uncertainty=math.nan, sd_low=0.0, sd_high=2410.0))
    assert "SD 2.5 ± nan [0, 2410] |" in unknown
    # an estimator that reports no range nor decomposition: the line of the first release
    old = ConsoleLogger.format(
        _record(
            sd_low=math.nan,
            sd_high=math.nan,
            n_edge=math.nan,
            n_neg=math.nan,
            total_exponent=math.nan,
            j_star=math.nan,
            lambda_min=math.nan,
        )
    )
    assert old.startswith("[sdopt] step 10: SD 2.5 ± 0.25 | λmax 4.000e+01 | edge ratio 1.000 |")


def test_console_logger_writes_large_sd_as_whole_numbers() -> None:
    line = ConsoleLogger.format(
        _record(sharpness_dimension=45540.93, uncertainty=213.6, sd_low=44900.2, sd_high=46100.0)
    )
    assert "SD 45541 ± 214 [44900, 46100] |" in line  # not 4.554e+04 ± 2.1e+02


def test_console_docstring_example_line_matches_the_format() -> None:
    doc = ConsoleLogger.__doc__ or ""
    example = doc.split("Example line::")[1].strip().splitlines()[0].strip()
    record = EstimateRecord(
        step=20,
        sharpness_dimension=2313.7,
        uncertainty=6.0,
        sd_low=2301.0,
        sd_high=2327.0,
        n_edge=0.0,
        n_neg=527.0,
        total_exponent=-12.3,
        j_star=2313.0,
        lambda_max=2.06,
        lambda_min=-0.18,
        edge_ratio=0.515,
        num_products=34,
        seconds=0.21,
        overhead_fraction=0.041,
    )
    assert ConsoleLogger.format(record) == example


def test_console_logger_rejects_bad_every() -> None:
    with pytest.raises(ValueError, match="Invalid every: 0"):
        ConsoleLogger(every=0)


def test_wandb_logger_rejects_bad_prefix() -> None:
    pytest.importorskip("wandb")
    with pytest.raises(ValueError, match="Invalid prefix: 'sdopt'"):
        WandbLogger(prefix="sdopt")


# --- W&B: a real offline run, read back from its transaction log ------------------------------


def read_wandb_records(path: Path) -> list:
    """Parse a ``.wandb`` transaction log (LevelDB log format) into ``Record`` protobufs.

    File: a 7-byte header (ident, magic, version), then 32 KiB blocks of chunks, each a 7-byte
    header (crc32 uint32, length uint16, type uint8) and data; type 1 = full record, 2/3/4 =
    first/middle/last piece; fewer than 7 bytes left in a block are padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and len(data) >= 7, data[:7]
    block, pos, pieces, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pieces = chunk
        elif kind == 3:
            pieces += chunk
        elif kind == 4:
            records.append(pieces + chunk)
    out = []
    for raw in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


def finished_run_records(run_dir: Path, timeout: float = 60.0) -> list:
    """The records of the run in ``run_dir`` once its log holds the ``exit`` record.

    ``run.finish()`` can return before the W&B service has flushed the offline log (seen under
    load: no file yet, a 7-byte header, a record cut mid-write), so read it again until the
    record that closes it is there; anything short of that (missing, partial, unparsable) is
    retried, and only the timeout fails.
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    last = "no .wandb file"
    while True:
        logs = sorted(run_dir.glob("*.wandb"))
        if logs:
            try:
                records = read_wandb_records(logs[0])
            except (AssertionError, DecodeError) as exc:  # a header or record not yet written
                last = f"{type(exc).__name__}: {exc}"
            else:
                if any(r.WhichOneof("record_type") == "exit" for r in records):
                    return records
                last = f"{len(records)} records, no exit record yet"
        if time.monotonic() > deadline:
            raise AssertionError(f"no exit record in {run_dir} after {timeout} s ({last})")
        time.sleep(0.05)


def _history_rows(records: list) -> list[dict[str, float]]:
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb.teardown()  # start from no global wandb state (an earlier test's run or settings)
    yield wandb, tmp_path
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


def test_wandb_logger_offline_run_is_read_back(wandb_offline) -> None:
    wandb, tmp_path = wandb_offline
    logger = WandbLogger(project="sdopt-test", dir=str(tmp_path))
    logger.log(_record(step=100))
    logger.log(
        _record(
            step=200,
            sharpness_dimension=3.0,
            eigenvalues=[41.0, 21.0, 6.0],
            n_neg=527.0,
            lambda_min=-0.18,
        )
    )
    run_dir = Path(logger.run.dir).parent
    logger.close()
    assert wandb.run is None  # the logger created the run, so it finished it
    records = finished_run_records(run_dir)
    metrics = {
        r.metric.glob_name or r.metric.name: r.metric.step_metric
        for r in records
        if r.WhichOneof("record_type") == "metric"
    }
    assert metrics["sdopt/*"] == "sdopt/step"
    rows = [r for r in _history_rows(records) if "sdopt/step" in r]
    assert [r["sdopt/step"] for r in rows] == [100, 200]
    assert rows[0]["sdopt/sharpness_dimension"] == 2.5
    assert rows[1]["sdopt/sharpness_dimension"] == 3.0
    assert rows[1]["sdopt/eigenvalue_3"] == 6.0
    assert [r["sdopt/n_neg"] for r in rows] == [3, 527]  # the decomposition reaches W&B
    assert rows[1]["sdopt/n_edge"] == 1 and rows[1]["sdopt/lambda_min"] == -0.18
    assert rows[1]["sdopt/sd_low"] == 2.0 and rows[1]["sdopt/total_exponent"] == -0.5
    assert rows[0]["sdopt/lr_scale"] == 0.5 and rows[0]["sdopt/num_products"] == 12
    assert all(k.startswith("sdopt/") or k.startswith("_") for r in rows for k in r)


def test_wandb_log_is_read_back_only_once_the_service_wrote_it(wandb_offline, tmp_path) -> None:
    # what run.finish() may leave behind under load, in order: no log yet, a bare header, a
    # record cut mid-write, the whole log; the reader waits for the exit record throughout
    wandb, _ = wandb_offline
    run = wandb.init(project="sdopt-test", dir=str(tmp_path / "source"))
    run.log({"user/loss": 0.5})
    source = Path(run.dir).parent
    run.finish()
    full = next(source.glob("*.wandb"))
    records = finished_run_records(source)
    data = full.read_bytes()
    run_dir = tmp_path / "late"
    run_dir.mkdir()
    log = run_dir / full.name
    stages = [b"", data[:7], data[: len(data) // 2 + 3], data]

    def write_late() -> None:
        for stage in stages:
            time.sleep(0.3)
            log.write_bytes(stage)

    writer = threading.Thread(target=write_late)
    writer.start()
    try:
        late = finished_run_records(run_dir, timeout=30)
    finally:
        writer.join()
    assert [r.SerializeToString() for r in late] == [r.SerializeToString() for r in records]
    assert any(r.get("user/loss") == 0.5 for r in _history_rows(late))


def test_wandb_example_prints_the_folder_of_its_own_run(tmp_path: Path) -> None:
    # a second run into the same --dir printed whichever offline-run-* folder the directory
    # listing gave last; earlier runs (and folders named to sort last) must not be reported
    pytest.importorskip("wandb")
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "wandb_logging.py"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    runs = tmp_path / "w" / "wandb"

    def run_example() -> Path:
        before = set(runs.glob("offline-run-*"))
        proc = subprocess.run(
            [sys.executable, str(script), "--steps", "10", "--dir", str(tmp_path / "w")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        printed = Path(proc.stdout.split("offline run written to ")[1].split(";")[0])
        (new,) = set(runs.glob("offline-run-*")) - before
        assert printed == new, (printed, new)
        return printed

    first = run_example()
    for i in range(20):  # earlier runs whose names sort after any real one
        decoy = runs / f"offline-run-99991231_235959-decoy{i:02d}"
        decoy.mkdir()
        (decoy / f"run-decoy{i:02d}.wandb").write_bytes(b":W&B\x00\x00\x00")
    assert run_example() != first


def test_wandb_logger_reuses_existing_run(wandb_offline, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb, tmp_path = wandb_offline
    run = wandb.init(project="sdopt-test", dir=str(tmp_path))
    calls = []
    monkeypatch.setattr(wandb, "init", lambda *a, **k: calls.append(1))
    logger = WandbLogger(project="ignored")
    logger.log(_record(step=1))
    run.log({"user/loss": 0.5})
    logger.close()
    assert calls == [] and logger.run is None
    assert wandb.run is run  # still open: the user owns it
    run_dir = Path(run.dir).parent
    run.finish()
    rows = _history_rows(finished_run_records(run_dir))
    assert any(r.get("sdopt/step") == 1 for r in rows)
    assert any(r.get("user/loss") == 0.5 for r in rows)
