"""Know each row by a key, and drop rows repeated within the source.

A row with an `external_id` is known by `(data_stream_key, external_id)`. A row
without one is known by its content (stream, date, amount, currency, direction,
description, metadata) plus its occurrence number among identical rows of the
same source, so running the same file twice loads each of two identical rows
once, and a third identical row added later is new.

Keys are 128-bit md5 hashes, kept as two unsigned 64-bit halves (`key_hi`,
`key_lo`), and hash in the target environment's key, so the cache of one
environment never answers for another. md5 comes from DuckDB: unlike Polars'
own hash it is the same in every version, and the cache outlives upgrades.
`content_hi`/`content_lo` digest the whole row; chunk.py builds each
Idempotency-Key from them.

Duplicates across batches are found through a scratch DuckDB file that lives
for one run, so memory stays bounded however long the source is.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from .source import SOURCE_FILE, SOURCE_ROW

KEY = ["key_hi", "key_lo"]
CONTENT = ["content_hi", "content_lo"]
_SEP, _NULL = "\x1f", "\x1e"
_HALVES = "(({h}) >> 64)::ubigint as {name}_hi, (({h}) & 18446744073709551615::uhugeint)::ubigint as {name}_lo"

# One pass over the batch, projections only, so DuckDB keeps the rows in order.
_HASHES = f"""
select {_HALVES.format(h="md5_number(content)", name="content")},
    case when external_id is not null then md5_number($target || chr(31) || 'id' || chr(31) || data_stream_key
        || chr(31) || external_id) end as _key
from _batch
"""
_HASHES = f"select content_hi, content_lo, {_HALVES.format(h='_key', name='key')} from ({_HASHES})"

_IDLESS_KEYS = f"""
select {_HALVES.format(
    h="md5_number($target || chr(31) || 'fp' || chr(31) || content_hi::varchar || chr(31) || content_lo::varchar"
      " || chr(31) || occurrence::varchar)",
    name="key")}
from _idless
"""


def content_text() -> pl.Expr:
    """Every field of the record that the target stores, as one text (nulls marked)."""
    return pl.concat_str(
        [
            pl.col("data_stream_key"),
            pl.col("date").dt.strftime("%Y-%m-%d"),
            pl.col("amount").cast(pl.String),
            pl.col("currency"),
            pl.col("direction").fill_null(_NULL),
            pl.col("description").fill_null(_NULL),
            pl.col("metadata"),
            pl.col("external_id").fill_null(_NULL),
        ],
        separator=_SEP,
    )


@dataclass
class Deduplicated:
    """One batch after within-source dedupe."""

    unique: pl.DataFrame  # rows to go on, with key_hi/key_lo and content_hi/content_lo
    duplicates: pl.DataFrame  # repeated rows, with `reason` naming the first occurrence


class SourceDeduper:
    """Remembers the keys seen so far in one run's source."""

    def __init__(self, target_key: str, *, scratch_dir: Path | None = None):
        self.target_key = target_key
        fd, self._path = tempfile.mkstemp(suffix=".duckdb", prefix="loader-run-", dir=scratch_dir)
        os.close(fd)
        os.unlink(self._path)  # DuckDB wants to create the file itself
        self.con = duckdb.connect(self._path, config={"memory_limit": "512MB"})
        self.con.execute(
            "create table seen_ids (key_hi ubigint, key_lo ubigint, source_file varchar, source_row bigint);"
            "create table content_counts (content_hi ubigint, content_lo ubigint, n bigint);"
        )

    def split(self, valid: pl.DataFrame) -> Deduplicated:
        """Key the batch, and split off rows whose key an earlier row already had."""
        keyed = self._keyed(valid)
        has_id = pl.col("external_id").is_not_null()
        earlier = self._seen(keyed.filter(has_id).select(KEY).unique())
        marked = keyed.join(
            earlier.rename({SOURCE_FILE: "_seen_file", SOURCE_ROW: "_seen_row"}), on=KEY, how="left",
            maintain_order="left",
        ).with_columns(
            # Id-less keys are unique by construction (occurrence numbers), so this only catches ids.
            (pl.col("_seen_file").is_not_null() | ~pl.struct(KEY).is_first_distinct()).alias("_duplicate"),
            pl.coalesce("_seen_file", pl.col(SOURCE_FILE).first().over(KEY)).alias("_first_file"),
            pl.coalesce("_seen_row", pl.col(SOURCE_ROW).first().over(KEY)).alias("_first_row"),
        )
        self._remember(marked.filter(has_id & ~pl.col("_duplicate")).select(*KEY, SOURCE_FILE, SOURCE_ROW))
        duplicates = marked.filter(pl.col("_duplicate")).with_columns(
            pl.format("same data_stream_key and external_id as {} row {}", pl.col("_first_file"),
                      pl.col("_first_row")).alias("reason")
        )
        helpers = ["_seen_file", "_seen_row", "_duplicate", "_first_file", "_first_row"]
        return Deduplicated(
            unique=marked.filter(~pl.col("_duplicate")).drop(helpers),
            duplicates=duplicates.drop(helpers),
        )

    # -- keys -----------------------------------------------------------------
    def _keyed(self, valid: pl.DataFrame) -> pl.DataFrame:
        batch = valid.select("data_stream_key", "external_id", content_text().alias("content"))
        hashes = self._query(_HASHES, _batch=batch)
        keyed = pl.concat([valid, hashes], how="horizontal")
        idless = keyed.filter(pl.col("external_id").is_null())
        if idless.height == 0:
            return keyed
        prior = self._prior_counts(idless.select(CONTENT).unique())
        occurrences = (
            idless.select(*CONTENT)
            .with_row_index("_pos")
            .join(prior, on=CONTENT, how="left", maintain_order="left")
            .with_columns(
                (pl.int_range(pl.len()).over(CONTENT) + 1 + pl.col("n").fill_null(0)).alias("occurrence")
            )
            .sort("_pos")
        )
        self._count(idless.group_by(CONTENT).len("n"))
        idless_keys = self._query(_IDLESS_KEYS, _idless=occurrences.select(*CONTENT, "occurrence"))
        positions = keyed.select(pl.arg_where(pl.col("external_id").is_null())).to_series()
        return keyed.with_columns(
            keyed["key_hi"].scatter(positions, idless_keys["key_hi"]),
            keyed["key_lo"].scatter(positions, idless_keys["key_lo"]),
        )

    def _query(self, sql: str, **tables: pl.DataFrame) -> pl.DataFrame:
        for name, frame in tables.items():
            self.con.register(name, frame.to_arrow())
        try:
            return self.con.sql(sql, params={"target": self.target_key}).pl()
        finally:
            for name in tables:
                self.con.unregister(name)

    def _prior_counts(self, contents: pl.DataFrame) -> pl.DataFrame:
        self.con.register("_contents", contents.to_arrow())
        try:
            return self.con.sql(
                "select c.content_hi, c.content_lo, sum(c.n)::bigint as n from content_counts c "
                "semi join _contents k using (content_hi, content_lo) group by all"
            ).pl()
        finally:
            self.con.unregister("_contents")

    def _count(self, counts: pl.DataFrame) -> None:
        self.con.register("_counts", counts.to_arrow())
        self.con.execute("insert into content_counts select content_hi, content_lo, n from _counts")
        self.con.unregister("_counts")

    # -- ids seen in earlier batches -------------------------------------------
    def _seen(self, keys: pl.DataFrame) -> pl.DataFrame:
        self.con.register("_keys", keys.to_arrow())
        try:
            return self.con.sql(
                "select s.key_hi, s.key_lo, s.source_file, s.source_row from seen_ids s "
                "semi join _keys k using (key_hi, key_lo)"
            ).pl()
        finally:
            self.con.unregister("_keys")

    def _remember(self, firsts: pl.DataFrame) -> None:
        self.con.register("_firsts", firsts.to_arrow())
        self.con.execute(f"insert into seen_ids select key_hi, key_lo, {SOURCE_FILE}, {SOURCE_ROW} from _firsts")
        self.con.unregister("_firsts")

    def close(self) -> None:
        self.con.close()
        for suffix in ("", ".wal"):
            try:
                os.unlink(self._path + suffix)
            except FileNotFoundError:
                pass
