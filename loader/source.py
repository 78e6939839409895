"""Read the source in batches: files (csv, parquet, ndjson, json), a glob, or a DuckDB query.

Every batch is a Polars DataFrame with the source's own columns plus
`source_file` (the file's path, or `query` / `dataframe`) and `source_row`
(zero-based row within that file). Files are read lazily (Polars scans with
`collect_batches`), so the input never has to fit in memory at once; an
optional `transform.sql` runs in DuckDB over the streamed table `source`.

CSV columns are read as text: amounts stay exact decimal strings and a bad
value becomes a row failure later instead of a reader error now.
"""

from __future__ import annotations

import codecs
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from .errors import ConfigError, SourceError
from .views import sql_text

SOURCE_FILE = "source_file"
SOURCE_ROW = "source_row"
DEFAULT_BATCH_ROWS = 250_000
# Polars' streaming CSV reader cuts the file into chunks whose size grows with the file:
# on a 1 GB file its read-ahead held 200 MB more than on a 100 MB one. Chunks of 4 MiB keep
# the read-ahead the same for any file size and read about as fast (10M rows: 1.61 s, 1.50 s).
# Polars reads this variable when a scan starts; a value the user set wins.
CSV_CHUNK_BYTES_VARIABLE = "POLARS_CSV_CHUNK_SIZE"
CSV_CHUNK_BYTES = 4 << 20


@dataclass
class CsvOptions:
    separator: str = ","
    has_header: bool = True
    encoding: str = "utf8"
    quote_char: str | None = '"'
    skip_rows: int = 0
    null_values: list[str] = field(default_factory=list)


@dataclass
class SourceSpec:
    """What to read; built from `pipeline.source` and `pipeline.transform`."""

    files: list[Path] = field(default_factory=list)
    format: str | None = None
    csv: CsvOptions = field(default_factory=CsvOptions)
    query: str | None = None
    transform_sql: str | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    # The columns the mapping reads: the columns of a source whose files are all empty (0 bytes,
    # not even a header), so that such a source is 0 rows and not a missing-column config error.
    expected_columns: list[str] = field(default_factory=list)

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> "SourceSpec":
        src = pipeline.source
        csv = getattr(src, "csv", None)
        csv_options = CsvOptions(
            **{k: getattr(csv, k) for k in CsvOptions.__dataclass_fields__ if csv is not None and hasattr(csv, k)}
        )
        transform = getattr(pipeline, "transform", None)
        return cls(
            files=list(getattr(src, "files", None) or []),
            format=getattr(src, "format", None),
            csv=csv_options,
            query=getattr(src, "query", None),
            transform_sql=transform.sql if transform is not None else None,
            base_dir=Path(pipeline.base_dir),
            expected_columns=_mapped_columns(getattr(pipeline, "mapping", None)),
        )


class Source:
    """An opened source: its columns are known, its rows are read on demand."""

    def __init__(self, spec: SourceSpec, *, batch_rows: int = DEFAULT_BATCH_ROWS):
        self.spec = spec
        self.batch_rows = batch_rows
        self.file_rows: dict[str, int] = {}
        self._tmp_files: list[str] = []
        self._con = duckdb.connect()
        self._con.execute(f"SET file_search_path = '{sql_text(str(spec.base_dir))}'")
        self.columns = self._check()

    # -- planning ---------------------------------------------------------
    def _check(self) -> list[str]:
        """Find the output columns and prove the SQL binds, before anything is loaded."""
        if self.spec.query is not None:
            try:
                return [c for c in self._con.sql(self.spec.query).columns]
            except duckdb.Error as exc:
                raise ConfigError([("source.query", _duckdb_message(exc))]) from None
        if not self.spec.files:
            raise ConfigError([("source.path", "no file to read")])
        schema = self._source_schema()
        if self.spec.transform_sql is None:
            return list(schema.keys())
        empty = pl.DataFrame(schema=schema).to_arrow()
        self._con.register("source", empty)
        try:
            return list(self._con.sql(self.spec.transform_sql).columns)
        except duckdb.Error as exc:
            raise ConfigError([("transform.sql", _duckdb_message(exc))]) from None
        finally:
            self._con.unregister("source")

    def _source_schema(self) -> dict[str, pl.DataType]:
        """The schema of the first file that is not empty; all empty: the mapped columns, as text."""
        for path in self.spec.files:
            schema = self._file_schema(path)
            if schema is not None:
                return schema
        schema = {name: pl.String for name in self.spec.expected_columns}
        schema[SOURCE_ROW] = pl.Int64
        schema[SOURCE_FILE] = pl.String
        return schema

    def _file_schema(self, path: Path) -> dict[str, pl.DataType] | None:
        lf = self._scan(path)
        if lf is None:
            return None
        try:
            schema = dict(lf.collect_schema())
        except Exception as exc:  # polars raises many types for unreadable files
            raise SourceError(f"cannot read {path}: {self._read_problem(exc)}") from None
        schema[SOURCE_ROW] = pl.Int64
        schema[SOURCE_FILE] = pl.String
        return schema

    # -- reading ----------------------------------------------------------
    def batches(self) -> Iterator[pl.DataFrame]:
        """Yield batches of about `batch_rows` rows, in source order."""
        if self.spec.query is not None:
            yield from self._sql_batches(self.spec.query, synthetic_file="query")
            return
        if self.spec.transform_sql is None:
            yield from _rebatch(self._file_batches(), self.batch_rows)
            return
        yield from self._transformed_batches()

    def _file_batches(self) -> Iterator[pl.DataFrame]:
        for path in self.spec.files:
            name = str(path)
            self.file_rows.setdefault(name, 0)
            lf = self._scan(path)
            if lf is None:
                continue
            try:
                for batch in lf.collect_batches(chunk_size=min(self.batch_rows, 50_000)):
                    if batch.height == 0:
                        continue
                    self.file_rows[name] += batch.height
                    yield batch.with_columns(
                        pl.col(SOURCE_ROW).cast(pl.Int64), pl.lit(name, dtype=pl.String).alias(SOURCE_FILE)
                    )
            except pl.exceptions.PolarsError as exc:
                raise SourceError(
                    f"cannot read {path} after row {self.file_rows[name]}: {self._read_problem(exc)}"
                ) from None

    def _read_problem(self, exc: BaseException) -> str:
        """What went wrong reading a file, and what to change in pipeline.yaml."""
        text = _first_line(exc)
        if "utf-8" in text.lower() or "utf8" in text.lower():
            return (f"{text}: the file is not valid UTF-8 (source.csv.encoding: {self.spec.csv.encoding}); "
                    "set source.csv.encoding to latin1 if the file is Latin-1 / Windows-1252, or to "
                    "utf8-lossy to read it with the bad bytes replaced by U+FFFD")
        return f"{text}; check source.format and source.csv"

    def _transformed_batches(self) -> Iterator[pl.DataFrame]:
        stream = self._file_batches()
        first = next(stream, None)
        schema_frame = first if first is not None else pl.DataFrame(schema=self._source_schema())
        arrow_schema = schema_frame.to_arrow().schema

        def arrow_batches() -> Iterator[pa.RecordBatch]:
            for frame in ([first] if first is not None else []):
                yield from frame.to_arrow().cast(arrow_schema).to_batches()
            for frame in stream:
                yield from frame.to_arrow().cast(arrow_schema).to_batches()

        reader = pa.RecordBatchReader.from_batches(arrow_schema, arrow_batches())
        self._con.register("source", reader)
        try:
            yield from self._sql_batches(self.spec.transform_sql or "", synthetic_file="transform")
        finally:
            self._con.unregister("source")

    def _sql_batches(self, sql: str, *, synthetic_file: str) -> Iterator[pl.DataFrame]:
        try:
            result = self._con.sql(sql)
            reader = result.to_arrow_reader(self.batch_rows)
        except duckdb.Error as exc:
            key = "source.query" if synthetic_file == "query" else "transform.sql"
            raise ConfigError([(key, _duckdb_message(exc))]) from None
        ordinal = 0
        for record_batch in reader:
            frame = pl.from_arrow(record_batch)
            assert isinstance(frame, pl.DataFrame)
            if frame.height == 0:
                continue
            if SOURCE_ROW not in frame.columns or SOURCE_FILE not in frame.columns:
                # The SQL dropped the lineage columns: number its output rows instead.
                frame = frame.with_columns(
                    pl.int_range(ordinal, ordinal + frame.height, dtype=pl.Int64).alias(SOURCE_ROW),
                    pl.lit(synthetic_file, dtype=pl.String).alias(SOURCE_FILE),
                )
                self.file_rows[synthetic_file] = self.file_rows.get(synthetic_file, 0) + frame.height
            ordinal += frame.height
            yield frame.with_columns(pl.col(SOURCE_ROW).cast(pl.Int64), pl.col(SOURCE_FILE).cast(pl.String))

    def _scan(self, path: Path) -> pl.LazyFrame | None:
        """A lazy scan of one file with its row index; None for an empty file."""
        fmt = self.spec.format or _format_of(path)
        if fmt == "csv":
            if path.stat().st_size == 0:
                return None
            opts = self.spec.csv
            os.environ.setdefault(CSV_CHUNK_BYTES_VARIABLE, str(CSV_CHUNK_BYTES))
            source_path = self._utf8_copy(path) if opts.encoding not in ("utf8", "utf8-lossy") else str(path)
            return pl.scan_csv(
                source_path,
                separator=opts.separator,
                has_header=opts.has_header,
                quote_char=opts.quote_char,
                skip_rows=opts.skip_rows,
                null_values=list(opts.null_values) or None,
                encoding="utf8-lossy" if opts.encoding == "utf8-lossy" else "utf8",
                infer_schema=False,
                row_index_name=SOURCE_ROW,
                truncate_ragged_lines=True,
                raise_if_empty=False,
            )
        if fmt == "parquet":
            return pl.scan_parquet(path, row_index_name=SOURCE_ROW)
        if fmt == "ndjson":
            if path.stat().st_size == 0:
                return None
            return pl.scan_ndjson(path, row_index_name=SOURCE_ROW, infer_schema_length=10_000)
        if fmt == "json":
            # A JSON array cannot be streamed; it is read whole (use ndjson for big inputs).
            frame = pl.read_json(path)
            return frame.lazy().with_row_index(SOURCE_ROW)
        raise ConfigError([("source.format", f"cannot read {path.name}: unknown format {fmt!r}")])

    def _utf8_copy(self, path: Path) -> str:
        """Transcode a non-UTF-8 file to a temporary UTF-8 copy, streaming."""
        fd, tmp = tempfile.mkstemp(suffix=".csv", prefix="loader-")
        self._tmp_files.append(tmp)
        decoder = codecs.getincrementaldecoder(self.spec.csv.encoding)(errors="replace")
        with open(path, "rb") as src, os.fdopen(fd, "w", encoding="utf-8") as dst:
            while block := src.read(1 << 20):
                dst.write(decoder.decode(block))
            dst.write(decoder.decode(b"", final=True))
        return tmp

    def close(self) -> None:
        self._con.close()
        for tmp in self._tmp_files:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def frame_batches(frame: pl.DataFrame, *, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[pl.DataFrame]:
    """Batches of an in-memory frame, with `source_file`/`source_row` when it has none."""
    if SOURCE_ROW not in frame.columns:
        frame = frame.with_row_index(SOURCE_ROW).with_columns(pl.col(SOURCE_ROW).cast(pl.Int64))
    if SOURCE_FILE not in frame.columns:
        frame = frame.with_columns(pl.lit("dataframe", dtype=pl.String).alias(SOURCE_FILE))
    for offset in range(0, frame.height, batch_rows):
        yield frame.slice(offset, batch_rows)


def _rebatch(batches: Iterator[pl.DataFrame], batch_rows: int) -> Iterator[pl.DataFrame]:
    """Join the scan's small morsels into batches of about `batch_rows` rows."""
    pending: list[pl.DataFrame] = []
    size = 0
    try:
        for batch in batches:
            pending.append(batch)
            size += batch.height
            if size >= batch_rows:
                yield pl.concat(pending, how="diagonal_relaxed")
                pending, size = [], 0
    except SourceError as exc:
        # The rows read before the break still go on (and into the report); then the error.
        if pending:
            yield pl.concat(pending, how="diagonal_relaxed")
        raise exc
    if pending:
        yield pl.concat(pending, how="diagonal_relaxed")


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in ((".csv", "csv"), (".csv.gz", "csv"), (".tsv", "csv"), (".parquet", "parquet"),
                        (".pq", "parquet"), (".ndjson", "ndjson"), (".jsonl", "ndjson"), (".json", "json")):
        if name.endswith(suffix):
            return fmt
    return "csv"


def _mapped_columns(mapping: Any) -> list[str]:
    """The source columns a mapping reads (`column` and `columns` of every field), in order."""
    names: list[str] = []
    if mapping is None:
        return names
    fields = mapping.model_dump() if hasattr(mapping, "model_dump") else dict(mapping)
    for spec in fields.values():
        if not isinstance(spec, dict):
            continue
        for name in ([spec["column"]] if spec.get("column") is not None else []) + list(spec.get("columns") or []):
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


def _duckdb_message(exc: BaseException) -> str:
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def row_counts(files: Sequence[str], counts: dict[str, int]) -> list[dict[str, object]]:
    """The `source.files` list of summary.json."""
    return [{"path": path, "rows": counts.get(path, 0)} for path in files]
