"""The life of a bulk request after its creation: worker steps, cancel, retry.

Each function is one atomic step inside the caller's transaction; the
Engine commits between steps, so a poller sees a request advance slice by
slice and a cancel can land between two slices.
"""

from __future__ import annotations

from datetime import datetime
from typing import Sequence

import duckdb

from loader.errors import Conflict

from .bulk import apply_rows
from .model import RECORD_COLUMNS
from .queries import find_bulk_request

_INPUT_COLUMNS = ", ".join(RECORD_COLUMNS.names)


def runnable_ids(con: duckdb.DuckDBPyConnection, bulk_request_ids: Sequence[int] | None) -> list[int]:
    """Pending requests oldest first; or, of the given ids, those pending or processing, in that order.

    A given request still `processing` is resumed: every committed slice
    advanced its counters, so it continues where it stopped.
    """
    if bulk_request_ids is None:
        pending = con.execute("SELECT id FROM bulk_requests WHERE status = 'pending' ORDER BY id").fetchall()
        return [i for (i,) in pending]
    wanted = [int(i) for i in bulk_request_ids]
    runnable = {
        i
        for (i,) in con.execute(
            "SELECT id FROM bulk_requests WHERE list_contains(?::BIGINT[], id) "
            "AND status IN ('pending', 'processing')",
            [sorted(set(wanted))],
        ).fetchall()
    }
    return list(dict.fromkeys(i for i in wanted if i in runnable))


def start(con: duckdb.DuckDBPyConnection, bulk_request_id: int, now: datetime) -> bool:
    """Move a pending request to processing; False when it is no longer runnable."""
    started = con.execute(
        """
        UPDATE bulk_requests SET status = 'processing', started_at = coalesce(started_at, $now)
        WHERE id = $id AND status IN ('pending', 'processing')
        RETURNING id
        """,
        {"id": bulk_request_id, "now": now},
    ).fetchall()
    return bool(started)


def process_slice(
    con: duckdb.DuckDBPyConnection, bulk_request_id: int, max_rows: int, now: datetime
) -> tuple[int, bool]:
    """Apply the next at most `max_rows` unprocessed rows of a processing request.

    Returns (rows applied, whether the request is still processing). Stops
    without applying anything when the request was cancelled meanwhile.
    A completed request's inputs are dropped: only a failed or cancelled
    one can be retried, and only those need their inputs.
    """
    rows = con.execute(
        "SELECT environment, status, processed_items, total_items FROM bulk_requests WHERE id = ?",
        [bulk_request_id],
    ).fetchall()
    if not rows or rows[0][1] != "processing":
        return 0, False
    environment, _, processed, total = rows[0]
    applied = 0
    if processed < total and max_rows > 0:
        # The inputs stay until completion, so the next slice starts at
        # position processed_items of the request's rows in index order.
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE _slice AS
            SELECT (row_number() OVER (ORDER BY "index") - 1) AS pos,
                   bulk_request_id, "index", {_INPUT_COLUMNS}
            FROM (
                SELECT * FROM _bulk_request_inputs WHERE bulk_request_id = $id
                ORDER BY "index" LIMIT $rows OFFSET $processed
            )
            """,
            {"id": bulk_request_id, "rows": max_rows, "processed": processed},
        )
        [(applied,)] = con.execute("SELECT count(*) FROM _slice").fetchall()
        if applied:
            apply_rows(con, environment, "_slice", applied, now)
        con.execute("DROP TABLE _slice")
    if applied == 0 and processed < total:
        # Inputs missing for rows never processed: the request cannot finish.
        fail(con, bulk_request_id, f"{total - processed} rows have no stored input", now)
        return 0, False
    [(status,)] = con.execute("SELECT status FROM bulk_requests WHERE id = ?", [bulk_request_id]).fetchall()
    if status == "processing" and processed + applied >= total:
        # Only reached for a request with nothing left (apply_rows completes the others).
        con.execute(
            "UPDATE bulk_requests SET status = 'completed', completed_at = ? WHERE id = ?",
            [now, bulk_request_id],
        )
        status = "completed"
    if status == "completed":
        con.execute("DELETE FROM _bulk_request_inputs WHERE bulk_request_id = ?", [bulk_request_id])
        return applied, False
    return applied, True


def process_together(con: duckdb.DuckDBPyConnection, bulk_request_ids: Sequence[int], now: datetime) -> dict[int, int]:
    """Apply every unprocessed row of several processing requests at once; rows applied per request.

    The same outcome as applying them one after the other in the given order (apply_rows decides
    between two rows with one external_id by position: request order, then row order), for the
    fixed cost of one step. A request left unfinished (its inputs missing) stays processing for
    `process_slice` to settle.
    """
    ids = list(dict.fromkeys(int(i) for i in bulk_request_ids))  # a request named twice runs once
    applied: dict[int, int] = {}
    environments = con.execute(
        "SELECT environment, list(id) FROM bulk_requests WHERE list_contains($ids, id) AND status = 'processing' "
        "GROUP BY environment",
        {"ids": ids},
    ).fetchall()
    for environment, members in environments:
        in_environment = set(members)
        ordered = [i for i in ids if i in in_environment]
        # Each request's rows past processed_items, in index order (as process_slice takes them),
        # numbered across the requests in the given order.
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE _slice AS
            SELECT (row_number() OVER (ORDER BY ord, "index") - 1) AS pos, bulk_request_id, "index", {_INPUT_COLUMNS}
            FROM (
                SELECT o.ord, i.*, b.processed_items,
                       row_number() OVER (PARTITION BY i.bulk_request_id ORDER BY i."index") AS nth
                FROM _bulk_request_inputs AS i
                JOIN (SELECT unnest($ids) AS id, generate_subscripts($ids, 1) AS ord) AS o ON o.id = i.bulk_request_id
                JOIN bulk_requests AS b ON b.id = i.bulk_request_id
            )
            WHERE nth > processed_items
            """,
            {"ids": ordered},
        )
        counts = dict(con.execute("SELECT bulk_request_id, count(*) FROM _slice GROUP BY ALL").fetchall())
        total = sum(counts.values())
        if total:
            apply_rows(con, environment, "_slice", total, now)
        con.execute("DROP TABLE _slice")
        applied.update({i: counts.get(i, 0) for i in ordered})
    con.execute(
        "DELETE FROM _bulk_request_inputs WHERE list_contains($ids, bulk_request_id) AND bulk_request_id IN "
        "(SELECT id FROM bulk_requests WHERE list_contains($ids, id) AND status = 'completed')",
        {"ids": ids},
    )
    return applied


def fail(con: duckdb.DuckDBPyConnection, bulk_request_id: int, message: str, now: datetime) -> None:
    """Mark a processing request failed; rows not yet processed stay unprocessed."""
    con.execute(
        "UPDATE bulk_requests SET status = 'failed', error_message = ?, completed_at = ? "
        "WHERE id = ? AND status = 'processing'",
        [message, now, bulk_request_id],
    )


def cancel(con: duckdb.DuckDBPyConnection, environment: str, bulk_request_id: int, now: datetime) -> None:
    """Cancel a pending or processing request (a processing one stops before its next slice)."""
    request = find_bulk_request(con, environment, bulk_request_id)
    if request["status"] not in ("pending", "processing"):
        raise Conflict(
            f"bulk request {bulk_request_id} is {request['status']}: only a pending or processing "
            "request can be cancelled"
        )
    con.execute(
        "UPDATE bulk_requests SET status = 'cancelled', completed_at = ? WHERE id = ?", [now, bulk_request_id]
    )


def retry(
    con: duckdb.DuckDBPyConnection, environment: str, bulk_request_id: int, new_id: int, now: datetime
) -> None:
    """Create pending request `new_id` re-running the parent's failed, skipped and unprocessed rows.

    The new request keeps the parent's row indexes, so its results map back
    to the rows of the original submission.
    """
    parent = find_bulk_request(con, environment, bulk_request_id)
    if parent["status"] not in ("failed", "cancelled"):
        raise Conflict(
            f"bulk request {bulk_request_id} is {parent['status']}: only a failed or cancelled "
            "request can be retried"
        )
    con.execute(
        f"""
        INSERT INTO _bulk_request_inputs
        SELECT $new_id, i."index", {", ".join("i." + c for c in RECORD_COLUMNS.names)}
        FROM _bulk_request_inputs AS i
        WHERE i.bulk_request_id = $parent
          AND i."index" NOT IN (
              SELECT "index" FROM bulk_request_items WHERE bulk_request_id = $parent AND status = 'successful'
          )
        """,
        {"new_id": new_id, "parent": bulk_request_id},
    )
    [(count, keys)] = con.execute(
        """
        SELECT count(*),
               coalesce(list_sort(list(DISTINCT data_stream_key)
                                  FILTER (WHERE data_stream_key IS NOT NULL)), [])
        FROM _bulk_request_inputs WHERE bulk_request_id = ?
        """,
        [new_id],
    ).fetchall()
    if count == 0:
        raise Conflict(f"bulk request {bulk_request_id} has no failed, skipped or unprocessed rows to retry")
    con.execute(
        """
        INSERT INTO bulk_requests VALUES (
            $id, $environment, 'pending', 'retry', $on_conflict, NULL, $total, 0, 0, 0, 0, $now,
            NULL, NULL, NULL, $parent, $keys)
        """,
        {
            "id": new_id,
            "environment": environment,
            "on_conflict": parent["on_conflict"],
            "total": count,
            "now": now,
            "parent": bulk_request_id,
            "keys": keys,
        },
    )
