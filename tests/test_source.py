"""Reading sources: formats, globs, queries, transforms, lineage columns."""

from __future__ import annotations

import json
import os

import polars as pl
import pytest

from loader.config import load_pipeline
from loader.errors import ConfigError
from loader.run import run_pipeline
from loader.source import CSV_CHUNK_BYTES, CSV_CHUNK_BYTES_VARIABLE, Source, SourceSpec

MAPPING = {
    "date": {"column": "posted"},
    "data_stream_key": {"value": "ops"},
    "amount": {"column": "amount", "unit": "minor"},
    "external_id": {"column": "txn_id"},
}
RECORDS = [{"posted": "2024-01-02", "amount": 150, "txn_id": "A"},
           {"posted": "2024-01-03", "amount": -7, "txn_id": "B"}]


def write_pipeline(tmp_path, source: dict, **extra) -> str:
    import yaml

    config = {"version": 1, "name": "src", "source": source, "mapping": MAPPING,
              "target": {"streams": [{"key": "ops", "name": "Ops"}]}, **extra}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "ndjson", "json", "csv"])
def test_each_file_format_loads(tmp_path, fmt):
    frame = pl.DataFrame(RECORDS)
    target = tmp_path / f"in.{fmt}"
    writers = {"parquet": frame.write_parquet, "ndjson": frame.write_ndjson, "csv": frame.write_csv,
               "json": lambda path: path.write_text(json.dumps(RECORDS))}
    writers[fmt](target)
    report = run_pipeline(write_pipeline(tmp_path, {"path": f"in.{fmt}"})).report
    assert report.totals["successful"] == 2
    rows = report.rows().sort("source_row")
    assert rows["amount"].to_list() == [150, -7]
    assert rows["source_row"].to_list() == [0, 1]
    assert rows["source_file"].to_list() == [str(target)] * 2


def test_a_duckdb_query_source_reads_relative_to_the_yaml(tmp_path):
    pl.DataFrame(RECORDS).write_csv(tmp_path / "in.csv")
    path = write_pipeline(tmp_path, {"query": "select * from read_csv('in.csv') where amount > 0"})
    report = run_pipeline(path).report
    assert report.totals == {"total": 1, "successful": 1, "failed": 0, "skipped": 0}
    assert report.rows()["source_file"].to_list() == ["query"]


def test_bad_query_is_a_config_error_at_source_query(tmp_path):
    path = write_pipeline(tmp_path, {"query": "select * from no_such_table"})
    with pytest.raises(ConfigError) as info:
        run_pipeline(path)
    assert info.value.problems[0][0] == "source.query"


def test_batches_keep_per_file_row_numbers_and_count_rows(tmp_path):
    for name, n in (("a.csv", 5), ("b.csv", 3)):
        pl.DataFrame({"posted": ["2024-01-02"] * n, "amount": list(range(n)),
                      "txn_id": [f"{name}{i}" for i in range(n)]}).write_csv(tmp_path / name)
    (tmp_path / "empty.csv").write_text("")
    pipeline = load_pipeline(write_pipeline(tmp_path, {"path": "*.csv"}))
    with Source(SourceSpec.from_pipeline(pipeline), batch_rows=2) as source:
        batches = list(source.batches())
        counts = source.file_rows
    rows = pl.concat(batches)
    assert rows.height == 8
    assert rows.filter(pl.col("source_file").str.ends_with("b.csv"))["source_row"].to_list() == [0, 1, 2]
    assert {k.rsplit("/", 1)[1]: v for k, v in counts.items()} == {"a.csv": 5, "b.csv": 3, "empty.csv": 0}


def test_latin1_files_are_transcoded(tmp_path):
    (tmp_path / "in.csv").write_bytes("posted,amount,txn_id,memo\n2024-01-02,5,A,Caf\xe9\n".encode("latin-1"))
    mapping = {**MAPPING, "description": {"column": "memo"}}
    import yaml

    config = {"version": 1, "name": "src", "source": {"path": "in.csv", "csv": {"encoding": "latin1"}},
              "mapping": mapping, "target": {"streams": [{"key": "ops", "name": "Ops"}]}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    report = run_pipeline(tmp_path / "pipeline.yaml").report
    assert report.totals["successful"] == 1
    import duckdb

    with duckdb.connect(str(tmp_path / ".loader" / "endclose.duckdb"), read_only=True) as con:
        assert con.sql("select description from records").fetchall() == [("Café",)]



def _quoted_csv(path, rows: int) -> pl.DataFrame:
    frame = pl.DataFrame({
        "txn_id": [f"T{i:06d}" for i in range(rows)],
        "memo": [f"line one, {i}\nline \"two\" {i}" if i % 7 == 0 else f"plain {i}" for i in range(rows)],
        "amount": [str(i * 3 - 50) for i in range(rows)],
    })
    frame.write_csv(path)
    return frame


def test_quoted_fields_survive_every_read_chunk_boundary(tmp_path, monkeypatch):
    # A value the user set wins over the reader's default: 16 KiB chunks put about a hundred
    # chunk boundaries in this file, some inside quoted fields with separators and line breaks.
    monkeypatch.setenv(CSV_CHUNK_BYTES_VARIABLE, str(16 << 10))
    path = tmp_path / "quoted.csv"
    frame = _quoted_csv(path, 60_000)
    assert path.stat().st_size > 80 * (16 << 10)

    with Source(SourceSpec(files=[path]), batch_rows=25_000) as source:
        read = pl.concat(list(source.batches()))

    assert os.environ[CSV_CHUNK_BYTES_VARIABLE] == str(16 << 10)
    assert source.file_rows == {str(path): 60_000}
    assert read.get_column("source_row").to_list() == list(range(60_000))
    assert read.select("txn_id", "memo", "amount").equals(frame)


def test_csv_reads_take_bounded_chunks_unless_the_user_chose(tmp_path, monkeypatch):
    monkeypatch.delenv(CSV_CHUNK_BYTES_VARIABLE, raising=False)
    path = tmp_path / "small.csv"
    _quoted_csv(path, 10)
    with Source(SourceSpec(files=[path])) as source:
        assert sum(batch.height for batch in source.batches()) == 10
    assert os.environ[CSV_CHUNK_BYTES_VARIABLE] == str(CSV_CHUNK_BYTES)
