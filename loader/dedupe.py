"""Know each row by a key, and drop rows repeated within the source.

A row with an `external_id` is known by `(data_stream_key, external_id)`. A row
without one is known by its content fingerprint (md5 of stream, date, amount,
currency, direction, description and metadata) plus its occurrence number among
identical rows of the same source, so running the same file twice loads each
of two identical rows once, and a third identical row added later is new.

`key_hi`/`key_lo` (the two halves of the 128-bit key hash the cache uses) also
hash in the target environment's key.
`row_hash` digests the row's whole content; chunk.py builds Idempotency-Keys
from it. Duplicates across batches are found through a scratch DuckDB file
that lives for one run, so memory stays bounded however long the source is.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

_KEYED = """
with numbered as (
    select *, row_number() over () - 1 as _i,
        md5(concat_ws(chr(31), data_stream_key, strftime(date, '%Y-%m-%d'), amount::varchar, currency,
                      coalesce(direction, chr(30)), coalesce(description, chr(30)), metadata)) as fingerprint
    from _batch
),
occurrences as (
    select n._i, row_number() over (partition by n.fingerprint order by n._i) + coalesce(prior.n, 0) as occurrence
    from numbered n
    left join (select fingerprint, sum(n) as n from fingerprint_counts group by fingerprint) prior
        using (fingerprint)
    where n.external_id is null
)
select * exclude (row_key),
    md5_number_upper(row_key) as key_hi, md5_number_lower(row_key) as key_lo
from (
    select numbered.*, occurrences.occurrence,
        $target_key || chr(31) || case when external_id is not null
            then 'id' || chr(31) || data_stream_key || chr(31) || external_id
            else 'fp' || chr(31) || fingerprint || chr(31) || occurrence::varchar end as row_key,
        md5(fingerprint || chr(31) || coalesce(external_id, chr(30))) as row_hash
    from numbered left join occurrences using (_i)
)
order by _i
"""

_DUPLICATES = """
select k._i,
    coalesce(s.source_file, first_value(k.source_file) over w) as first_file,
    coalesce(s.source_row, first_value(k.source_row) over w) as first_row,
    s.key_hi is not null or row_number() over w > 1 as is_duplicate
from _keyed k left join seen_ids s using (key_hi, key_lo)
where k.external_id is not null
window w as (partition by k.key_hi, k.key_lo order by k._i)
"""


@dataclass
class Deduplicated:
    """One batch after within-source dedupe."""

    unique: pl.DataFrame  # rows to go on, with key_hi/key_lo, row_hash and fingerprint
    duplicates: pl.DataFrame  # repeated rows, with `reason` naming the first occurrence


class SourceDeduper:
    """Remembers the keys seen so far in one run's source."""

    def __init__(self, target_key: str, *, scratch_dir: Path | None = None):
        self.target_key = target_key
        fd, self._path = tempfile.mkstemp(suffix=".duckdb", prefix="loader-run-", dir=scratch_dir)
        os.close(fd)
        os.unlink(self._path)  # DuckDB wants to create the file itself
        self.con = duckdb.connect(self._path)
        self.con.execute(
            "create table seen_ids (key_hi ubigint, key_lo ubigint, source_file varchar, source_row bigint);"
            "create table fingerprint_counts (fingerprint varchar, n bigint);"
        )

    def split(self, valid: pl.DataFrame) -> Deduplicated:
        """Key the batch, and split off rows whose key an earlier row already had."""
        con = self.con
        con.register("_batch", valid.to_arrow())
        keyed = con.sql(_KEYED, params={"target_key": self.target_key}).pl()
        con.unregister("_batch")
        assert isinstance(keyed, pl.DataFrame)
        con.register("_keyed", keyed.to_arrow())
        dupes = con.sql(_DUPLICATES).pl()
        assert isinstance(dupes, pl.DataFrame)
        duplicate_rows = dupes.filter(pl.col("is_duplicate"))
        first_rows = dupes.filter(~pl.col("is_duplicate")).select("_i")
        con.register("_first", first_rows.to_arrow())
        con.execute(
            "insert into seen_ids select k.key_hi, k.key_lo, k.source_file, k.source_row "
            "from _keyed k semi join _first f using (_i)"
        )
        con.execute(
            "insert into fingerprint_counts select fingerprint, count(*) from _keyed "
            "where external_id is null group by fingerprint"
        )
        con.unregister("_first")
        con.unregister("_keyed")
        duplicates = keyed.join(duplicate_rows, on="_i", how="inner").with_columns(
            pl.format(
                "same data_stream_key and external_id as {} row {}", pl.col("first_file"), pl.col("first_row")
            ).alias("reason")
        )
        unique = keyed.join(duplicate_rows.select("_i"), on="_i", how="anti")
        return Deduplicated(
            unique=unique.drop("_i", "occurrence"),
            duplicates=duplicates.drop("_i", "occurrence", "first_file", "first_row", "is_duplicate"),
        )

    def close(self) -> None:
        self.con.close()
        for suffix in ("", ".wal"):
            try:
                os.unlink(self._path + suffix)
            except FileNotFoundError:
                pass
