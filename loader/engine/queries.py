"""Reads: bulk requests, their items and records, shaped as the API answers them."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import date, datetime, timezone
from typing import Any, Sequence

import duckdb
import polars as pl

from loader.errors import NotFound, Unprocessable

from .currencies import CURRENCIES_VIEW

BULK_REQUEST_STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
MAX_PAGE = 200

_REQUEST_COLUMNS = """
    id, status, source, on_conflict, idempotency_key, total_items, processed_items,
    successful_items, failed_items, skipped_items, created_at, started_at, completed_at,
    error_message, parent_bulk_request_id, data_stream_keys
"""
_SUMMARY_FIELDS = (
    "id",
    "status",
    "total_items",
    "processed_items",
    "successful_items",
    "failed_items",
    "skipped_items",
)


def utc_now() -> datetime:
    """Now in UTC as the naive timestamp the tables store."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(value: datetime | date | None) -> str | None:
    """A stored timestamp (naive UTC) as ISO 8601 with Z, a date as YYYY-MM-DD."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat(timespec="microseconds") + "Z"
    return value.isoformat()


def rows_as_dicts(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> list[dict]:
    """Run `sql` and answer its rows as dicts keyed by column name."""
    cursor = con.execute(sql, params) if params is not None else con.execute(sql)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def check_limit(limit: int) -> int:
    """The page size, 1-200 as in the API; otherwise Unprocessable."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise Unprocessable(f"limit must be an integer from 1 to {MAX_PAGE}, not {limit!r}")
    return limit


def encode_cursor(last_id: int) -> str:
    """An opaque cursor: the page after the row with id `last_id`, newest first."""
    return base64.urlsafe_b64encode(f"before:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The id a cursor of encode_cursor points after; Unprocessable for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = text.partition(":")
        if prefix != "before":
            raise ValueError(text)
        return int(value)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise Unprocessable(f"cursor {cursor!r} is not a cursor this engine returned") from None


def _page(rows: list[dict], limit: int) -> tuple[list[dict], str | None]:
    # One row more than the page was fetched: its presence means a next page.
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1]["id"])
    return rows, None


def _url(bulk_request_id: int) -> str:
    return f"/v1/bulk_requests/{bulk_request_id}"


def _request_dict(row: dict) -> dict:
    total = row["total_items"]
    return {
        "id": row["id"],
        "status": row["status"],
        "source": row["source"],
        "on_conflict": row["on_conflict"],
        "idempotency_key": row["idempotency_key"],
        "total_items": total,
        "processed_items": row["processed_items"],
        "successful_items": row["successful_items"],
        "failed_items": row["failed_items"],
        "skipped_items": row["skipped_items"],
        "progress": (row["processed_items"] * 100 // total) if total else 0,
        "created_at": iso(row["created_at"]),
        "started_at": iso(row["started_at"]),
        "completed_at": iso(row["completed_at"]),
        "error_message": row["error_message"],
        "parent_bulk_request_id": row["parent_bulk_request_id"],
        "data_stream_keys": list(row["data_stream_keys"] or []),
        "url": _url(row["id"]),
    }


def bulk_request_summaries(
    con: duckdb.DuckDBPyConnection, environment: str, bulk_request_ids: Sequence[int]
) -> list[dict]:
    """The POST /records/bulk answer of each id, in the order given."""
    rows = rows_as_dicts(
        con,
        f"SELECT {', '.join(_SUMMARY_FIELDS)} FROM bulk_requests "
        "WHERE environment = ? AND list_contains(?::BIGINT[], id)",
        [environment, sorted(set(bulk_request_ids))],
    )
    by_id = {row["id"]: {**row, "url": _url(row["id"])} for row in rows}
    return [dict(by_id[bulk_request_id]) for bulk_request_id in bulk_request_ids]


def existing_idempotency_keys(
    con: duckdb.DuckDBPyConnection, environment: str, keys: Sequence[str]
) -> list[str]:
    """The keys of `keys` that a bulk request of the environment already holds, sorted."""
    wanted = sorted({key for key in keys if key is not None})
    if not wanted:
        return []
    return [
        key
        for (key,) in con.execute(
            "SELECT idempotency_key FROM bulk_requests "
            "WHERE environment = ? AND list_contains(?::VARCHAR[], idempotency_key) ORDER BY 1",
            [environment, wanted],
        ).fetchall()
    ]


def find_bulk_request(con: duckdb.DuckDBPyConnection, environment: str, bulk_request_id: int) -> dict:
    """The full bulk request (without results); NotFound if not of this environment."""
    rows = rows_as_dicts(
        con,
        f"SELECT {_REQUEST_COLUMNS} FROM bulk_requests WHERE environment = ? AND id = ?",
        [environment, bulk_request_id],
    )
    if not rows:
        raise NotFound(f"no bulk request {bulk_request_id} in environment {environment!r}")
    return _request_dict(rows[0])


def get_bulk_request(
    con: duckdb.DuckDBPyConnection, environment: str, bulk_request_id: int, *, limit: int, offset: int
) -> dict:
    """GET /bulk_requests/{id}: the request and one page of per-row results."""
    check_limit(limit)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise Unprocessable(f"offset must be an integer >= 0, not {offset!r}")
    request = find_bulk_request(con, environment, bulk_request_id)
    items = rows_as_dicts(
        con,
        'SELECT "index", status, record_id, error FROM bulk_request_items '
        'WHERE bulk_request_id = ? ORDER BY "index" LIMIT ? OFFSET ?',
        [bulk_request_id, limit + 1, offset],
    )
    data = []
    for item in items[:limit]:
        result = {"index": item["index"], "status": item["status"]}
        if item["record_id"] is not None:
            result["record_id"] = item["record_id"]
        if item["error"] is not None:
            result["error"] = item["error"]
        data.append(result)
    request["results"] = {"data": data, "has_more": len(items) > limit, "offset": offset}
    return request


def bulk_request_items(
    con: duckdb.DuckDBPyConnection, environment: str, bulk_request_ids: Sequence[int]
) -> pl.DataFrame:
    """Every processed item of these requests of the environment, by request then index."""
    return con.sql(
        """
        SELECT i.bulk_request_id, i."index", i.status, i.record_id, i.error
        FROM bulk_request_items AS i
        SEMI JOIN (
            SELECT id FROM bulk_requests
            WHERE environment = $environment AND list_contains($ids::BIGINT[], id)
        ) AS b ON b.id = i.bulk_request_id
        ORDER BY i.bulk_request_id, i."index"
        """,
        params={"environment": environment, "ids": sorted({int(i) for i in bulk_request_ids})},
    ).pl()


def _timestamp_filter(name: str, value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise Unprocessable(f"{name} must be an ISO 8601 timestamp, not {value!r}") from None
    if not isinstance(value, datetime):
        raise Unprocessable(f"{name} must be a timestamp, not {value!r}")
    if value.tzinfo is not None:
        try:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        except OverflowError:  # 0001-01-01T00:00+05:00 is before the first UTC instant
            raise Unprocessable(f"{name} is out of range: {value.isoformat()}") from None
    return value


def list_bulk_requests(
    con: duckdb.DuckDBPyConnection,
    environment: str,
    *,
    data_stream_key: str | None,
    status: str | None,
    source: str | None,
    created_after: datetime | str | None,
    created_before: datetime | str | None,
    limit: int,
    cursor: str | None,
) -> dict:
    """GET /bulk_requests: newest first, filtered, one page and the next cursor."""
    check_limit(limit)
    if status is not None and status not in BULK_REQUEST_STATUSES:
        raise Unprocessable(f"status must be one of {', '.join(BULK_REQUEST_STATUSES)}, not {status!r}")
    after = _timestamp_filter("created_after", created_after)
    before = _timestamp_filter("created_before", created_before)
    conditions, params = _page_filters(
        "environment = $environment",
        {"environment": environment, "limit": limit + 1},
        {
            "data_stream_key": (data_stream_key, "list_contains(data_stream_keys, $data_stream_key)"),
            "status": (status, "status = $status"),
            "source": (source, "source = $source"),
            "created_after": (after, "created_at > $created_after"),
            "created_before": (before, "created_at < $created_before"),
        },
        cursor,
        "id",
    )
    rows = rows_as_dicts(
        con,
        f"SELECT {_REQUEST_COLUMNS} FROM bulk_requests WHERE {' AND '.join(conditions)} "
        "ORDER BY id DESC LIMIT $limit",
        params,
    )
    rows, next_cursor = _page(rows, limit)
    return {"data": [_request_dict(row) for row in rows], "next_cursor": next_cursor, "limit": limit}


def _page_filters(
    scope: str, params: dict[str, Any], filters: dict[str, tuple[Any, str]], cursor: str | None, id_column: str
) -> tuple[list[str], dict[str, Any]]:
    """WHERE conditions and parameters of a list endpoint: the given filters, and the cursor's position."""
    conditions = [scope]
    if cursor is not None:
        filters = {**filters, "before_id": (decode_cursor(cursor), f"{id_column} < $before_id")}
    for name, (value, condition) in filters.items():
        if value is not None:
            conditions.append(condition)
            params[name] = value
    return conditions, params


def list_records(
    con: duckdb.DuckDBPyConnection,
    environment: str,
    *,
    data_stream_key: str | None,
    external_id: str | None,
    bulk_request_id: int | None,
    limit: int,
    cursor: str | None,
) -> dict:
    """GET /records: newest first, at least one filter, one page and the next cursor."""
    if data_stream_key is None and external_id is None and bulk_request_id is None:
        raise Unprocessable("give at least one filter: data_stream_key, external_id or bulk_request_id")
    check_limit(limit)
    conditions, params = _page_filters(
        "r.environment = $environment",
        {"environment": environment, "limit": limit + 1},
        {
            "data_stream_key": (data_stream_key, "r.data_stream_key = $data_stream_key"),
            "external_id": (external_id, "r.external_id = $external_id"),
            "bulk_request_id": (bulk_request_id, "r.bulk_request_id = $bulk_request_id"),
        },
        None,
        "r.id",
    )
    lowest, highest = con.execute(
        "SELECT min(id), max(id) FROM records WHERE environment = $environment", {"environment": environment}
    ).fetchall()[0]
    if lowest is None:
        return {"data": [], "next_cursor": None, "limit": limit}
    # DuckDB reads no index in order: "ORDER BY id DESC LIMIT n" below a cursor would scan every
    # older row for every page. A window of ids below the cursor, widened until it holds a page,
    # lets the zone maps skip all other row groups, so paging through a table stays linear.
    upper = decode_cursor(cursor) if cursor is not None else highest + 1
    window = 4 * (limit + 1)
    while True:
        params.update(upper_id=upper, lower_id=upper - window)
        rows = rows_as_dicts(
            con,
            f"""
            SELECT r.id, r.data_stream_key, r.date, r.amount, r.currency, c.exponent AS decimal_places,
                   r.direction, r.description, r.external_id, CAST(r.metadata AS VARCHAR) AS metadata
            FROM (SELECT * FROM records AS r
                  WHERE {' AND '.join(conditions)} AND r.id < $upper_id AND r.id >= $lower_id
                  ORDER BY r.id DESC LIMIT $limit) AS r
            LEFT JOIN {CURRENCIES_VIEW} AS c ON c.code = r.currency
            ORDER BY r.id DESC
            """,
            params,
        )
        if len(rows) > limit or upper - window <= lowest:
            break
        window *= 4
    rows, next_cursor = _page(rows, limit)
    for row in rows:
        row["date"] = iso(row["date"])
        row["metadata"] = json.loads(row["metadata"]) if row["metadata"] else {}
    return {"data": rows, "next_cursor": next_cursor, "limit": limit}
