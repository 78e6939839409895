"""`loader reconcile`: compare the source with what the target holds, as one join.

    source batches -> map -> validate -> dedupe within the source (keys)   \
                                                                           full join on the key -> diff
    target records of the streams, in the source's date range  -> keys    /

The source is read, mapped and validated exactly as `run` does (invalid rows
are left out and counted) and deduped the same way (first occurrence wins).
Each side is keyed as the dedupe cache keys rows (dedupe.py): a row with an
`external_id` by `(data_stream_key, external_id)`, an id-less row by its content
fingerprint plus its occurrence among identical rows, counted in source order
on the source side and in record-id order on the target side. Metadata is
compared as canonical (minified) JSON on both sides, so the API's re-encoding
of an object does not count as a difference.

A key on both sides is `matched` when date, amount, currency and direction are
equal, else `mismatched` with `fields` naming what differs; a key only in the
source is `missing_in_target`, one only in the target `unexpected_in_target`.
An id-less row whose content changed in the target has another fingerprint, so
it shows as one `missing_in_target` and one `unexpected_in_target`. A target
holding one external_id twice in a stream (possible only by hand) gives the
later record its own `unexpected_in_target` line.

Memory: the source is read in batches like `run`, but the keyed source rows'
compact columns (key, stream, external_id, date, amount, currency, direction,
source_file, source_row) are held for the join, as are the target's records of
the range: roughly 100-150 bytes a row, so a few million rows on each side fit
in a few hundred MB to about a GB. Within-source dedupe spills to a scratch
DuckDB file as in `run`.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from .dedupe import KEY, SourceDeduper
from .report import align_columns, format_major
from .run import validated_batches
from .source import SOURCE_FILE, SOURCE_ROW

STATUSES = ("matched", "mismatched", "missing_in_target", "unexpected_in_target")
COMPARED = ("date", "amount", "currency", "direction")  # what `matched` means
SUMMARY_FILE = "summary.json"
DIFF_PARQUET = "diff.parquet"

TARGET_RECORD_SCHEMA = {
    "data_stream_key": pl.String,
    "external_id": pl.String,
    "date": pl.Date,
    "amount": pl.Int64,
    "currency": pl.String,
    "direction": pl.String,
    "description": pl.String,
    "metadata": pl.String,  # a JSON object as text
    "record_id": pl.Int64,
}
_FIELD_TYPES = {"date": pl.Date, "amount": pl.Int64, "currency": pl.String, "direction": pl.String}
DIFF_SCHEMA = {
    "status": pl.String,
    "data_stream_key": pl.String,
    "external_id": pl.String,
    "fingerprint": pl.String,  # the cache's key of an id-less row (32 hex digits); null for id rows
    "fields": pl.List(pl.String),  # the compared fields that differ (mismatched only)
    **{f"source_{name}": dtype for name, dtype in _FIELD_TYPES.items()},
    **{f"target_{name}": dtype for name, dtype in _FIELD_TYPES.items()},
    SOURCE_FILE: pl.String,
    SOURCE_ROW: pl.Int64,
    "record_id": pl.Int64,
}
# The columns of a keyed side kept for the join.
_SIDE_COLUMNS = [*KEY, "data_stream_key", "external_id", *COMPARED]


@dataclass
class ReconcileResult:
    """A finished reconciliation: `summary` (as in summary.json), `diff` (as in diff.parquet)."""

    summary: dict
    diff: pl.DataFrame
    directory: Path

    @property
    def exit_code(self) -> int:
        """0 when every key matched, else 1."""
        return 0 if self.ok else 1

    @property
    def ok(self) -> bool:
        counts = self.summary["counts"]
        return all(counts[status] == 0 for status in STATUSES if status != "matched")

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.summary["counts"])

    def matched(self) -> pl.DataFrame:
        return self._status("matched")

    def mismatched(self) -> pl.DataFrame:
        return self._status("mismatched")

    def missing(self) -> pl.DataFrame:
        """In the source, not in the target."""
        return self._status("missing_in_target")

    def unexpected(self) -> pl.DataFrame:
        """In the target, not in the source."""
        return self._status("unexpected_in_target")

    def _status(self, status: str) -> pl.DataFrame:
        return self.diff.filter(pl.col("status") == status)

    def __repr__(self) -> str:
        counts = ", ".join(f"{status}={n:,}" for status, n in self.summary["counts"].items())
        return f"<ReconcileResult {self.summary['pipeline']}: {counts} (exit {self.exit_code})>"

    def _repr_html_(self) -> str:
        counts = "".join(
            f"<tr><td>{html.escape(status)}</td><td style='text-align:right'>{n:,}</td></tr>"
            for status, n in self.summary["counts"].items()
        )
        totals = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in _totals_rows(self.summary)[1:]
        )
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in _totals_rows(self.summary)[0])
        return (
            f"<div><strong>reconcile {html.escape(self.summary['pipeline'])}</strong> "
            f"({'all matched' if self.ok else 'differences found'}; {html.escape(str(self.directory))})"
            f"<table>{counts}</table><table><tr>{head}</tr>{totals}</table></div>"
        )


def reconcile_pipeline(pipeline: Any, *, vars: Mapping[str, str] | None = None) -> ReconcileResult:
    """Compare a pipeline's source (a path to pipeline.yaml, or a loaded Pipeline) with its target.

    Loads nothing; writes `{report.dir}/{name}/reconcile-{timestamp}/summary.json` and
    `diff.parquet`, and returns them as a ReconcileResult.
    """
    from .config import load_pipeline
    from .run import make_target, new_run_id

    if not hasattr(pipeline, "mapping"):
        pipeline = load_pipeline(Path(pipeline), vars or {})
    started_at = datetime.now(UTC)
    directory = Path(pipeline.report.dir) / pipeline.name / f"reconcile-{new_run_id(started_at)}"
    scratch_dir = Path(pipeline.dedupe.cache).parent
    scratch_dir.mkdir(parents=True, exist_ok=True)
    target = make_target(pipeline)
    try:
        source_side, source_counts = read_source_side(pipeline, target.target_key, scratch_dir=scratch_dir)
        streams = _streams(pipeline, source_side)
        date_min, date_max = _date_range(source_side)
        if date_min is None:
            records = pl.DataFrame(schema=TARGET_RECORD_SCHEMA)  # nothing valid: no range to compare
        else:
            records = target.records_for(streams, date_min, date_max)  # type: ignore[attr-defined]
    finally:
        target.close()
    target_side = key_target_records(records, target.target_key, scratch_dir=scratch_dir)
    diff = diff_sides(source_side, target_side)
    summary = {
        "pipeline": pipeline.name,
        "pipeline_path": str(pipeline.path) if getattr(pipeline, "path", None) else None,
        "target": target.describe(),
        "started_at": _iso(started_at),
        "finished_at": _iso(datetime.now(UTC)),
        "streams": streams,
        "date_range": {"min": _iso_date(date_min), "max": _iso_date(date_max)},
        "source": {**source_counts, "keys": source_side.height},
        "target_records": records.height,
        "counts": _counts(diff),
        "mismatched_fields": _mismatched_fields(diff),
        "control_totals": control_totals(source_side, records),
    }
    summary["exit_code"] = 0 if all(summary["counts"][s] == 0 for s in STATUSES[1:]) else 1
    _write(directory, summary, diff)
    return ReconcileResult(summary=summary, diff=diff, directory=directory)


# -- the two sides ---------------------------------------------------------------


def read_source_side(pipeline: Any, target_key: str, *, scratch_dir: Path | None = None
                     ) -> tuple[pl.DataFrame, dict[str, int]]:
    """The source's valid, deduped rows, keyed as the cache keys them (compact columns plus
    source_file/source_row), and the counts {rows, valid, invalid, duplicates}."""
    counts = {"rows": 0, "valid": 0, "invalid": 0, "duplicates": 0}
    parts: list[pl.DataFrame] = []
    deduper = SourceDeduper(target_key, scratch_dir=scratch_dir)
    try:
        for batch, valid, invalid in validated_batches(pipeline):
            counts["rows"] += batch.height
            counts["valid"] += valid.height
            counts["invalid"] += invalid.height
            deduplicated = deduper.split(canonical_metadata(valid))
            counts["duplicates"] += deduplicated.duplicates.height
            parts.append(deduplicated.unique.select(*_SIDE_COLUMNS, SOURCE_FILE, SOURCE_ROW))
    finally:
        deduper.close()
    if not parts:
        return _empty_side().with_columns(pl.lit(None, pl.String).alias(SOURCE_FILE),
                                          pl.lit(None, pl.Int64).alias(SOURCE_ROW)), counts
    return pl.concat(parts, how="vertical_relaxed").rechunk(), counts


def key_target_records(records: pl.DataFrame, target_key: str, *, scratch_dir: Path | None = None) -> pl.DataFrame:
    """The target's records (TARGET_RECORD_SCHEMA, oldest first) keyed as the source is: the same
    dedupe code, so id-less occurrences count in record-id order. A second record with the same
    external_id in a stream keeps its own line (a fresh key), to show as unexpected."""
    records = records.select(list(TARGET_RECORD_SCHEMA)).cast(TARGET_RECORD_SCHEMA)
    deduper = SourceDeduper(target_key, scratch_dir=scratch_dir)
    try:
        # The deduper names rows by file and row: here the record id stands for the row.
        split = deduper.split(
            canonical_metadata(records).with_columns(
                pl.lit("target", pl.String).alias(SOURCE_FILE), pl.col("record_id").alias(SOURCE_ROW)
            )
        )
    finally:
        deduper.close()
    unique = split.unique.select(*_SIDE_COLUMNS, "record_id")
    repeated = split.duplicates.select(*_SIDE_COLUMNS, "record_id").with_columns(
        # Never equal to a source key: the record id, in the low half, with the high half at its maximum.
        pl.lit(2**64 - 1, pl.UInt64).alias(KEY[0]), pl.col("record_id").cast(pl.UInt64).alias(KEY[1])
    )
    return pl.concat([unique, repeated]).sort("record_id")


def canonical_metadata(frame: pl.DataFrame) -> pl.DataFrame:
    """Metadata of id-less rows as minified JSON (DuckDB's `json()`), the same text on both sides:
    it is part of their fingerprint. Rows with an external_id keep theirs (their key ignores it)."""
    idless = frame.get_column("external_id").is_null()
    if not idless.any():
        return frame
    con = duckdb.connect()
    try:
        con.register("_m", frame.select("metadata").to_arrow())
        canonical = con.sql("select json(metadata)::varchar as metadata from _m").pl().get_column("metadata")
    finally:
        con.close()
    return frame.with_columns(pl.when(idless).then(canonical).otherwise(pl.col("metadata")).alias("metadata"))


def _empty_side() -> pl.DataFrame:
    return pl.DataFrame(schema={KEY[0]: pl.UInt64, KEY[1]: pl.UInt64, "data_stream_key": pl.String,
                                "external_id": pl.String, **_FIELD_TYPES})


def _streams(pipeline: Any, source_side: pl.DataFrame) -> list[str]:
    """The streams the pipeline loads: the mapping's constant, target.streams, and those the source names."""
    spec = pipeline.mapping.data_stream_key
    streams = {stream.key for stream in pipeline.target.streams or []}
    if getattr(spec, "value", None) is not None:
        streams.add(spec.value)
    streams.update(source_side.get_column("data_stream_key").drop_nulls().unique().to_list())
    return sorted(streams)


def _date_range(source_side: pl.DataFrame) -> tuple[date | None, date | None]:
    dates = source_side.get_column("date")
    return dates.min(), dates.max()  # type: ignore[return-value]


# -- the join ----------------------------------------------------------------------


def diff_sides(source_side: pl.DataFrame, target_side: pl.DataFrame) -> pl.DataFrame:
    """One line per key (DIFF_SCHEMA): a full join of the two keyed sides."""
    source = source_side.select(
        *KEY, pl.col("data_stream_key").alias("_s_stream"), pl.col("external_id").alias("_s_id"),
        *[pl.col(name).alias(f"source_{name}") for name in COMPARED], SOURCE_FILE, SOURCE_ROW,
        pl.int_range(pl.len(), dtype=pl.Int64).alias("_s_pos"),
    )
    target = target_side.select(
        *KEY, pl.col("data_stream_key").alias("_t_stream"), pl.col("external_id").alias("_t_id"),
        *[pl.col(name).alias(f"target_{name}") for name in COMPARED], "record_id",
        pl.int_range(pl.len(), dtype=pl.Int64).alias("_t_pos"),
    )
    joined = source.join(target, on=KEY, how="full", coalesce=True)
    in_source, in_target = pl.col("_s_pos").is_not_null(), pl.col("_t_pos").is_not_null()
    differing = pl.concat_list(
        [pl.when(pl.col(f"source_{n}").ne_missing(pl.col(f"target_{n}"))).then(pl.lit(n)) for n in COMPARED]
    ).list.drop_nulls()
    joined = joined.with_columns(
        pl.when(in_source & in_target).then(differing).otherwise(pl.lit([], dtype=pl.List(pl.String))).alias("fields"),
        pl.coalesce("_s_stream", "_t_stream").alias("data_stream_key"),
        pl.coalesce("_s_id", "_t_id").alias("external_id"),
    )
    status = (
        pl.when(in_source & in_target & (pl.col("fields").list.len() == 0)).then(pl.lit("matched"))
        .when(in_source & in_target).then(pl.lit("mismatched"))
        .when(in_source).then(pl.lit("missing_in_target"))
        .otherwise(pl.lit("unexpected_in_target"))
    )
    joined = joined.with_columns(
        status.alias("status"), _fingerprints(joined),
    ).sort(pl.col("_s_pos"), pl.col("_t_pos"), nulls_last=True)
    return joined.select(list(DIFF_SCHEMA)).cast(DIFF_SCHEMA)


def _fingerprints(joined: pl.DataFrame) -> pl.Series:
    """The key as 32 hex digits for id-less lines, as the cache stores it; null for id lines."""
    con = duckdb.connect()
    try:
        con.register("_k", joined.select(*KEY, "external_id").to_arrow())
        return con.sql(
            "select case when external_id is null then "
            "lpad(lower(to_hex(key_hi)), 16, '0') || lpad(lower(to_hex(key_lo)), 16, '0') end as fingerprint from _k"
        ).pl().get_column("fingerprint")
    finally:
        con.close()


# -- the summary ---------------------------------------------------------------------


def _counts(diff: pl.DataFrame) -> dict[str, int]:
    found = dict(diff.group_by("status").len().iter_rows())
    return {status: int(found.get(status, 0)) for status in STATUSES}


def _mismatched_fields(diff: pl.DataFrame) -> dict[str, int]:
    exploded = diff.filter(pl.col("status") == "mismatched").select(pl.col("fields").explode())
    found = dict(exploded.group_by("fields").len().iter_rows()) if exploded.height else {}
    return {name: int(found[name]) for name in COMPARED if found.get(name)}


def control_totals(source_side: pl.DataFrame, target_records: pl.DataFrame) -> list[dict]:
    """Rows and sum of amount (minor units) per stream and currency, of each side."""

    def totals(frame: pl.DataFrame, side: str) -> pl.DataFrame:
        return frame.group_by("data_stream_key", "currency").agg(
            pl.len().cast(pl.Int64).alias(f"{side}_rows"), pl.col("amount").sum().cast(pl.Int64).alias(f"{side}_amount")
        )

    both = totals(source_side, "source").join(
        totals(target_records, "target"), on=["data_stream_key", "currency"], how="full", coalesce=True
    ).with_columns(pl.col("^(source|target)_(rows|amount)$").fill_null(0)).sort("data_stream_key", "currency")
    return [
        {**line, "agree": line["source_rows"] == line["target_rows"] and line["source_amount"] == line["target_amount"]}
        for line in both.to_dicts()
    ]


def format_reconcile_text(summary: dict) -> str:
    """A few lines for the terminal: counts per status, differing fields, control totals."""
    counts = summary["counts"]
    src = summary["source"]
    lines = [
        f"reconcile of {summary['pipeline']}: "
        + ("everything matched" if summary["exit_code"] == 0 else "differences found"),
        f"source: {src['rows']:,} rows ({src['invalid']:,} invalid and {src['duplicates']:,} repeated, left out); "
        f"target: {summary['target_records']:,} records "
        f"({summary['date_range']['min'] or '-'} to {summary['date_range']['max'] or '-'})",
    ]
    lines.extend("  " + row for row in align_columns([(status, f"{counts[status]:,}") for status in STATUSES], right=(1,)))
    if summary["mismatched_fields"]:
        lines.append("differing fields: " + ", ".join(f"{k} {v:,}" for k, v in summary["mismatched_fields"].items()))
    if summary["control_totals"]:
        lines.append("control totals:")
        lines.extend("  " + row for row in align_columns(_totals_rows(summary), right=(2, 3, 4, 5)))
    lines.append(f"written to {summary.get('directory', '')}".rstrip())
    return "\n".join(lines)


def _totals_rows(summary: dict) -> list[tuple[str, ...]]:
    rows = [("stream", "currency", "source rows", "source amount", "target rows", "target amount", "")]
    for line in summary["control_totals"]:
        rows.append((
            str(line["data_stream_key"]), str(line["currency"]),
            f"{line['source_rows']:,}", _money(line["source_amount"], line["currency"]),
            f"{line['target_rows']:,}", _money(line["target_amount"], line["currency"]),
            "" if line["agree"] else "differs",
        ))
    return rows


def _money(amount: int, currency: str | None) -> str:
    major = format_major(amount, currency)
    return major if major is not None else f"{amount:,} minor units"


# -- files ---------------------------------------------------------------------------


def _write(directory: Path, summary: dict, diff: pl.DataFrame) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    summary["directory"] = str(directory)
    partial = directory / (DIFF_PARQUET + ".partial")
    diff.write_parquet(partial)
    os.replace(partial, directory / DIFF_PARQUET)
    partial = directory / (SUMMARY_FILE + ".partial")
    partial.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, directory / SUMMARY_FILE)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_date(day: date | None) -> str | None:
    return day.isoformat() if day is not None else None
