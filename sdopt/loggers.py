"""Loggers for :class:`sdopt.records.EstimateRecord`: Weights & Biases, CSV, JSONL and console.

Every logger has ``log(record)`` and ``close()`` and writes the keys of
:meth:`EstimateRecord.to_dict` (``sdopt/step``, ``sdopt/sharpness_dimension``, ...). Under
``torch.distributed`` only rank 0 writes: on other ranks ``log`` does nothing, so the same code
runs unchanged in every process.

``wandb`` is an optional dependency (``pip install "sdopt[wandb]"``), imported only when a
:class:`WandbLogger` is created.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from sdopt._checks import check_bool, check_int, check_output_path, check_str
from sdopt.records import EstimateRecord

__all__ = ["CSVLogger", "ConsoleLogger", "JSONLLogger", "Logger", "WandbLogger", "is_rank_zero"]


def is_rank_zero() -> bool:
    """``True`` unless ``torch.distributed`` is initialised and this process is not rank 0."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Logger:
    """Base class: subclasses implement :meth:`_write`; :meth:`log` filters to rank 0."""

    rank_zero_only: bool = True

    def log(self, record: EstimateRecord) -> None:
        """Write one record (a no-op on ranks other than 0)."""
        if self.rank_zero_only and not is_rank_zero():
            return
        self._write(record)

    def _write(self, record: EstimateRecord) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release resources. Safe to call twice."""

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WandbLogger(Logger):
    """Log records to Weights & Biases.

    If a run is active (``wandb.run`` is not ``None``) it is used as is: ``wandb.init`` is never
    called and :meth:`close` leaves the run open. Otherwise a run is created with
    ``wandb.init(**init_kwargs)`` on the first record and finished by :meth:`close`.

    All keys live under ``prefix`` (``"sdopt/"``), on their own step axis:
    ``define_metric(prefix + "*", step_metric=prefix + "step")``, so the records never disturb
    the x-axis of the user's own ``wandb.log`` calls.

    Args:
        prefix: Key prefix; must end with ``"/"`` to form a W&B section.
        commit: Passed to ``wandb.log``. ``True`` writes a row per record; ``False`` merges the
            record into the user's next ``wandb.log`` call.
        **init_kwargs: Passed to ``wandb.init`` when no run is active (``project``, ``name``,
            ``mode``, ``dir``, ``config``, ...).

    Raises:
        ImportError: If ``wandb`` is not installed.
        ValueError: If ``prefix`` is empty or does not end with ``"/"``.
    """

    def __init__(self, prefix: str = "sdopt/", *, commit: bool = True, **init_kwargs: Any) -> None:
        if not isinstance(prefix, str) or not prefix.endswith("/") or prefix == "/":
            raise ValueError(
                f"Invalid prefix: {prefix!r} (must be a non-empty string ending in '/')"
            )
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError('WandbLogger needs wandb: pip install "sdopt[wandb]"') from exc
        self._wandb = wandb
        self.prefix = prefix
        self.commit = check_bool("commit", commit)
        self.init_kwargs = init_kwargs
        self._run: Any = None
        self._owns_run = False
        self._defined = False

    @property
    def run(self) -> Any:
        """The W&B run records go to (``None`` before the first record, and on ranks other than 0)."""
        return self._run

    def _ensure_run(self) -> Any:
        wandb = self._wandb
        if wandb.run is not None:
            self._run = wandb.run
        elif self._run is None or self._owns_run is False:
            self._run = wandb.init(**self.init_kwargs)
            self._owns_run = True
        if not self._defined:
            self._run.define_metric(f"{self.prefix}step")
            self._run.define_metric(f"{self.prefix}*", step_metric=f"{self.prefix}step")
            self._defined = True
        return self._run

    def _write(self, record: EstimateRecord) -> None:
        run = self._ensure_run()
        run.log(record.to_dict(self.prefix), commit=self.commit)

    def close(self) -> None:
        if self._run is not None and self._owns_run:
            self._run.finish()
        self._run = None
        self._owns_run = False
        self._defined = False


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class JSONLLogger(Logger):
    """Append one JSON object per record to a ``.jsonl`` file (NaN written as ``null``).

    Args:
        path: File to write; parent directories are created.
        prefix: Key prefix (``""`` by default: plain field names).
        append: Append to an existing file instead of truncating it.
    """

    def __init__(self, path: str | Path, *, prefix: str = "", append: bool = False) -> None:
        self.path = check_output_path("path", path)
        self.prefix = check_str("prefix", prefix)
        self.append = check_bool("append", append)
        self._file: TextIO | None = None

    def _write(self, record: EstimateRecord) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a" if self.append else "w", encoding="utf-8")
        row = {k: _json_safe(v) for k, v in record.to_dict(self.prefix, include_text=True).items()}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CSVLogger(Logger):
    """Write records as rows of a CSV file with a header.

    Columns are the keys of the records seen so far; when a later record brings new keys (for
    example eigenvalues after a skipped first estimate) the file is rewritten with the wider
    header. Missing values are empty cells.

    Args:
        path: File to write; parent directories are created.
        prefix: Key prefix (``""`` by default: plain column names).
        append: Keep the rows of an existing file (a resumed run) and add to them, widening the
            header if needed, instead of starting the file afresh at the first record.
    """

    def __init__(self, path: str | Path, *, prefix: str = "", append: bool = False) -> None:
        self.path = check_output_path("path", path)
        self.prefix = check_str("prefix", prefix)
        self.append = check_bool("append", append)
        self._fields: list[str] = []
        self._file: TextIO | None = None
        self._writer: csv.DictWriter | None = None

    def _existing(self) -> tuple[list[str], list[dict[str, str]]]:
        """Header and rows of the file as it is on disk (empty when there is none)."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return [], []
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def _reopen(self) -> None:
        """(Re)write the file with the current header, keeping the rows already written."""
        old_rows: list[dict[str, str]] = []
        if self._file is not None:
            self._file.close()
            old_rows = self._existing()[1]
        elif self.append:
            fields, old_rows = self._existing()
            self._fields = fields + [k for k in self._fields if k not in fields]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self._fields, restval="")
        self._writer.writeheader()
        self._writer.writerows(old_rows)

    def _write(self, record: EstimateRecord) -> None:
        row = record.to_dict(self.prefix, include_text=True)
        new = [k for k in row if k not in self._fields]
        if new or self._writer is None:
            self._fields.extend(new)
            self._reopen()
        assert self._writer is not None and self._file is not None
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None


def _digits(value: float, significant: int) -> str:
    """``significant`` digits, but whole numbers from ``10**significant`` on (SD 45541, not 4.554e+04)."""
    if math.isfinite(value) and abs(value) >= 10**significant:
        return f"{value:.0f}"
    return f"{value:.{significant}g}"


class ConsoleLogger(Logger):
    """Print a one-line summary of every ``every``-th record.

    Example line::

        [sdopt] step 20: SD 2314 ± 6 [2301, 2327] | n_edge 0, n_neg 527, T -12.3, j* 2313 | λmax 2.060e+00 | λmin -1.800e-01 | edge ratio 0.515 | scale 1.000 | 34 HVPs, 0.21 s, 4.1% overhead

    The SD comes with its uncertainty, and with its plausible range ``[sd_low, sd_high]`` when
    that is wider than ``± 2`` uncertainties (the estimate straddles a jump) or the uncertainty
    is unknown. Then its decomposition: ``n_edge`` (eigenvalues beyond the edge of stability,
    which a smaller learning rate would stabilise), ``n_neg`` (negative eigenvalues, expanding at
    every learning rate), ``T`` (the sum of all exponents) and ``j*`` (``⌊SD⌋``). Quantities the
    estimator did not report (``nan``) are left out.

    Args:
        stream: Where to print (``sys.stderr`` by default).
        every: Print one record in ``every``.
    """

    def __init__(self, stream: TextIO | None = None, *, every: int = 1) -> None:
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise ValueError(f"Invalid stream: {stream!r} (must be None or a file-like object)")
        self.stream = stream
        self.every = check_int("every", every, minimum=1)
        self._count = 0

    @staticmethod
    def _sd_text(record: EstimateRecord) -> str:
        sd, unc = record.sharpness_dimension, record.uncertainty
        text = f"SD {_digits(sd, 4)} ± {_digits(unc, 2)}"
        low, high = record.sd_low, record.sd_high
        if math.isfinite(low) and math.isfinite(high):
            width = high - low
            wide = width > 4 * unc * (1 + 1e-6) if math.isfinite(unc) else width > 0
            if wide:
                text += f" [{_digits(low, 4)}, {_digits(high, 4)}]"
        return text

    @staticmethod
    def _decomposition_text(record: EstimateRecord) -> str:
        items = []
        for label, value, fmt in (
            ("n_edge", record.n_edge, ".0f"),
            ("n_neg", record.n_neg, ".0f"),
            ("T", record.total_exponent, ".3g"),
            ("j*", record.j_star, ".0f"),
        ):
            if math.isfinite(value):
                items.append(f"{label} {value:{fmt}}")
        return ", ".join(items)

    @staticmethod
    def format(record: EstimateRecord) -> str:
        """The line printed for ``record``."""
        if not record.ok:
            return f"[sdopt] step {record.step}: estimate skipped ({record.reason})"
        parts = [ConsoleLogger._sd_text(record)]
        decomposition = ConsoleLogger._decomposition_text(record)
        if decomposition:
            parts.append(decomposition)
        parts.append(f"λmax {record.lambda_max:.3e}")
        if math.isfinite(record.lambda_min):
            parts.append(f"λmin {record.lambda_min:.3e}")
        parts += [f"edge ratio {record.edge_ratio:.3f}", f"scale {record.lr_scale:.3f}"]
        if not math.isnan(record.penalty):
            parts.append(f"penalty {record.penalty:.4g}")
        cost = f"{record.num_products} HVPs, {record.seconds:.2f} s"
        if not math.isnan(record.overhead_fraction):
            cost += f", {100 * record.overhead_fraction:.1f}% overhead"
        parts.append(cost)
        return f"[sdopt] step {record.step}: " + " | ".join(parts)

    def _write(self, record: EstimateRecord) -> None:
        self._count += 1
        if (self._count - 1) % self.every:
            return
        stream = self.stream if self.stream is not None else sys.stderr
        print(self.format(record), file=stream, flush=True)
