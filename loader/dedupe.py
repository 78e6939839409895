"""Know each row by a key, and drop rows repeated within the source.

A row with an `external_id` is known by `(data_stream_key, external_id)`. A row
without one is known by its content (stream, date, amount, currency, direction,
description, metadata) plus its occurrence number among identical rows of the
same source, so running the same file twice loads each of two identical rows
once, and a third identical row added later is new.

Keys are 128-bit md5 hashes (hashing.py), kept as two unsigned 64-bit halves
(`key_hi`, `key_lo`), and hash in the target environment's key, so the cache of
one environment never answers for another.

Duplicates across batches are found through a scratch DuckDB database that
lives for one run: its tables start in memory and move to a file of a
temporary folder once they hold more keys than fit well in its 64 MB, so
memory stays bounded however long the source is. The folder is removed when
the run ends; one left by a killed run is removed by the next run on the same
host that uses the same state folder.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from .hashing import md5_halves, short_tag
from .source import SOURCE_FILE, SOURCE_ROW
from .views import registered, sql_text

KEY = ["key_hi", "key_lo"]
CONTENT = ["content_hi", "content_lo"]
_SEP, _NULL = "\x1f", "\x1e"
_SCRATCH_MEMORY = "64MB"
# Rows the scratch tables hold in memory (24 bytes each) before they move to a file. In memory
# an insert costs a third of one into a file; past the memory cap, though, DuckDB writes the
# evicted blocks of in-memory tables to temporary files and reads them back for every lookup:
# 0.26 s a batch with 10M keys, against 0.07 s from a file, whose evicted blocks are only read.
MOVE_TO_FILE_ROWS = 1_500_000


def id_key_text(target_key: str) -> pl.Expr:
    """The text whose md5 is the key of a row with an external_id (null without one).

    It hashes in the target environment, so one environment's cache never answers for another.
    """
    return pl.concat_str(
        [pl.lit(short_tag(target_key)), pl.lit("id"), pl.col("data_stream_key"), pl.col("external_id")],
        separator=_SEP,
    )


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

    unique: pl.DataFrame  # rows to go on, with key_hi/key_lo (and content_hi/content_lo when id-less)
    duplicates: pl.DataFrame  # repeated rows, with `reason` naming the first occurrence


class SourceDeduper:
    """Remembers the keys seen so far in one run's source."""

    def __init__(self, target_key: str, *, scratch_dir: Path | None = None):
        self.target_key = target_key
        self.target_tag = short_tag(target_key)  # keeps the hashed texts short
        self._files: list[str] = []
        self._file_numbers: dict[str, int] = {}
        self._spill = tempfile.mkdtemp(prefix=f"{_host_prefix()}{os.getpid()}-", dir=scratch_dir)
        sweep_spill_folders(Path(self._spill).parent)
        self.con = duckdb.connect(":memory:", config={"memory_limit": _SCRATCH_MEMORY,
                                                      "temp_directory": self._spill})
        self._catalog = "memory"  # where the tables are: DuckDB's in-memory catalog, later "scratch" (a file)
        self._rows_held = 0
        self.con.execute(
            "create table seen_ids (key_hi ubigint, key_lo ubigint, file_number integer, source_row bigint);"
            "create table content_counts (content_hi ubigint, content_lo ubigint, n bigint);"
        )

    @property
    def in_file(self) -> bool:
        """Whether the scratch tables have moved from memory to a file of the scratch folder."""
        return self._catalog != "memory"

    def split(self, valid: pl.DataFrame) -> Deduplicated:
        """Key the batch, and split off rows whose key an earlier row already had."""
        keyed = self._keyed(valid)
        has_id = pl.col("external_id").is_not_null()
        earlier = self._seen(keyed.filter(has_id).select(KEY))
        # Id-less keys are unique by construction (occurrence numbers), so this only catches ids.
        is_duplicate = keyed.select(~pl.struct(KEY).is_first_distinct()).to_series()
        if earlier.height:
            is_duplicate = is_duplicate | _key_in(keyed, earlier)
        unique = keyed.filter(~is_duplicate)
        firsts = unique.select(*KEY, SOURCE_FILE, SOURCE_ROW, "external_id").filter(has_id).drop("external_id")
        self._remember(firsts)
        duplicates = keyed.filter(is_duplicate)
        if duplicates.height:
            # Name the first occurrence: from an earlier batch, else from this one (of this
            # batch's firsts, only those sharing a duplicate's key_hi are joined).
            firsts_here = firsts.filter(pl.col("key_hi").is_in(duplicates.get_column("key_hi").implode()))
            duplicates = duplicates.join(
                pl.concat([earlier, firsts_here]).rename({SOURCE_FILE: "_first_file", SOURCE_ROW: "_first_row"}),
                on=KEY, how="left", maintain_order="left",
            ).with_columns(
                pl.format("same data_stream_key and external_id as {} row {}", pl.col("_first_file"),
                          pl.col("_first_row")).alias("reason")
            ).drop("_first_file", "_first_row")
        else:
            duplicates = duplicates.with_columns(pl.lit(None, dtype=pl.String).alias("reason"))
        return Deduplicated(unique=unique, duplicates=duplicates)

    # -- keys -----------------------------------------------------------------
    def _keyed(self, valid: pl.DataFrame) -> pl.DataFrame:
        """Add key_hi/key_lo; id-less rows also get content_hi/content_lo (their key needs it)."""
        has_id = pl.col("external_id").is_not_null()
        keys = md5_halves(valid.select(pl.when(has_id).then(id_key_text(self.target_key))).to_series(), names=KEY)
        keyed = pl.concat([valid, keys], how="horizontal").with_columns(
            pl.lit(None, dtype=pl.UInt64).alias(CONTENT[0]), pl.lit(None, dtype=pl.UInt64).alias(CONTENT[1])
        )
        positions = keyed.select(pl.arg_where(~has_id)).to_series()
        if positions.len() == 0:
            return keyed
        idless = keyed[positions]
        contents = md5_halves(idless.select(content_text()).to_series(), names=CONTENT)
        prior = self._prior_counts(contents.unique())
        occurrences = (
            contents.with_row_index("_pos")
            .join(prior, on=CONTENT, how="left", maintain_order="left")
            .with_columns(
                (pl.int_range(pl.len()).over(CONTENT) + 1 + pl.col("n").fill_null(0)).alias("occurrence")
            )
            .sort("_pos")
        )
        self._count(contents.group_by(CONTENT).len("n"))
        fp_text = pl.concat_str(
            [pl.lit(self.target_tag), pl.lit("fp"), *[pl.col(c).cast(pl.String) for c in (*CONTENT, "occurrence")]],
            separator=_SEP,
        )
        idless_keys = md5_halves(occurrences.select(fp_text).to_series(), names=KEY)
        return keyed.with_columns(
            *[keyed[name].scatter(positions, idless_keys[name]) for name in KEY],
            *[keyed[name].scatter(positions, contents[name]) for name in CONTENT],
        )

    def _prior_counts(self, contents: pl.DataFrame) -> pl.DataFrame:
        with registered(self.con, "_contents", contents.to_arrow()):
            return self.con.sql(
                f"select c.content_hi, c.content_lo, sum(c.n)::bigint as n from {self._catalog}.content_counts c "
                "semi join _contents k using (content_hi, content_lo) group by all"
            ).pl()

    def _count(self, counts: pl.DataFrame) -> None:
        with registered(self.con, "_counts", counts.to_arrow()):
            self.con.execute(
                f"insert into {self._catalog}.content_counts select content_hi, content_lo, n from _counts"
            )
        self._held(counts.height)

    # -- ids seen in earlier batches -------------------------------------------
    def _seen(self, keys: pl.DataFrame) -> pl.DataFrame:
        with registered(self.con, "_keys", keys.to_arrow()):
            # As in Cache.loaded_mask: a join on key_hi alone first, then the whole key.
            seen = self.con.sql(
                "with candidates as materialized ("
                "  select key_hi, key_lo, file_number, source_row "
                f"  from {self._catalog}.seen_ids semi join _keys using (key_hi)) "
                "select c.key_hi, c.key_lo, c.file_number, c.source_row from candidates c "
                "semi join _keys k using (key_hi, key_lo)"
            ).pl()
        if seen.height == 0:
            return pl.DataFrame(schema={"key_hi": pl.UInt64, "key_lo": pl.UInt64, SOURCE_FILE: pl.String,
                                        SOURCE_ROW: pl.Int64})
        return seen.select(
            *KEY,
            pl.col("file_number").replace_strict(dict(enumerate(self._files)), return_dtype=pl.String)
            .alias(SOURCE_FILE),
            pl.col(SOURCE_ROW),
        )

    def _remember(self, firsts: pl.DataFrame) -> None:
        # Files are stored as numbers: a path repeated on every row would cost more than the key.
        for name in firsts.get_column(SOURCE_FILE).unique().to_list():
            if name not in self._file_numbers:
                self._file_numbers[name] = len(self._files)
                self._files.append(name)
        numbered = firsts.select(
            *KEY, pl.col(SOURCE_FILE).replace_strict(self._file_numbers, return_dtype=pl.Int32).alias("file_number"),
            pl.col(SOURCE_ROW),
        )
        with registered(self.con, "_firsts", numbered.to_arrow()):
            self.con.execute(
                f"insert into {self._catalog}.seen_ids select key_hi, key_lo, file_number, {SOURCE_ROW} from _firsts"
            )
        self._held(numbered.height)

    def _held(self, rows: int) -> None:
        self._rows_held += rows
        if self._rows_held > MOVE_TO_FILE_ROWS and not self.in_file:
            self._move_to_file()

    def _move_to_file(self) -> None:
        path = Path(self._spill) / "scratch.duckdb"
        self.con.execute(f"attach '{sql_text(str(path))}' as scratch")
        # One statement each: a DuckDB transaction writes to one database only. A failure
        # half-way fails the run, which then removes the whole folder.
        for table in ("seen_ids", "content_counts"):
            self.con.execute(f"create table scratch.{table} as select * from memory.{table}")
            self.con.execute(f"drop table memory.{table}")
        self._catalog = "scratch"

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self._spill, ignore_errors=True)


def _key_in(frame: pl.DataFrame, keys: pl.DataFrame) -> pl.Series:
    """Whether each row's key (KEY) is among `keys`. Only the few rows whose key_hi matches are
    compared on the whole key: hashing every row's two halves cost more than the rest of a lookup."""
    candidates = frame.select(pl.arg_where(pl.col("key_hi").is_in(keys.get_column("key_hi").implode()))).to_series()
    found = frame[candidates].select(pl.struct(KEY).is_in(keys.select(pl.struct(KEY)).to_series().implode())).to_series()
    return pl.repeat(False, frame.height, dtype=pl.Boolean, eager=True).scatter(candidates, found)


def _host_prefix() -> str:
    # A scratch folder is named for its host, then its process (`<this>-<pid>-<random>`): a folder
    # whose process is gone can be told from one in use, also when several machines share the folder.
    return f"loader-run-{socket.gethostname()}-"


def sweep_spill_folders(folder: Path) -> None:
    """Remove the scratch folders that runs on this host left when they were killed.

    A folder is removed only when its process is gone; folders of other hosts, of live
    processes and of older versions (no process in the name) are left alone.
    """
    pattern = re.compile(re.escape(_host_prefix()) + r"(\d+)-.+")
    for path in folder.glob("loader-run-*"):
        match = pattern.fullmatch(path.name)
        if match is not None and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
