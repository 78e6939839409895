"""Set-based application of bulk requests: validation, conflicts, ids, inserts.

Everything here runs inside a transaction the caller opened. The rows of any
number of bulk requests go through the same handful of statements, so
applying 500 requests costs about what applying one big one does.

The rows being applied are a relation with columns `pos` (a position unique
within this application, increasing in request order then row order: it
decides which of two rows with the same external_id wins, and becomes the
record id as `record_base + pos`), `bulk_request_id`, `index`, and the
columns of model.RECORD_COLUMNS.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Sequence

import duckdb
import pyarrow as pa

from ..views import registered
from .currencies import CURRENCIES_VIEW
from .model import RECORD_COLUMNS, BulkSubmission, check_submissions, concat_records, conform_records
from .queries import bulk_request_summaries
from .schema import RECORD_KEY_SQL, allocate_ids

_INPUT_VIEW = "_submit_input"
_OPTIONS_VIEW = "_submit_requests"

# An input row's key hash, as _record_keys stores it (schema.RECORD_KEY_SQL).
_RECORD_KEY = RECORD_KEY_SQL.format(
    environment="$environment", data_stream_key="r.data_stream_key", external_id="r.external_id"
)

# Which rows fail and why. The first failing rule of a row is its error, in
# the order of the record's fields; `input_error` (a JSON parser's verdict)
# comes first. Conflicts are decided afterwards, among valid rows only.
# The cheap test of each rule runs on every row; the regular expressions that
# word the error precisely run only on the rows that already failed.
_CHECKED = f"""
    SELECT
        r.pos, r.bulk_request_id, r."index", r.data_stream_key, r.external_id,
        CASE WHEN r.external_id IS NOT NULL AND r.data_stream_key IS NOT NULL THEN {_RECORD_KEY} END AS key_hi,
        upper(coalesce(r.currency, 'USD')) AS currency,
        CASE
            WHEN r.input_error IS NOT NULL THEN r.input_error
            WHEN r.date IS NULL THEN 'date: is required'
            -- the round trip accepts exactly YYYY-MM-DD of a real date (year
            -- 0000 casts to 1 BC and comes back different)
            WHEN try_cast(r.date AS DATE)::VARCHAR IS DISTINCT FROM r.date THEN
                CASE WHEN regexp_full_match(r.date, '[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}')
                     THEN 'date: ' || r.date || ' is not a real calendar date'
                     ELSE 'date: must be YYYY-MM-DD, not ''' || r.date || ''''
                END
            WHEN r.data_stream_key IS NULL OR r.data_stream_key = '' THEN 'data_stream_key: is required'
            WHEN s.key IS NULL
                THEN 'data_stream_key: no data stream ''' || r.data_stream_key || ''' in this environment'
            WHEN r.amount IS NULL THEN 'amount: is required'
            WHEN c.code IS NULL THEN
                CASE WHEN regexp_full_match(r.currency, '[A-Za-z]{{3}}')
                     THEN 'currency: ' || upper(r.currency) || ' is not a known ISO 4217 currency'
                     ELSE 'currency: must be a 3-letter ISO 4217 code, not ''' || r.currency || ''''
                END
            WHEN r.direction IS NOT NULL AND r.direction NOT IN ('credit', 'debit')
                THEN 'direction: must be credit or debit, not ''' || r.direction || ''''
            -- json_type on invalid text raises, so validity is its own branch
            WHEN r.metadata IS NOT NULL AND NOT json_valid(r.metadata)
                THEN 'metadata: must be a JSON object, not invalid JSON'
            WHEN r.metadata IS NOT NULL AND json_type(r.metadata) <> 'OBJECT'
                THEN 'metadata: must be a JSON object'
        END AS error
    FROM {{rows}} AS r
    LEFT JOIN (SELECT DISTINCT key FROM data_streams WHERE environment = $environment) AS s
        ON s.key = r.data_stream_key
    LEFT JOIN {CURRENCIES_VIEW} AS c ON c.code = upper(coalesce(r.currency, 'USD'))
"""

# One row per applied input row: its status, error and record id. A valid
# row with an external_id conflicts when its (stream, external_id) is taken
# by an existing record of the environment, or by a valid row before it in
# this application: the same outcome as applying the rows one by one.
# Claims are told apart by their 8-byte key hash first: a hash claimed once
# in this application and held by no record cannot conflict. Only the rows
# whose hash is claimed twice, or held already, are compared by their
# strings, so a hash that two keys share only adds a candidate, never a
# conflict. (Grouping every row by its two strings took three times as long.)
_OUTCOME = f"""
    CREATE OR REPLACE TEMP TABLE _outcome AS
    WITH checked AS ({_CHECKED}),
    hashes AS (
        SELECT key_hi, count(*) AS claim_count
        FROM checked
        WHERE error IS NULL AND key_hi IS NOT NULL
        GROUP BY key_hi
    ),
    held_hashes AS (
        SELECT k.key_hi, k.record_id FROM _record_keys AS k SEMI JOIN hashes AS h USING (key_hi)
    ),
    suspect AS (
        SELECT key_hi FROM hashes WHERE claim_count > 1
        UNION
        SELECT key_hi FROM held_hashes
    ),
    claims AS (
        SELECT c.data_stream_key, c.external_id, min(c.pos) AS first_pos, count(*) AS claim_count
        FROM checked AS c SEMI JOIN suspect AS s USING (key_hi)
        WHERE c.error IS NULL
        GROUP BY c.data_stream_key, c.external_id
    ),
    held AS (
        SELECT r.data_stream_key, r.external_id
        FROM records AS r
        SEMI JOIN held_hashes AS m ON m.record_id = r.id
        WHERE r.environment = $environment
    ),
    contested AS (
        -- records hold each (stream, external_id) at most once, so this join
        -- matches a claim at most once
        SELECT c.data_stream_key, c.external_id, c.first_pos, e.external_id IS NOT NULL AS taken
        FROM claims AS c
        LEFT JOIN held AS e ON e.data_stream_key = c.data_stream_key AND e.external_id = c.external_id
        WHERE c.claim_count > 1 OR e.external_id IS NOT NULL
    ),
    decided AS (
        SELECT c.*,
               coalesce(c.error IS NULL AND (k.taken OR c.pos <> k.first_pos), false) AS conflict
        FROM checked AS c
        LEFT JOIN contested AS k
            ON k.data_stream_key = c.data_stream_key AND k.external_id = c.external_id
    )
    SELECT
        d.pos, d.bulk_request_id, d."index", d.currency, d.key_hi,
        CASE
            WHEN d.error IS NOT NULL THEN 'failed'
            WHEN NOT d.conflict THEN 'successful'
            WHEN q.on_conflict = 'skip' THEN 'skipped'
            ELSE 'failed'
        END AS status,
        CASE WHEN d.error IS NULL AND NOT d.conflict THEN $record_base + d.pos END AS record_id,
        CASE
            WHEN d.error IS NOT NULL THEN d.error
            WHEN d.conflict AND q.on_conflict = 'error'
                THEN 'external_id ''' || d.external_id || ''' already exists in data stream '''
                     || d.data_stream_key || ''''
        END AS error
    FROM decided AS d
    JOIN (SELECT id, on_conflict FROM bulk_requests WHERE environment = $environment) AS q
        ON q.id = d.bulk_request_id
"""

_INSERT_RECORDS = """
    INSERT INTO records
    SELECT o.record_id, $environment, r.data_stream_key, try_cast(r.date AS DATE), r.amount,
           o.currency, r.direction, r.description, r.external_id,
           coalesce(r.metadata, '{}'), r.bulk_request_id, $now
    FROM {rows} AS r
    JOIN _outcome AS o ON o.pos = r.pos
    WHERE o.status = 'successful'
"""

_INSERT_KEYS = """
    INSERT INTO _record_keys
    SELECT key_hi, record_id FROM _outcome WHERE status = 'successful' AND key_hi IS NOT NULL
"""

_INSERT_ITEMS = """
    INSERT INTO bulk_request_items
    SELECT bulk_request_id, "index", status, record_id, error FROM _outcome
"""

# Counters grow by what this application processed; a request whose rows
# are all processed is completed in the same statement.
_UPDATE_COUNTERS = """
    UPDATE bulk_requests AS b SET
        processed_items = b.processed_items + a.processed,
        successful_items = b.successful_items + a.successful,
        failed_items = b.failed_items + a.failed,
        skipped_items = b.skipped_items + a.skipped,
        status = CASE WHEN b.processed_items + a.processed >= b.total_items
                      THEN 'completed' ELSE b.status END,
        completed_at = CASE WHEN b.processed_items + a.processed >= b.total_items
                            THEN $now ELSE b.completed_at END
    FROM (
        SELECT bulk_request_id,
               count(*) AS processed,
               count(*) FILTER (WHERE status = 'successful') AS successful,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status = 'skipped') AS skipped
        FROM _outcome
        GROUP BY bulk_request_id
    ) AS a
    WHERE b.id = a.bulk_request_id
"""


def apply_rows(
    con: duckdb.DuckDBPyConnection, environment: str, rows: str, row_count: int, now: datetime
) -> None:
    """Apply the rows of relation `rows` (see the module doc) to their bulk requests.

    Inserts the successful records and one item per row, and advances the
    requests' counters (completing those with every row processed).
    `row_count` bounds `pos`: that many record ids are reserved.
    """
    record_base = allocate_ids(con, "records", row_count)
    params = {"environment": environment, "record_base": record_base}
    con.execute(_OUTCOME.replace("{rows}", rows), params)
    con.execute(_INSERT_RECORDS.replace("{rows}", rows), {"environment": environment, "now": now})
    con.execute(_INSERT_KEYS)
    con.execute(_INSERT_ITEMS)
    con.execute(_UPDATE_COUNTERS, {"now": now})
    con.execute("DROP TABLE _outcome")


@cache
def _arange(length: int = 1000) -> pa.Array:
    return pa.array(range(length), pa.int32())


def _index_column(count: int) -> pa.Array:
    base = _arange()
    return base.slice(0, count) if count <= len(base) else pa.array(range(count), pa.int32())


@dataclass
class _NewRequest:
    bulk_request_id: int
    submission: BulkSubmission
    records: pa.Table
    row_offset: int


def submit(
    con: duckdb.DuckDBPyConnection,
    environment: str,
    submissions: Sequence[BulkSubmission],
    *,
    process: bool,
    now: datetime,
) -> list[dict]:
    """Create (and with `process`, apply) bulk requests; their summaries in input order.

    Runs in the caller's transaction. A submission whose Idempotency-Key is
    already used in the environment (or earlier in this call) creates nothing
    and answers the request holding the key.
    """
    check_submissions(submissions)
    keys = sorted({s.idempotency_key for s in submissions if s.idempotency_key is not None})
    known_keys: dict[str, int] = {}
    if keys:
        known_keys = dict(
            con.execute(
                "SELECT idempotency_key, id FROM bulk_requests "
                "WHERE environment = ? AND list_contains(?::VARCHAR[], idempotency_key)",
                [environment, keys],
            ).fetchall()
        )
    # Which submissions create a request: a key seen earlier in this call
    # answers the request created for it, as it would one call later.
    creates: list[bool] = []
    seen_keys = set(known_keys)
    for submission in submissions:
        key = submission.idempotency_key
        creates.append(key is None or key not in seen_keys)
        if key is not None:
            seen_keys.add(key)
    first_id = allocate_ids(con, "bulk_requests", sum(creates)) if any(creates) else 0

    answer_ids: list[int] = []
    new_requests: list[_NewRequest] = []
    row_offset = 0
    for submission, created in zip(submissions, creates):
        key = submission.idempotency_key
        if not created:
            answer_ids.append(known_keys[key])
            continue
        bulk_request_id = first_id + len(new_requests)
        records = conform_records(submission.records)
        new_requests.append(_NewRequest(bulk_request_id, submission, records, row_offset))
        row_offset += records.num_rows
        if key is not None:
            known_keys[key] = bulk_request_id
        answer_ids.append(bulk_request_id)

    if new_requests:
        _create_requests(con, environment, new_requests, row_offset, process=process, now=now)
    return bulk_request_summaries(con, environment, answer_ids)


def _create_requests(
    con: duckdb.DuckDBPyConnection,
    environment: str,
    new_requests: list[_NewRequest],
    row_count: int,
    *,
    process: bool,
    now: datetime,
) -> None:
    options = pa.table(
        {
            "bulk_request_id": pa.array([r.bulk_request_id for r in new_requests], pa.int64()),
            "on_conflict": pa.array([r.submission.on_conflict for r in new_requests], pa.string()),
            "source": pa.array([r.submission.source for r in new_requests], pa.string()),
            "idempotency_key": pa.array([r.submission.idempotency_key for r in new_requests], pa.string()),
            "total_items": pa.array([r.records.num_rows for r in new_requests], pa.int32()),
            "row_offset": pa.array([r.row_offset for r in new_requests], pa.int64()),
        }
    )
    # One Arrow table over all requests' rows (zero-copy concatenation): the
    # statements below see every row of every request at once.
    inputs = concat_records([r.records for r in new_requests])
    request_ids = pa.chunked_array(
        [pa.repeat(pa.scalar(r.bulk_request_id, pa.int64()), r.records.num_rows) for r in new_requests]
    )
    indexes = pa.chunked_array([_index_column(r.records.num_rows) for r in new_requests], pa.int32())
    inputs = inputs.add_column(0, "index", indexes).add_column(0, "bulk_request_id", request_ids)

    with registered(con, _OPTIONS_VIEW, options), registered(con, _INPUT_VIEW, inputs):
        con.execute(
            f"""
            INSERT INTO bulk_requests
            SELECT q.bulk_request_id, $environment, $status, q.source, q.on_conflict,
                   q.idempotency_key, q.total_items, 0, 0, 0, 0, $now,
                   CASE WHEN $status = 'processing' THEN $now END, NULL, NULL, NULL,
                   coalesce(k.data_stream_keys, [])
            FROM {_OPTIONS_VIEW} AS q
            LEFT JOIN (
                SELECT bulk_request_id, list_sort(list(DISTINCT data_stream_key)) AS data_stream_keys
                FROM {_INPUT_VIEW} WHERE data_stream_key IS NOT NULL
                GROUP BY bulk_request_id
            ) AS k USING (bulk_request_id)
            """,
            {"environment": environment, "status": "processing" if process else "pending", "now": now},
        )
        if process:
            rows = (
                f'(SELECT q.row_offset + i."index" AS pos, i.* FROM {_INPUT_VIEW} AS i '
                f"JOIN {_OPTIONS_VIEW} AS q USING (bulk_request_id))"
            )
            apply_rows(con, environment, rows, row_count, now)
        else:
            columns = ", ".join(RECORD_COLUMNS.names)
            con.execute(
                f'INSERT INTO _bulk_request_inputs SELECT bulk_request_id, "index", {columns} '
                f"FROM {_INPUT_VIEW}"
            )
