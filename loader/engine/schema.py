"""The tables of the engine's DuckDB file.

Public tables (users query them with any DuckDB client, so plain types only):
environments, data_streams, records, bulk_requests, bulk_request_items.
Private tables start with an underscore.

No PRIMARY KEY or UNIQUE constraints on purpose: maintaining an ART index on
`records` or `bulk_request_items` costs more than the whole set-based insert;
uniqueness (ids, stream keys, external ids, idempotency keys) is enforced by
the engine's SQL instead.
"""

from __future__ import annotations

import duckdb

from loader.errors import TerminalTargetError

SCHEMA_VERSION = 1

# Timestamps are naive TIMESTAMP in UTC: TIMESTAMPTZ would render in each
# reader's local time zone and needs pytz to come back into Python.
TABLES = {
    "environments": """
        name VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL
    """,
    "data_streams": """
        id BIGINT NOT NULL,
        environment VARCHAR NOT NULL,
        key VARCHAR NOT NULL,
        name VARCHAR NOT NULL,
        type VARCHAR NOT NULL,
        description VARCHAR,
        created_at TIMESTAMP NOT NULL
    """,
    "records": """
        id BIGINT NOT NULL,
        environment VARCHAR NOT NULL,
        data_stream_key VARCHAR NOT NULL,
        date DATE NOT NULL,
        amount BIGINT NOT NULL,
        currency VARCHAR NOT NULL,
        direction VARCHAR,
        description VARCHAR,
        external_id VARCHAR,
        metadata JSON NOT NULL,
        bulk_request_id BIGINT NOT NULL,
        created_at TIMESTAMP NOT NULL
    """,
    # data_stream_keys (added at the end): the streams a request's records name,
    # for the data_stream_key filter and the stream health counts.
    "bulk_requests": """
        id BIGINT NOT NULL,
        environment VARCHAR NOT NULL,
        status VARCHAR NOT NULL,
        source VARCHAR NOT NULL,
        on_conflict VARCHAR NOT NULL,
        idempotency_key VARCHAR,
        total_items INTEGER NOT NULL,
        processed_items INTEGER NOT NULL,
        successful_items INTEGER NOT NULL,
        failed_items INTEGER NOT NULL,
        skipped_items INTEGER NOT NULL,
        created_at TIMESTAMP NOT NULL,
        started_at TIMESTAMP,
        completed_at TIMESTAMP,
        error_message VARCHAR,
        parent_bulk_request_id BIGINT,
        data_stream_keys VARCHAR[]
    """,
    "bulk_request_items": """
        bulk_request_id BIGINT NOT NULL,
        "index" INTEGER NOT NULL,
        status VARCHAR NOT NULL,
        record_id BIGINT,
        error VARCHAR
    """,
    # The submitted rows of requests that have not completed (pending ones, and
    # failed or cancelled ones, which a retry re-runs). Same columns as
    # model.RECORD_COLUMNS.
    "_bulk_request_inputs": """
        bulk_request_id BIGINT NOT NULL,
        "index" INTEGER NOT NULL,
        date VARCHAR,
        data_stream_key VARCHAR,
        amount BIGINT,
        currency VARCHAR,
        direction VARCHAR,
        description VARCHAR,
        external_id VARCHAR,
        metadata VARCHAR,
        input_error VARCHAR
    """,
    # The next free id per table: ids are handed out as a base plus a row
    # position, which is much cheaper than a sequence's nextval per row.
    "_id_counters": """
        name VARCHAR NOT NULL,
        next_id BIGINT NOT NULL
    """,
    "_engine_meta": """
        key VARCHAR NOT NULL,
        value VARCHAR NOT NULL
    """,
    # One row per record with an external_id: the first 64 bits of the md5 of
    # its environment, stream and external_id (RECORD_KEY_SQL). The conflict
    # check scans these 8 bytes a record to find the few records a bulk request
    # may collide with, instead of every record's strings: with random ids
    # (UUIDs) that scan cost 0.25-0.37 s per 250k-row request on 4.9M records.
    "_record_keys": """
        key_hi UBIGINT NOT NULL,
        record_id BIGINT NOT NULL
    """,
}

# md5, not DuckDB's hash(): the keys are stored, and must mean the same to every DuckDB version.
RECORD_KEY_SQL = (
    "(md5_number(concat_ws(chr(31), {environment}, {data_stream_key}, {external_id})) >> 64)::UBIGINT"
)

ID_COUNTERS = ("data_streams", "bulk_requests", "records")


def create_schema(con: duckdb.DuckDBPyConnection, path: str) -> None:
    """Create the missing tables and counters; refuse a file of another schema version."""
    con.execute("BEGIN TRANSACTION")
    try:
        for name, columns in TABLES.items():
            con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
        con.execute(
            """
            INSERT INTO _id_counters
            SELECT name, 1 FROM unnest(?::VARCHAR[]) AS t(name)
            WHERE name NOT IN (SELECT name FROM _id_counters)
            """,
            [list(ID_COUNTERS)],
        )
        rows = con.execute("SELECT value FROM _engine_meta WHERE key = 'schema_version'").fetchall()
        if not rows:
            con.execute("INSERT INTO _engine_meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        elif rows[0][0] != str(SCHEMA_VERSION):
            raise TerminalTargetError(
                f"{path} has engine schema version {rows[0][0]}, this loader knows version "
                f"{SCHEMA_VERSION}: open it with the loader version that created it"
            )
        _build_record_keys(con)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _build_record_keys(con: duckdb.DuckDBPyConnection) -> None:
    """Rebuild `_record_keys` when it does not hold one key per record with an external_id.

    That is a file written before the table existed, or records a user (or an older loader)
    inserted or deleted with another DuckDB client; a key missing would let a conflict through.
    Counting both costs milliseconds on millions of records.
    """
    [(records, keys)] = con.execute(
        "SELECT (SELECT count(external_id) FROM records), (SELECT count(*) FROM _record_keys)"
    ).fetchall()
    if records == keys:
        return
    key = RECORD_KEY_SQL.format(environment="environment", data_stream_key="data_stream_key",
                                external_id="external_id")
    con.execute("DELETE FROM _record_keys")
    con.execute(f"INSERT INTO _record_keys SELECT {key}, id FROM records WHERE external_id IS NOT NULL")


def allocate_ids(con: duckdb.DuckDBPyConnection, table: str, count: int) -> int:
    """Reserve `count` consecutive ids of `table` in the current transaction; the first one."""
    [(next_free,)] = con.execute(
        "UPDATE _id_counters SET next_id = next_id + ? WHERE name = ? RETURNING next_id",
        [count, table],
    ).fetchall()
    return int(next_free) - count
