"""The run journal: chunks sent but not yet confirmed.

Before a batch's chunks are sent, their rows (every field of the body, and
each row's cache key) are written to one Arrow IPC file in the journal folder
next to the state file (`<dedupe.cache>.journal/`), flushed to disk, and only
then is each chunk's Idempotency-Key recorded in the table `journal_chunks`
with the name of that file. When the target's answer for a chunk is recorded
in the cache, the chunk leaves `journal_chunks` in the same transaction; a
file no chunk names any more is deleted afterwards.

What is left after a crash is exactly what may or may not have reached the
target; the next run sends those chunks again, unchanged and under the same
keys, before it reads the source, so the target returns what it already has
(or creates it once), and the cache learns which rows are in. This holds even
if the source changed meanwhile, and for rows without `external_id`, which the
target cannot deduplicate. A file without a `journal_chunks` row (a crash
between the two writes) names chunks that were never sent: it is deleted.

The rows go to a file rather than a table because writing a compressed IPC
file costs about a third of inserting the same rows into DuckDB, and the
rows are read back only after a crash.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import duckdb
import polars as pl

from .chunk import Chunk
from .views import registered

SCHEMA = """
create table if not exists journal_chunks (
    idempotency_key varchar not null,
    target_key varchar not null,
    run_id varchar not null,
    on_conflict varchar not null,
    rows integer not null,
    recorded_at timestamptz default current_timestamp,
    rows_file varchar
);
alter table journal_chunks add column if not exists rows_file varchar;
"""
# A row file's columns: the chunk and position of each row, its cache key, and the body's fields.
ROW_SCHEMA = {"idempotency_key": pl.String, "index": pl.Int32, "key_hi": pl.UInt64, "key_lo": pl.UInt64,
              "date": pl.Date, "data_stream_key": pl.String, "amount": pl.Int64, "currency": pl.String,
              "direction": pl.String, "description": pl.String, "external_id": pl.String, "metadata": pl.String}
ROW_FIELDS = tuple(name for name in ROW_SCHEMA if name not in ("idempotency_key", "index"))
_PARTIAL = ".partial"


def journal_folder(state_path: Path) -> Path:
    """Where the journal of the state file at `state_path` keeps its row files."""
    return state_path.with_name(state_path.name + ".journal")


class Journal:
    """The journal of one state database; the caller owns transactions, except `record_sending`'s."""

    def __init__(self, con: duckdb.DuckDBPyConnection, folder: Path):
        self.con = con
        self.folder = folder
        con.execute(SCHEMA)
        self._adopt_journal_rows_table()

    def record_sending(self, *, target_key: str, run_id: str, on_conflict: str, chunks: Sequence[Chunk],
                       rows: pl.DataFrame) -> None:
        """Record the chunks about to be sent; `rows` carry `chunk` and `index`. Durable on return."""
        keys = pl.DataFrame(
            {"chunk": [c.number for c in chunks], "idempotency_key": [c.idempotency_key for c in chunks],
             "rows": [len(c) for c in chunks]},
            schema={"chunk": pl.Int64, "idempotency_key": pl.String, "rows": pl.Int32},
        )
        journal_rows = rows.join(keys.select("chunk", "idempotency_key"), on="chunk").select(
            "idempotency_key", pl.col("index").cast(pl.Int32), *ROW_FIELDS
        )
        name = f"{run_id}-{chunks[0].number:09d}.arrow"
        self._write_durably(journal_rows, name)
        with registered(self.con, "_journal_chunks", keys.to_arrow()):
            self.con.execute(
                "insert into journal_chunks (idempotency_key, target_key, run_id, on_conflict, rows, rows_file) "
                "select idempotency_key, ?, ?, ?, rows, ? from _journal_chunks",
                [target_key, run_id, on_conflict, name],
            )

    def confirm(self, idempotency_keys: Sequence[str]) -> list[str]:
        """Drop answered chunks; call inside the transaction that records their rows in the cache,
        then pass what it returns (their row files) to `forget` once that is committed."""
        if not idempotency_keys:
            return []
        keys = pl.DataFrame({"idempotency_key": list(idempotency_keys)}).to_arrow()
        with registered(self.con, "_answered", keys):
            files = [row[0] for row in self.con.execute(
                "select distinct rows_file from journal_chunks where rows_file is not null "
                "and idempotency_key in (select idempotency_key from _answered)").fetchall()]
            self.con.execute("delete from journal_chunks where idempotency_key in "
                             "(select idempotency_key from _answered)")
        return files

    def forget(self, files: Sequence[str]) -> None:
        """Delete those of these row files that no chunk of the journal names any more."""
        if not files:
            return
        named = {row[0] for row in self.con.execute(
            "select distinct rows_file from journal_chunks where list_contains(?::varchar[], rows_file)",
            [list(files)]).fetchall()}
        for name in set(files) - named:
            (self.folder / name).unlink(missing_ok=True)

    def sweep(self) -> None:
        """Delete every file of the folder that no chunk of the journal names: leftovers of a crash
        between writing a file and recording its chunks. Only while nothing else writes the journal."""
        if not self.folder.is_dir():
            return
        named = {row[0] for row in self.con.execute(
            "select distinct rows_file from journal_chunks where rows_file is not null").fetchall()}
        for path in self.folder.iterdir():
            if path.name not in named:
                path.unlink(missing_ok=True)

    def unanswered(self, target_key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(chunks, rows) sent to this target by earlier runs and never answered, in the order they were sent."""
        chunks = self.con.sql(
            "select idempotency_key, any_value(on_conflict) as on_conflict, min(recorded_at) as recorded_at, "
            "list(distinct rows_file) as rows_files "
            "from journal_chunks where target_key = $target group by idempotency_key order by recorded_at",
            params={"target": target_key},
        ).pl()
        files = sorted({f for names in chunks.get_column("rows_files").to_list() for f in names if f})
        parts = [pl.read_ipc(self.folder / f) for f in files if (self.folder / f).exists()]
        rows = pl.concat(parts) if parts else pl.DataFrame(schema=ROW_SCHEMA)
        rows = rows.filter(pl.col("idempotency_key").is_in(chunks.get_column("idempotency_key").implode()))
        rows = rows.sort("idempotency_key", "index").unique(["idempotency_key", "index"], keep="first",
                                                            maintain_order=True)
        return chunks.drop("rows_files"), rows

    # -- files -----------------------------------------------------------------
    def _write_durably(self, rows: pl.DataFrame, name: str) -> None:
        """Write the file, flush it to disk, then give it its name: a named file is whole."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / (name + _PARTIAL)
        with open(partial, "wb") as handle:
            rows.write_ipc(handle, compression="lz4")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.folder / name)
        _fsync_folder(self.folder)

    def _adopt_journal_rows_table(self) -> None:
        """State files written by loader 0.1 kept the rows in a table `journal_rows`: move them to a file."""
        present = self.con.execute(
            "select count(*) from duckdb_tables() where table_name = 'journal_rows' and database_name = current_database()"
        ).fetchall()[0][0]
        if not present:
            return
        rows = self.con.sql("select * from journal_rows").pl()
        name = "journal_rows-table.arrow"
        if rows.height:
            self._write_durably(rows.select(list(ROW_SCHEMA)).cast(ROW_SCHEMA), name)
        self.con.execute("begin")
        self.con.execute("update journal_chunks set rows_file = ? where rows_file is null", [name])
        self.con.execute("drop table journal_rows")
        self.con.execute("commit")


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
