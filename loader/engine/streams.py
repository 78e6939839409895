"""Environments and data streams: creation, lookup, health."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import duckdb

from loader.errors import NotFound, Unprocessable

from .queries import BULK_REQUEST_STATUSES, iso, rows_as_dicts
from .schema import allocate_ids

#: A request `processing` for longer than this without finishing counts as stuck.
STUCK_AFTER = timedelta(minutes=15)

_STREAM_COLUMNS = "id, key, name, type, description, created_at"


def ensure_environment(con: duckdb.DuckDBPyConnection, name: str, now: datetime) -> None:
    """Record the environment if it is new (in the caller's transaction)."""
    if not isinstance(name, str) or not name:
        raise Unprocessable(f"environment must be a non-empty string, not {name!r}")
    con.execute(
        "INSERT INTO environments SELECT $name, $now "
        "WHERE NOT EXISTS (SELECT 1 FROM environments WHERE name = $name)",
        {"name": name, "now": now},
    )


def _stream_dict(row: dict) -> dict:
    return {**row, "created_at": iso(row["created_at"])}


def _check_text(field: str, value: Any, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or (required and not value.strip()):
        raise Unprocessable(f"{field}: must be a non-empty string, not {value!r}")


def _existing_keys(con: duckdb.DuckDBPyConnection, environment: str) -> set[str]:
    return {key for (key,) in con.execute(
        "SELECT key FROM data_streams WHERE environment = ?", [environment]
    ).fetchall()}


def create_streams(
    con: duckdb.DuckDBPyConnection,
    environment: str,
    streams: list[dict],
    now: datetime,
    *,
    skip_existing: bool,
) -> list[str]:
    """Create streams (dicts with key, name, type?, description?); the keys created.

    A key already taken is Unprocessable unless `skip_existing`, when it is left as it is.
    """
    for stream in streams:
        _check_text("key", stream.get("key"), required=True)
        _check_text("name", stream.get("name"), required=True)
        _check_text("type", stream.get("type", "api"), required=True)
        _check_text("description", stream.get("description"), required=False)
    ensure_environment(con, environment, now)
    taken = _existing_keys(con, environment)
    wanted = []
    for stream in streams:
        if stream["key"] in taken:
            if skip_existing:
                continue
            raise Unprocessable(
                f"key: data stream {stream['key']!r} already exists in environment {environment!r}"
            )
        taken.add(stream["key"])
        wanted.append(stream)
    if not wanted:
        return []
    first_id = allocate_ids(con, "data_streams", len(wanted))
    con.executemany(
        "INSERT INTO data_streams VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            [first_id + n, environment, s["key"], s["name"], s.get("type", "api"), s.get("description"), now]
            for n, s in enumerate(wanted)
        ],
    )
    return [s["key"] for s in wanted]


def list_streams(con: duckdb.DuckDBPyConnection, environment: str) -> list[dict]:
    """The environment's streams, oldest first."""
    rows = rows_as_dicts(
        con, f"SELECT {_STREAM_COLUMNS} FROM data_streams WHERE environment = ? ORDER BY id", [environment]
    )
    return [_stream_dict(row) for row in rows]


def get_stream(con: duckdb.DuckDBPyConnection, environment: str, key: str) -> dict:
    """One stream; NotFound when the environment has no stream `key`."""
    rows = rows_as_dicts(
        con,
        f"SELECT {_STREAM_COLUMNS} FROM data_streams WHERE environment = ? AND key = ?",
        [environment, key],
    )
    if not rows:
        raise NotFound(f"no data stream {key!r} in environment {environment!r}")
    return _stream_dict(rows[0])


def stream_health(con: duckdb.DuckDBPyConnection, environment: str, key: str, now: datetime) -> dict:
    """Records count, bulk requests by status (plus `stuck`) and last ingestion of a stream."""
    get_stream(con, environment, key)
    [(records_count, last_ingestion_at)] = con.execute(
        "SELECT count(*), max(created_at) FROM records WHERE environment = ? AND data_stream_key = ?",
        [environment, key],
    ).fetchall()
    # `stuck` is its own bucket (not also counted as processing), so the
    # buckets add up to the stream's requests.
    counts = dict(
        con.execute(
            """
            SELECT CASE WHEN status = 'processing' AND started_at < $stuck_before THEN 'stuck'
                        ELSE status END AS bucket,
                   count(*)
            FROM bulk_requests
            WHERE environment = $environment AND list_contains(data_stream_keys, $key)
            GROUP BY bucket
            """,
            {"environment": environment, "key": key, "stuck_before": now - STUCK_AFTER},
        ).fetchall()
    )
    return {
        "data_stream_key": key,
        "records_count": records_count,
        "bulk_requests": {status: counts.get(status, 0) for status in (*BULK_REQUEST_STATUSES, "stuck")},
        "last_ingestion_at": iso(last_ingestion_at),
    }
