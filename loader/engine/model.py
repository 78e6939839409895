"""The shape of records going into the engine, and of one bulk request."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from loader.errors import BadRequest, Unprocessable

#: The normalized record table every bulk request carries; row i has index i.
#: All columns are nullable: the engine, not the schema, says what is missing.
RECORD_COLUMNS = pa.schema(
    [
        pa.field("date", pa.string()),  # as sent; checked as YYYY-MM-DD and a real date
        pa.field("data_stream_key", pa.string()),
        pa.field("amount", pa.int64()),  # minor units
        pa.field("currency", pa.string()),  # null -> USD
        pa.field("direction", pa.string()),  # null, credit or debit
        pa.field("description", pa.string()),
        pa.field("external_id", pa.string()),
        pa.field("metadata", pa.string()),  # JSON object text; null -> {}
        pa.field("input_error", pa.string()),  # a parser's verdict: the row fails with it
    ]
)

ON_CONFLICT_CHOICES = ("skip", "error")
MAX_RECORDS_PER_REQUEST = 1000


@dataclass(frozen=True)
class BulkSubmission:
    """One `POST /records/bulk`: its records, `on_conflict` and `Idempotency-Key`."""

    records: pa.Table
    on_conflict: str = "skip"
    idempotency_key: str | None = None
    source: str = "api"


def check_submissions(submissions) -> None:
    """Refuse a whole call (400/422) before anything is created, as EndClose does."""
    for position, submission in enumerate(submissions):
        if not isinstance(submission, BulkSubmission):
            raise TypeError(f"submission {position} is a {type(submission).__name__}, not a BulkSubmission")
        if not isinstance(submission.records, pa.Table):
            kind = type(submission.records).__name__
            raise TypeError(f"submission {position}: records must be a pyarrow.Table, not {kind}")
        if submission.on_conflict not in ON_CONFLICT_CHOICES:
            raise BadRequest(
                f"on_conflict must be 'skip' or 'error', not {submission.on_conflict!r}"
                + _which(position, submission)
            )
        count = submission.records.num_rows
        if count == 0:
            raise Unprocessable("records must hold at least 1 record" + _which(position, submission))
        if count > MAX_RECORDS_PER_REQUEST:
            raise Unprocessable(
                f"records must hold at most {MAX_RECORDS_PER_REQUEST} records, not {count}"
                + _which(position, submission)
            )


def _which(position: int, submission: BulkSubmission) -> str:
    key = f", Idempotency-Key {submission.idempotency_key!r}" if submission.idempotency_key else ""
    return f" (submission {position}{key})"


def _readable_as(actual: pa.DataType, wanted: pa.DataType) -> bool:
    # DuckDB reads every Arrow string layout; casting large_string (what
    # polars produces) slice by slice would cost more than the rest of a submit.
    if pa.types.is_string(wanted):
        string_layouts = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
        return any(is_layout(actual) for is_layout in string_layouts)
    return actual == wanted


def conform_records(table: pa.Table) -> pa.Table:
    """`table` with the columns of RECORD_COLUMNS, in order: missing ones become nulls.

    Types are cast to RECORD_COLUMNS' unless DuckDB reads them as they are
    (any string layout). Extra columns are dropped, so callers may pass
    their wider frames. A column that cannot be cast is a BadRequest.
    """
    if not isinstance(table, pa.Table):
        raise TypeError(f"records must be a pyarrow.Table, not {type(table).__name__}")
    if table.schema.equals(RECORD_COLUMNS):
        return table
    columns = []
    for field in RECORD_COLUMNS:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if not _readable_as(column.type, field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise BadRequest(
                    f"records column {field.name!r} cannot be read as {field.type}: {error}"
                ) from None
        columns.append(column)
    return pa.Table.from_arrays(columns, names=RECORD_COLUMNS.names)


def concat_records(tables: list[pa.Table]) -> pa.Table:
    """One table of the conformed `tables`, zero-copy when their layouts agree."""
    first = tables[0].schema
    if all(table.schema.equals(first) for table in tables):
        return pa.concat_tables(tables)
    return pa.concat_tables([table.cast(RECORD_COLUMNS) for table in tables])
