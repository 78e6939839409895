"""JSON `records` array -> the normalized record table, set-based in DuckDB."""

from __future__ import annotations

import threading

import duckdb
import pyarrow as pa

from loader.errors import Unprocessable

from .model import RECORD_COLUMNS

_STRING_FIELDS = ("date", "data_stream_key", "currency", "direction", "description", "external_id")
_REQUIRED = ("date", "data_stream_key", "amount")
# Checked in this order; the first problem of a row is its input_error.
_FIELD_ORDER = (
    "date", "data_stream_key", "amount", "currency", "direction", "description", "external_id", "metadata",
)

_memory_lock = threading.Lock()
_memory: duckdb.DuckDBPyConnection | None = None


def _connection() -> duckdb.DuckDBPyConnection:
    # One in-memory database for the process; a cursor per call is cheap and
    # safe across threads, a fresh database per call is not cheap.
    global _memory
    with _memory_lock:
        if _memory is None:
            _memory = duckdb.connect(":memory:")
        return _memory.cursor()


def _kind(json_type: str) -> str:
    """SQL: the JSON type name as a person says it ('a float')."""
    return (
        f"CASE {json_type} WHEN 'VARCHAR' THEN 'a string' WHEN 'BIGINT' THEN 'an integer' "
        f"WHEN 'UBIGINT' THEN 'an integer' WHEN 'DOUBLE' THEN 'a float' "
        f"WHEN 'BOOLEAN' THEN 'a boolean' WHEN 'ARRAY' THEN 'an array' "
        f"WHEN 'OBJECT' THEN 'an object' ELSE 'null' END"
    )


def _field_checks(field: str) -> list[str]:
    t = f"{field}_t"
    absent = f"({t} IS NULL OR {t} = 'NULL')"
    checks = []
    if field in _REQUIRED:
        checks.append(f"WHEN {absent} THEN '{field}: is required'")
    if field in _STRING_FIELDS:
        checks.append(
            f"WHEN NOT {absent} AND {t} <> 'VARCHAR' THEN '{field}: must be a string, not ' || {_kind(t)}"
        )
    elif field == "amount":
        checks.append(
            f"WHEN NOT {absent} AND {t} NOT IN ('BIGINT', 'UBIGINT') "
            f"THEN 'amount: must be an integer, not ' || {_kind(t)}"
        )
        checks.append(
            "WHEN amount_t = 'UBIGINT' AND try_cast(r->>'$.amount' AS BIGINT) IS NULL "
            "THEN 'amount: ' || (r->>'$.amount') || ' is out of the 64-bit integer range'"
        )
    elif field == "metadata":
        checks.append(
            f"WHEN NOT {absent} AND {t} <> 'OBJECT' "
            f"THEN 'metadata: must be a JSON object, not ' || {_kind(t)}"
        )
    return checks


def _build_sql() -> str:
    types = ",\n".join(f"json_type(r, '$.{field}') AS {field}_t" for field in _FIELD_ORDER)
    values = [
        f"CASE WHEN {field}_t = 'VARCHAR' THEN r->>'$.{field}' END AS {field}" for field in _STRING_FIELDS
    ]
    values.append(
        "CASE WHEN amount_t IN ('BIGINT', 'UBIGINT') THEN try_cast(r->>'$.amount' AS BIGINT) END AS amount"
    )
    values.append("CASE WHEN metadata_t = 'OBJECT' THEN CAST(r->'$.metadata' AS VARCHAR) END AS metadata")
    checks = [
        f"WHEN rt IS DISTINCT FROM 'OBJECT' THEN 'record: must be a JSON object, not ' || {_kind('rt')}"
    ]
    for field in _FIELD_ORDER:
        checks.extend(_field_checks(field))
    values.append("CASE " + "\n".join(checks) + " END AS input_error")
    columns = ", ".join(RECORD_COLUMNS.names)
    return f"""
        WITH items AS (
            SELECT unnest(j) AS r, unnest(range(len(j))) AS i
            FROM (SELECT CAST(CAST($records AS JSON) AS JSON[]) AS j)
        ), typed AS (
            SELECT i, r, json_type(r) AS rt, {types} FROM items
        ), normalized AS (
            SELECT i, {", ".join(values)} FROM typed
        )
        SELECT {columns} FROM normalized ORDER BY i
    """


_SQL = _build_sql()


def normalize_json_records(records_json: str | bytes) -> pa.Table:
    """The JSON text of a request's `records` array as the normalized record table.

    Row i is element i. Wrong JSON types, non-object elements and missing
    required fields do not raise: they become the row's `input_error`
    (e.g. "amount: must be an integer, not a float"). Text that is not a JSON
    array raises Unprocessable (422).
    """
    if isinstance(records_json, (bytes, bytearray, memoryview)):
        try:
            records_json = bytes(records_json).decode("utf-8")
        except UnicodeDecodeError as error:
            raise Unprocessable(f"records: not UTF-8 text ({error})") from None
    con = _connection()
    try:
        # json_type on invalid JSON raises (or worse), so validity comes first.
        [(valid,)] = con.execute("SELECT json_valid($records)", {"records": records_json}).fetchall()
        if not valid:
            raise Unprocessable("records: not valid JSON")
        [(kind,)] = con.execute(
            "SELECT json_type(CAST($records AS JSON))", {"records": records_json}
        ).fetchall()
        if kind != "ARRAY":
            raise Unprocessable(f"records: must be an array, not {_PLAIN_KIND.get(kind, 'null')}")
        table = con.sql(_SQL, params={"records": records_json}).to_arrow_table()
    except duckdb.Error as error:
        raise Unprocessable(f"records: cannot be read as JSON ({error})") from None
    finally:
        con.close()
    return table.cast(RECORD_COLUMNS)


_PLAIN_KIND = {
    "VARCHAR": "a string",
    "BIGINT": "an integer",
    "UBIGINT": "an integer",
    "DOUBLE": "a float",
    "BOOLEAN": "a boolean",
    "OBJECT": "an object",
}
