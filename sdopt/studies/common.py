"""Shared plumbing of the studies: a run cache keyed by configuration hash, and table writers.

Each finished run is one JSON file ``<cache_dir>/<name>-<hash>.json`` where ``hash`` is the
SHA-256 of the canonical JSON of its configuration (sorted keys, plus a format version). A study
that is interrupted and restarted skips every run whose file exists, so studies are resumable;
change any setting and the hash changes, so stale results are never reused silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

CACHE_FORMAT = 1


def config_hash(config: Mapping[str, Any]) -> str:
    """A 16-hex-digit SHA-256 prefix of the canonical JSON of ``config``."""
    payload = json.dumps({"format": CACHE_FORMAT, **config}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class RunCache:
    """One JSON file per finished run, keyed by the hash of its configuration.

    Args:
        directory: where the files live (created on first write).
        prefix: file-name prefix, e.g. ``"correlation"``.
    """

    def __init__(self, directory: str | os.PathLike[str], prefix: str = "run") -> None:
        self.directory = Path(directory)
        self.prefix = prefix

    def path(self, config: Mapping[str, Any]) -> Path:
        return self.directory / f"{self.prefix}-{config_hash(config)}.json"

    def load(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The cached result for ``config``, or ``None`` (missing or unreadable file)."""
        path = self.path(config)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("config") != json.loads(json.dumps(dict(config), default=str)):
            return None  # hash collision or hand-edited file: recompute
        return record["result"]

    def store(self, config: Mapping[str, Any], result: Mapping[str, Any]) -> Path:
        """Write atomically (temporary file, then rename), so a killed run leaves no half file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(config)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps({"config": dict(config), "result": dict(result)}, indent=1, default=str)
        )
        os.replace(tmp, path)
        return path

    def get_or_run(
        self, config: Mapping[str, Any], compute: Callable[[], Mapping[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        """``(result, from_cache)``: the cached result, or ``compute()`` stored then returned."""
        cached = self.load(config)
        if cached is not None:
            return cached, True
        result = dict(compute())
        self.store(config, result)
        return json.loads(json.dumps(result, default=str)), False


def format_number(value: Any, digits: int = 4) -> str:
    """Compact human formatting: ints as is, floats to ``digits`` significant digits, nan as ``nan``."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if abs(value) < 1e-12:  # round-off of averaged ±τ
            value = 0.0
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_number(v, digits) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_csv(
    path: str | os.PathLike[str], header: Sequence[str], rows: Sequence[Sequence[Any]]
) -> Path:
    """Write ``rows`` with ``header`` as CSV (full precision)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else v for v in row])
    return path


def import_pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, or a clear ImportError."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is installed in dev environments
        raise ImportError('Plots need matplotlib: pip install "sdopt[plot]"') from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
