"""The reconciliation report: per-row outcomes, control totals, the files of the contract.

A run hands its row outcomes to a `ReportWriter` batch by batch. The writer
appends them to `rows.parquet` (and `rows.csv`) and keeps only small running
group-bys in memory, so a run of tens of millions of rows never holds them all.
`finish()` writes `summary.json` (and `report.html`) and checks that the report
adds up. `Report` is the finished report as notebooks and orchestrators see it.

    {report.dir}/{name}/{run_id}/
        summary.json    totals, control totals (by_stream), reasons, bulk_requests
        rows.parquet    one row per source row, columns ROW_COLUMNS
        rows.csv        the same, spreadsheet formulas neutralised ("csv" format)
        report.html     the same for a person ("html" format)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from iso4217 import Currency

from loader.errors import ConfigError, LoaderError

__all__ = [
    "FORMATS",
    "OUTCOMES",
    "REASON_CODES",
    "ROW_COLUMNS",
    "Report",
    "ReportWriter",
    "TooManyFailures",
    "currency_exponent",
    "format_major",
    "format_summary_text",
]

ROW_COLUMNS: dict[str, pl.DataType] = {
    "source_file": pl.String,
    "source_row": pl.Int64,
    "data_stream_key": pl.String,
    "external_id": pl.String,
    "date": pl.Date,
    "amount": pl.Int64,
    "currency": pl.String,
    "outcome": pl.String,
    "reason_code": pl.String,
    "reason": pl.String,
    "bulk_request_id": pl.Int64,
    "record_id": pl.Int64,
}
OUTCOMES = ("successful", "failed", "skipped")
REASON_CODES: dict[str, tuple[str, ...]] = {
    "successful": ("created",),
    # dry_run extends the contract: a --dry-run run skips every row it would send.
    "skipped": ("already_loaded", "duplicate_in_source", "exists_in_target", "dry_run"),
    "failed": ("invalid", "duplicate_in_source", "conflict", "rejected", "unprocessed"),
}
FORMATS = ("json", "parquet", "csv", "html")

SUMMARY_FILE = "summary.json"
ROWS_PARQUET = "rows.parquet"
ROWS_CSV = "rows.csv"
REPORT_HTML = "report.html"

# Keys the writer fills itself; **extra may not shadow them.
_SUMMARY_KEYS = (
    "run_id", "pipeline", "started_at", "finished_at", "dry_run", "target", "source",
    "totals", "by_stream", "reasons", "bulk_requests", "error",
)
# A target dict must never carry a secret into a report that gets shared.
_SECRET_MARKERS = ("api_key", "apikey", "secret", "password", "token", "authorization")
# The rows of the contract that must always be known; the others may be absent
# from a batch (an invalid row has no bulk_request_id) and are then null.
_REQUIRED_COLUMNS = ("source_file", "source_row", "outcome", "reason_code")
_STREAM_KEY = ("data_stream_key", "currency")
# A spreadsheet runs a cell starting with one of these as a formula.
_FORMULA_START = r"^([=+\-@\t\r])"

_ARROW_SCHEMA: pa.Schema = pl.DataFrame(schema=ROW_COLUMNS).to_arrow().schema


class TooManyFailures(LoaderError):
    """More rows failed than the run allows (`fail_on.failed_rows`)."""

    exit_code = 1

    def __init__(self, message: str, *, failed_rows: int, max_failed_rows: int, rows_path: Path):
        self.failed_rows = failed_rows
        self.max_failed_rows = max_failed_rows
        self.rows_path = rows_path
        super().__init__(message)


class ReportWriter:
    """Collects a run's row outcomes batch by batch and writes its report directory."""

    # Batches are buffered up to this many rows before becoming one Parquet row
    # group: the pipeline hands over chunks of ~1000 rows, and one row group per
    # chunk would make rows.parquet slow to read back.
    row_group_rows = 128_000

    def __init__(
        self,
        directory: Path,
        *,
        formats: Sequence[str],
        run_id: str,
        pipeline: str,
        started_at: datetime,
        dry_run: bool,
        target: dict,
        **extra: Any,
    ):
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            choices = ", ".join(FORMATS)
            raise ConfigError([("report.formats", f"unknown format {', '.join(map(repr, unknown))}; choose from {choices}")])
        shadowed = sorted(set(extra) & set(_SUMMARY_KEYS))
        if shadowed:
            raise ValueError(f"extra summary keys {shadowed} would replace keys of the contract")
        self.directory = Path(directory)
        self.formats = tuple(formats)
        self.run_id = run_id
        self.pipeline = pipeline
        self.started_at = _utc(started_at, "started_at")
        self.dry_run = dry_run
        self.target = _without_secrets(target)
        self.extra = extra

        self.directory.mkdir(parents=True, exist_ok=True)
        # Rows go to *.partial files renamed by finish(): a rows.parquet that
        # exists is complete, even after a crash mid-run.
        self._parquet_partial = self.directory / (ROWS_PARQUET + ".partial")
        self._csv_partial = self.directory / (ROWS_CSV + ".partial")
        self._parquet: Any = None  # a pyarrow.parquet.ParquetWriter once rows arrive
        self._csv = None
        self._buffer: list[pl.DataFrame] = []
        self._buffered_rows = 0
        self._total = 0
        # (data_stream_key, currency, outcome) -> [rows, amount]
        self._by_stream: dict[tuple[str | None, str | None, str], list[int]] = {}
        # (outcome, reason_code) -> rows
        self._reasons: dict[tuple[str, str], int] = {}
        # (data_stream_key, currency) -> [rows, amount], what the source holds
        self._source_totals: dict[tuple[str | None, str | None], list[int]] = {}
        self._finished = False

    # -- rows --------------------------------------------------------------

    def add_rows(self, rows: pl.DataFrame) -> None:
        """Append one batch of row outcomes and count it into the totals."""
        self._check_open()
        batch = _conform(rows)
        if batch.height == 0:
            return
        reasons = batch.group_by("outcome", "reason_code").agg(rows=pl.len())
        _check_reasons(reasons)
        for outcome, reason_code, count in reasons.iter_rows():
            self._reasons[(outcome, reason_code)] = self._reasons.get((outcome, reason_code), 0) + count
        # sum() of an all-null group is 0: rows whose amount failed mapping
        # count as rows and add nothing, as in add_source_totals.
        by_stream = batch.group_by(*_STREAM_KEY, "outcome").agg(rows=pl.len(), amount=pl.col("amount").sum())
        for stream, currency, outcome, count, amount in by_stream.iter_rows():
            entry = self._by_stream.setdefault((stream, currency, outcome), [0, 0])
            entry[0] += count
            entry[1] += amount
        self._total += batch.height

        self._buffer.append(batch)
        self._buffered_rows += batch.height
        if self._buffered_rows >= self.row_group_rows:
            self._flush()

    def add_source_totals(self, totals: pl.DataFrame) -> None:
        """Count what the source holds (data_stream_key, currency, rows, amount), per batch."""
        self._check_open()
        missing = [c for c in (*_STREAM_KEY, "rows", "amount") if c not in totals.columns]
        if missing:
            raise ValueError(f"source totals lack columns {missing}")
        # Re-aggregate so a caller may pass several lines for one stream and currency.
        merged = (
            totals.select(
                pl.col("data_stream_key").cast(pl.String),
                pl.col("currency").cast(pl.String),
                pl.col("rows").cast(pl.Int64).fill_null(0),
                pl.col("amount").cast(pl.Int64).fill_null(0),
            )
            .group_by(*_STREAM_KEY)
            .agg(pl.col("rows").sum(), pl.col("amount").sum())
        )
        for stream, currency, count, amount in merged.iter_rows():
            entry = self._source_totals.setdefault((stream, currency), [0, 0])
            entry[0] += count
            entry[1] += amount

    def _flush(self) -> None:
        if not self._buffer:
            return
        batch = pl.concat(self._buffer, how="vertical")
        self._buffer.clear()
        self._buffered_rows = 0
        if self._parquet is None:
            self._parquet = _parquet_writer(self._parquet_partial)
        self._parquet.write_table(batch.to_arrow().cast(_ARROW_SCHEMA))
        if "csv" in self.formats:
            first = self._csv is None
            if first:
                self._csv = open(self._csv_partial, "wb")
            _neutralise_formulas(batch).write_csv(self._csv, include_header=first)

    # -- finish ------------------------------------------------------------

    def finish(
        self,
        *,
        finished_at: datetime,
        source: dict,
        bulk_requests: Iterable[int],
        error: str | None = None,
    ) -> Report:
        """Write summary.json (and report.html), then check that the report adds up.

        The files are written even when the check fails, with the problem in
        `summary["error"]`, so that the run can be inspected; then LoaderError
        is raised.
        """
        self._check_open()
        self._finished = True
        self._flush()
        if self._parquet is None:  # no rows at all: still an empty file with the contract's columns
            self._parquet = _parquet_writer(self._parquet_partial)
        self._parquet.close()
        os.replace(self._parquet_partial, self.directory / ROWS_PARQUET)
        if "csv" in self.formats:
            if self._csv is None:
                self._csv = open(self._csv_partial, "wb")
                _neutralise_formulas(pl.DataFrame(schema=ROW_COLUMNS)).write_csv(self._csv)
            self._csv.close()
            os.replace(self._csv_partial, self.directory / ROWS_CSV)

        totals = {"total": self._total}
        for outcome in OUTCOMES:
            totals[outcome] = sum(rows for (_, _, o), (rows, _) in self._by_stream.items() if o == outcome)
        problems = self._problems(totals)
        if problems:
            mismatch = "report does not add up: " + "; ".join(problems)
            error = f"{error}; {mismatch}" if error else mismatch

        summary: dict[str, Any] = {
            "run_id": self.run_id,
            "pipeline": self.pipeline,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(_utc(finished_at, "finished_at")),
            "dry_run": self.dry_run,
            "target": self.target,
            "source": source,
            "totals": totals,
            "by_stream": [
                {"data_stream_key": s, "currency": c, "outcome": o, "rows": rows, "amount": amount}
                for (s, c, o), (rows, amount) in sorted(self._by_stream.items(), key=lambda kv: _stream_order(kv[0]))
            ],
            "reasons": [
                {"outcome": o, "reason_code": r, "rows": rows}
                for (o, r), rows in sorted(self._reasons.items(), key=lambda item: (-item[1], item[0]))
            ],
            "bulk_requests": sorted({int(i) for i in bulk_requests}),
            "error": error,
            **self.extra,
        }
        _write_atomic(self.directory / SUMMARY_FILE, json.dumps(summary, indent=2, default=_json_default) + "\n")
        report = Report(self.directory, json.loads((self.directory / SUMMARY_FILE).read_text()))
        if "html" in self.formats:
            from loader import report_html  # imported here: report_html builds on this module

            _write_atomic(self.directory / REPORT_HTML, report_html.render_page(report))
        if problems:
            raise LoaderError(
                f"{mismatch}. This is a bug in loader, not in your data: the rows are in "
                f"{self.directory / ROWS_PARQUET}; please report it with that directory."
            )
        return report

    def _problems(self, totals: dict[str, int]) -> list[str]:
        problems = []
        outcomes_sum = sum(totals[o] for o in OUTCOMES)
        if totals["total"] != outcomes_sum:
            problems.append(f"total {totals['total']} != successful + failed + skipped = {outcomes_sum}")
        reported: dict[tuple[str | None, str | None], list[int]] = {}
        for (stream, currency, _), (rows, amount) in self._by_stream.items():
            entry = reported.setdefault((stream, currency), [0, 0])
            entry[0] += rows
            entry[1] += amount
        for key in sorted(set(reported) | set(self._source_totals), key=_stream_order):
            got = reported.get(key, [0, 0])
            want = self._source_totals.get(key, [0, 0])
            if got != want:
                stream, currency = key
                problems.append(
                    f"stream {stream!r} currency {currency!r}: the outcomes hold {got[0]} rows / "
                    f"{got[1]} minor units, the source {want[0]} rows / {want[1]} minor units"
                )
        return problems

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"the report in {self.directory} is already finished")


class Report:
    """One run's report, as notebooks and orchestrators see it."""

    def __init__(self, directory: Path, summary: dict):
        self.directory = Path(directory)
        self.summary = summary

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Report:
        """Read the report of an existing run directory."""
        directory = Path(directory)
        path = directory / SUMMARY_FILE
        try:
            summary = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"no report in {directory}: {SUMMARY_FILE} is missing; pass a run directory "
                "({report.dir}/{name}/{run_id}); `loader runs` lists them"
            ) from None
        except json.JSONDecodeError as exc:
            raise LoaderError(f"{path} is not valid JSON ({exc}); the run may have been interrupted") from None
        return cls(directory, summary)

    @property
    def run_id(self) -> str:
        return self.summary["run_id"]

    @property
    def totals(self) -> dict[str, int]:
        return dict(self.summary["totals"])

    @property
    def failed_rows(self) -> int:
        return self.summary["totals"]["failed"]

    @property
    def rows_path(self) -> Path:
        return self.directory / ROWS_PARQUET

    def rows(self) -> pl.DataFrame:
        """Every row of the run with its outcome."""
        return self._scan().collect()

    def failed(self) -> pl.DataFrame:
        """The rows that failed, with reason_code and reason."""
        return self._scan().filter(pl.col("outcome") == "failed").collect()

    def skipped(self) -> pl.DataFrame:
        """The rows that were skipped, with reason_code."""
        return self._scan().filter(pl.col("outcome") == "skipped").collect()

    def _scan(self) -> pl.LazyFrame:
        if not self.rows_path.exists():
            raise LoaderError(
                f"{self.rows_path} is missing; the run may have been interrupted before its report was finished"
            )
        return pl.scan_parquet(self.rows_path)

    def raise_for_failures(self, max_failed_rows: int = 0) -> None:
        """Raise TooManyFailures when more than `max_failed_rows` rows failed."""
        failed = self.failed_rows
        if failed <= max_failed_rows:
            return
        top = [r for r in self.summary["reasons"] if r["outcome"] == "failed"][:5]
        reasons = ", ".join(f"{r['reason_code']} {r['rows']}" for r in top)
        raise TooManyFailures(
            f"{failed} rows failed, more than the {max_failed_rows} allowed (fail_on.failed_rows); "
            f"top reasons: {reasons}; the failed rows are in {self.rows_path} (outcome = 'failed')",
            failed_rows=failed,
            max_failed_rows=max_failed_rows,
            rows_path=self.rows_path,
        )

    def _repr_html_(self) -> str:
        from loader import report_html  # imported here: report_html builds on this module

        return report_html.render_fragment(self)

    def __repr__(self) -> str:
        t = self.summary["totals"]
        return (
            f"Report(run_id={self.run_id!r}, total={t['total']}, successful={t['successful']}, "
            f"failed={t['failed']}, skipped={t['skipped']})"
        )


# -- money ---------------------------------------------------------------------


def currency_exponent(currency: str | None) -> int | None:
    """The ISO 4217 exponent (USD 2, JPY 0, BHD 3), None when unknown or undefined."""
    if not currency:
        return None
    try:
        return Currency(currency.upper()).exponent
    except ValueError:
        return None


def format_major(amount: int | None, currency: str | None) -> str | None:
    """Minor units as major units with thousands separators (-5 USD -> "-0.05"), exactly.

    None when the currency has no known exponent: show the minor units then.
    """
    exponent = currency_exponent(currency)
    if amount is None or exponent is None:
        return None
    # Integer arithmetic only: a float would round large amounts.
    whole, fraction = divmod(abs(int(amount)), 10**exponent)
    text = f"{whole:,}" + (f".{fraction:0{exponent}d}" if exponent else "")
    return "-" + text if amount < 0 else text


# -- plain text ----------------------------------------------------------------


def format_summary_text(summary: dict) -> str:
    """A few lines for the terminal: totals, control totals, reasons."""
    t = summary["totals"]
    head = f"run {summary['run_id']} of {summary['pipeline']}"
    if summary.get("dry_run"):
        head += " (dry run: nothing was sent)"
    lines = [
        head,
        f"rows: {t['total']:,} total, {t['successful']:,} successful, {t['failed']:,} failed, {t['skipped']:,} skipped",
    ]
    if summary.get("error"):
        lines.append(f"aborted: {summary['error']}")
    if summary["by_stream"]:
        table = [("stream", "currency", "outcome", "rows", "amount")]
        for line in summary["by_stream"]:
            major = format_major(line["amount"], line["currency"])
            amount = major if major is not None else f"{line['amount']:,} minor units"
            table.append(
                (_text(line["data_stream_key"]), _text(line["currency"]), line["outcome"], f"{line['rows']:,}", amount)
            )
        lines.append("control totals:")
        lines.extend("  " + row for row in align_columns(table, right=(3, 4)))
    if summary["reasons"]:
        lines.append("reasons:")
        table = [(r["outcome"], r["reason_code"], f"{r['rows']:,}") for r in summary["reasons"]]
        lines.extend("  " + row for row in align_columns(table, right=(2,)))
    return "\n".join(lines)


def _text(value: str | None) -> str:
    return "(none)" if value is None else value


def align_columns(table: list[tuple[str, ...]], *, right: tuple[int, ...]) -> list[str]:
    """Text table rows with padded columns; the columns in `right` are right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        .rstrip()
        for row in table
    ]


# -- helpers -------------------------------------------------------------------


def _conform(rows: pl.DataFrame) -> pl.DataFrame:
    """The batch with exactly ROW_COLUMNS, in order; optional columns missing become null."""
    missing = [c for c in _REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"report rows lack columns {missing}; they need {list(ROW_COLUMNS)}")
    return rows.select(
        pl.col(name).cast(dtype) if name in rows.columns else pl.lit(None, dtype=dtype).alias(name)
        for name, dtype in ROW_COLUMNS.items()
    )


def _check_reasons(reasons: pl.DataFrame) -> None:
    for outcome, reason_code, count in reasons.iter_rows():
        if reason_code not in REASON_CODES.get(outcome, ()):
            raise ValueError(
                f"{count} report rows have outcome {outcome!r} with reason_code {reason_code!r}; "
                f"allowed: {REASON_CODES}"
            )


def _neutralise_formulas(batch: pl.DataFrame) -> pl.DataFrame:
    # Only text cells: a negative amount is a number, and stays one.
    return batch.with_columns(pl.col(pl.String).str.replace(_FORMULA_START, "'$1"))


def _stream_order(key: tuple) -> tuple:
    # Nulls (rows that failed mapping) sort last; outcomes in OUTCOMES order.
    order = []
    for i, value in enumerate(key):
        if i == 2:
            order.append((False, OUTCOMES.index(value)))
        else:
            order.append((value is None, value or ""))
    return tuple(order)


def _utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        # A naive time is ambiguous (local or UTC?); the report promises UTC.
        raise ValueError(f"{name} must be timezone-aware, for example datetime.now(UTC)")
    return moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _without_secrets(target: dict) -> dict:
    return {
        key: _without_secrets(value) if isinstance(value, dict) else value
        for key, value in target.items()
        if not any(marker in str(key).lower().replace("-", "_") for marker in _SECRET_MARKERS)
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(_utc(value, "a summary value")) if value.tzinfo else value.isoformat()
    if isinstance(value, (date, Path, Decimal)):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable in the report summary")


def _write_atomic(path: Path, text: str) -> None:
    # A reader (an orchestrator polling the directory) never sees half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _parquet_writer(path: Path) -> Any:
    # Imported here: pyarrow.parquet (with pyarrow.fs and ssl) adds 60 ms to every start, and the
    # first rows are written on the run's background stage, not on its critical path.
    import pyarrow.parquet as pq

    # Dictionary pages only where values repeat, and no statistics: encoding cost halves on 1M rows.
    return pq.ParquetWriter(
        path, _ARROW_SCHEMA, compression="snappy", write_statistics=False,
        use_dictionary=["source_file", "data_stream_key", "currency", "outcome", "reason_code"],
    )
