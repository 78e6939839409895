"""The cache of ids already loaded, per target environment (table `loaded_ids`).

A row is known by `key_hi`/`key_lo`: the two halves of the 128-bit md5 of the target environment's key
and the row's key (`data_stream_key` + `external_id`, or the content
fingerprint and occurrence number of a row without an id; see dedupe.py).
Hashing the environment in means a sandbox load never hides a row from
production, and the lookup joins on one fixed-width column however large the
cache grows.

Only what the target confirmed is recorded (`created` or `exists_in_target`).
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

SCHEMA = """
create table if not exists loaded_ids (
    key_hi ubigint not null,
    key_lo ubigint not null,
    target_key varchar not null,
    data_stream_key varchar,
    external_id varchar,
    record_id bigint,
    bulk_request_id bigint,
    run_id varchar,
    loaded_at timestamptz default current_timestamp
);
"""

CONFIRMED_COLUMNS = ("key_hi", "key_lo", "data_stream_key", "external_id", "record_id", "bulk_request_id")


class Cache:
    """The `loaded_ids` table of one state database."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        con.execute(SCHEMA)

    def find_loaded(self, keys: pa.Table) -> pa.Table:
        """Of `keys` (`key_hi`, `key_lo` columns), those already loaded, with their run and bulk request."""
        self.con.register("_keys", keys)
        try:
            return self.con.sql(
                """
                select c.key_hi, c.key_lo, any_value(c.run_id) as run_id,
                    any_value(c.bulk_request_id) as bulk_request_id
                from loaded_ids c join _keys k on c.key_hi = k.key_hi and c.key_lo = k.key_lo
                group by c.key_hi, c.key_lo
                """
            ).to_arrow_table()
        finally:
            self.con.unregister("_keys")

    def record_confirmed(self, target_key: str, run_id: str, rows: pa.Table) -> None:
        """Add confirmed rows (CONFIRMED_COLUMNS) to the cache, in the caller's transaction."""
        self.con.register("_confirmed", rows)
        self.con.execute(
            """
            insert into loaded_ids (key_hi, key_lo, target_key, data_stream_key, external_id,
                                    record_id, bulk_request_id, run_id)
            select key_hi, key_lo, ?, data_stream_key, external_id, record_id, bulk_request_id, ?
            from _confirmed
            """,
            [target_key, run_id],
        )
        self.con.unregister("_confirmed")

    def count(self, target_key: str | None = None) -> int:
        if target_key is None:
            return self.con.execute("select count(*) from loaded_ids").fetchone()[0]
        return self.con.execute("select count(*) from loaded_ids where target_key = ?", [target_key]).fetchone()[0]
