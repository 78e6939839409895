"""The run journal: chunks sent but not yet confirmed (tables `journal_chunks`, `journal_rows`).

Before a chunk is sent, its Idempotency-Key and its rows (every field of the
body, and each row's cache key) are recorded durably in the state file. When
the target's answer for it is recorded in the cache, the chunk leaves the
journal in the same transaction. What is left after a crash is exactly what may
or may not have reached the target; the next run sends those chunks again,
unchanged and under the same keys, before it reads the source, so the target
returns what it already has (or creates it once), and the cache learns which
rows are in. This holds even if the source changed meanwhile, and for rows
without `external_id`, which the target cannot deduplicate.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import polars as pl

from .chunk import Chunk

SCHEMA = """
create table if not exists journal_chunks (
    idempotency_key varchar not null,
    target_key varchar not null,
    run_id varchar not null,
    on_conflict varchar not null,
    rows integer not null,
    recorded_at timestamptz default current_timestamp
);
create table if not exists journal_rows (
    idempotency_key varchar not null,
    "index" integer not null,
    key_hi ubigint, key_lo ubigint,
    date date, data_stream_key varchar, amount bigint, currency varchar, direction varchar,
    description varchar, external_id varchar, metadata varchar
);
"""
ROW_FIELDS = ("key_hi", "key_lo", "date", "data_stream_key", "amount", "currency", "direction", "description",
              "external_id", "metadata")


class Journal:
    """The journal tables of one state database; the caller owns transactions."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        con.execute(SCHEMA)

    def record_sending(self, *, target_key: str, run_id: str, on_conflict: str, chunks: Sequence[Chunk],
                       rows: pl.DataFrame) -> None:
        """Record the chunks about to be sent; `rows` carry `chunk` and `index`. Committed on return."""
        keys = pl.DataFrame(
            {"chunk": [c.number for c in chunks], "idempotency_key": [c.idempotency_key for c in chunks],
             "rows": [len(c) for c in chunks]},
            schema={"chunk": pl.Int64, "idempotency_key": pl.String, "rows": pl.Int32},
        )
        journal_rows = rows.join(keys.select("chunk", "idempotency_key"), on="chunk").select(
            "idempotency_key", pl.col("index").cast(pl.Int32), *ROW_FIELDS
        )
        self.con.register("_journal_chunks", keys.to_arrow())
        self.con.register("_journal_rows", journal_rows.to_arrow())
        try:
            self.con.execute("begin")
            self.con.execute(
                "insert into journal_chunks (idempotency_key, target_key, run_id, on_conflict, rows) "
                "select idempotency_key, ?, ?, ?, rows from _journal_chunks",
                [target_key, run_id, on_conflict],
            )
            self.con.execute(f"insert into journal_rows select idempotency_key, \"index\", "
                             f"{', '.join(ROW_FIELDS)} from _journal_rows")
            self.con.execute("commit")
        finally:
            self.con.unregister("_journal_chunks")
            self.con.unregister("_journal_rows")

    def confirm(self, idempotency_keys: Sequence[str]) -> None:
        """Drop answered chunks; call inside the transaction that records their rows in the cache."""
        if not idempotency_keys:
            return
        keys = pl.DataFrame({"idempotency_key": list(idempotency_keys)}).to_arrow()
        self.con.register("_answered", keys)
        try:
            self.con.execute("delete from journal_rows where idempotency_key in "
                             "(select idempotency_key from _answered)")
            self.con.execute("delete from journal_chunks where idempotency_key in "
                             "(select idempotency_key from _answered)")
        finally:
            self.con.unregister("_answered")

    def unanswered(self, target_key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(chunks, rows) sent to this target by earlier runs and never answered, in the order they were sent."""
        chunks = self.con.sql(
            "select idempotency_key, any_value(on_conflict) as on_conflict, min(recorded_at) as recorded_at "
            "from journal_chunks where target_key = $target group by idempotency_key order by recorded_at",
            params={"target": target_key},
        ).pl()
        rows = self.con.sql(
            "select * from journal_rows where idempotency_key in "
            "(select idempotency_key from journal_chunks where target_key = $target) "
            "order by idempotency_key, \"index\"",
            params={"target": target_key},
        ).pl()
        return chunks, rows.unique(["idempotency_key", "index"], keep="first", maintain_order=True)
