"""Tests of loader.report and loader.report_html, on real files in tmp_path."""

from __future__ import annotations

import csv
import json
from datetime import UTC, date, datetime, timedelta, timezone

import polars as pl
import pyarrow.parquet as pq
import pytest

from loader.errors import ConfigError, LoaderError
from loader.report import (
    OUTCOMES,
    REASON_CODES,
    ROW_COLUMNS,
    Report,
    ReportWriter,
    TooManyFailures,
    format_major,
    format_summary_text,
)

STARTED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
FINISHED = STARTED + timedelta(minutes=3, seconds=7)


def make_rows(specs: list[tuple], *, source_file: str = "data/a.csv", first_row: int = 0) -> pl.DataFrame:
    """Rows from (stream, external_id, amount, currency, outcome, reason_code[, reason])."""
    records = []
    for i, spec in enumerate(specs):
        stream, external_id, amount, currency, outcome, reason_code, *rest = spec
        records.append(
            {
                "source_file": source_file,
                "source_row": first_row + i,
                "data_stream_key": stream,
                "external_id": external_id,
                "date": date(2024, 4, 1),
                "amount": amount,
                "currency": currency,
                "outcome": outcome,
                "reason_code": reason_code,
                "reason": rest[0] if rest else None,
                "bulk_request_id": 7 if outcome == "successful" else None,
                "record_id": 100 + i if outcome == "successful" else None,
            }
        )
    return pl.DataFrame(records, schema=ROW_COLUMNS)


def source_totals_of(rows: pl.DataFrame) -> pl.DataFrame:
    """What the source held for these rows, computed independently of the outcomes."""
    return rows.group_by("data_stream_key", "currency").agg(rows=pl.len(), amount=pl.col("amount").sum())


def new_writer(directory, **kwargs) -> ReportWriter:
    options = dict(
        formats=["json", "parquet", "csv", "html"],
        run_id="20240501T120000-abc",
        pipeline="chase_operating_backfill",
        started_at=STARTED,
        dry_run=False,
        target={"type": "api", "base_url": "https://api.endclose.com/v1"},
    )
    options.update(kwargs)
    return ReportWriter(directory, **options)


def finish(writer: ReportWriter, **kwargs) -> Report:
    options = dict(
        finished_at=FINISHED,
        source={"files": [{"path": "data/a.csv", "rows": 5}]},
        bulk_requests=[9, 7, 7],
    )
    options.update(kwargs)
    return writer.finish(**options)


BATCH_1 = [
    ("ops", "t1", 1000, "USD", "successful", "created"),
    ("ops", "t2", -250, "USD", "successful", "created"),
    ("ops", "t3", 500, "USD", "failed", "invalid", "date: not a date"),
    (None, "t4", None, None, "failed", "invalid", "data_stream_key: missing"),
]
BATCH_2 = [
    ("ops", "t1", 1000, "USD", "skipped", "duplicate_in_source"),
    ("ops", "t5", 300, "USD", "failed", "rejected", "amount too large"),
    ("jp", "j1", 123456, "JPY", "successful", "created"),
]


def write_two_batches(directory) -> Report:
    writer = new_writer(directory)
    for spec in (BATCH_1, BATCH_2):
        rows = make_rows(spec)
        writer.add_rows(rows)
        writer.add_source_totals(source_totals_of(rows))
    return finish(writer)


def test_contract_constants():
    assert OUTCOMES == ("successful", "failed", "skipped")
    assert set(REASON_CODES) == set(OUTCOMES)
    assert REASON_CODES["failed"] == ("invalid", "duplicate_in_source", "conflict", "rejected", "unprocessed")
    assert list(ROW_COLUMNS) == [
        "source_file", "source_row", "data_stream_key", "external_id", "date", "amount", "currency",
        "outcome", "reason_code", "reason", "bulk_request_id", "record_id",
    ]


def test_summary_keys_and_totals(tmp_path):
    report = write_two_batches(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary) == [
        "run_id", "pipeline", "started_at", "finished_at", "dry_run", "target", "source",
        "totals", "by_stream", "reasons", "bulk_requests", "error",
    ]
    assert summary["totals"] == {"total": 7, "successful": 3, "failed": 3, "skipped": 1}
    assert summary["started_at"] == "2024-05-01T12:00:00.000Z"
    assert summary["finished_at"] == "2024-05-01T12:03:07.000Z"
    assert summary["bulk_requests"] == [7, 9]
    assert summary["error"] is None
    assert summary["source"] == {"files": [{"path": "data/a.csv", "rows": 5}]}
    assert report.summary == summary


def test_by_stream_and_reasons_are_merged_across_batches(tmp_path):
    summary = write_two_batches(tmp_path).summary
    assert summary["by_stream"] == [
        {"data_stream_key": "jp", "currency": "JPY", "outcome": "successful", "rows": 1, "amount": 123456},
        {"data_stream_key": "ops", "currency": "USD", "outcome": "successful", "rows": 2, "amount": 750},
        {"data_stream_key": "ops", "currency": "USD", "outcome": "failed", "rows": 2, "amount": 800},
        {"data_stream_key": "ops", "currency": "USD", "outcome": "skipped", "rows": 1, "amount": 1000},
        # rows that failed mapping: null stream and currency, counted, amount 0
        {"data_stream_key": None, "currency": None, "outcome": "failed", "rows": 1, "amount": 0},
    ]
    assert summary["reasons"] == [
        {"outcome": "successful", "reason_code": "created", "rows": 3},
        {"outcome": "failed", "reason_code": "invalid", "rows": 2},
        {"outcome": "failed", "reason_code": "rejected", "rows": 1},
        {"outcome": "skipped", "reason_code": "duplicate_in_source", "rows": 1},
    ]


def test_extra_keys_and_abort_error_are_recorded(tmp_path):
    writer = new_writer(tmp_path, loader_version="0.1.0", chunk_size=1000)
    rows = make_rows([("ops", "t1", 5, "USD", "failed", "unprocessed", "the target never processed it")])
    writer.add_rows(rows)
    writer.add_source_totals(source_totals_of(rows))
    summary = finish(writer, error="target unreachable after 5 attempts").summary
    assert summary["error"] == "target unreachable after 5 attempts"
    assert summary["loader_version"] == "0.1.0"
    assert summary["chunk_size"] == 1000


def test_extra_keys_may_not_shadow_the_contract(tmp_path):
    with pytest.raises(ValueError, match="totals"):
        new_writer(tmp_path, totals={})


def test_target_secrets_are_never_written(tmp_path):
    writer = new_writer(tmp_path, target={"type": "api", "base_url": "https://x", "api_key": "sk_live_123"})
    finish(writer, source={"files": []})
    text = (tmp_path / "summary.json").read_text()
    assert "sk_live_123" not in text
    assert json.loads(text)["target"] == {"type": "api", "base_url": "https://x"}


def test_source_totals_that_disagree_raise(tmp_path):
    writer = new_writer(tmp_path)
    rows = make_rows(BATCH_1)
    writer.add_rows(rows)
    # the source held one more USD minor unit than the outcomes account for
    writer.add_source_totals(source_totals_of(rows).with_columns(
        pl.when(pl.col("currency") == "USD").then(pl.col("amount") + 1).otherwise(pl.col("amount")).alias("amount")
    ))
    with pytest.raises(LoaderError, match="report does not add up") as caught:
        finish(writer)
    assert "'ops'" in str(caught.value) and "1250" in str(caught.value) and "1251" in str(caught.value)
    # the files are still written, so that the run can be inspected
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "report does not add up" in summary["error"]
    assert (tmp_path / "rows.parquet").exists()


def test_rows_without_source_totals_raise(tmp_path):
    writer = new_writer(tmp_path)
    writer.add_rows(make_rows(BATCH_2))
    with pytest.raises(LoaderError, match="report does not add up.*'jp'"):
        finish(writer)


def test_source_totals_are_merged_and_null_amounts_add_nothing(tmp_path):
    writer = new_writer(tmp_path)
    rows = make_rows([("ops", "t1", None, "USD", "failed", "invalid", "amount: not a number")] + BATCH_1[:2])
    writer.add_rows(rows)
    # split over two calls, with a null amount: 3 rows, 750 minor units in all
    writer.add_source_totals(pl.DataFrame({"data_stream_key": ["ops"], "currency": ["USD"], "rows": [1], "amount": [None]}))
    writer.add_source_totals(pl.DataFrame({"data_stream_key": ["ops"], "currency": ["USD"], "rows": [2], "amount": [750]}))
    assert finish(writer).totals["total"] == 3


def test_bad_outcome_or_reason_code_is_refused(tmp_path):
    writer = new_writer(tmp_path)
    with pytest.raises(ValueError, match="'successful' with reason_code 'invalid'"):
        writer.add_rows(make_rows([("ops", "t1", 1, "USD", "successful", "invalid")]))
    with pytest.raises(ValueError, match="'done'"):
        writer.add_rows(make_rows([("ops", "t1", 1, "USD", "done", "created")]))


def test_unknown_format_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="report.formats.*xlsx"):
        new_writer(tmp_path, formats=["json", "xlsx"])


def test_naive_times_are_refused(tmp_path):
    with pytest.raises(ValueError, match="timezone-aware"):
        new_writer(tmp_path, started_at=datetime(2024, 5, 1))


def test_times_are_written_in_utc(tmp_path):
    paris = timezone(timedelta(hours=2))
    writer = new_writer(tmp_path, started_at=datetime(2024, 5, 1, 14, 0, tzinfo=paris))
    summary = finish(writer, source={}, finished_at=datetime(2024, 5, 1, 14, 1, tzinfo=paris)).summary
    assert summary["started_at"] == "2024-05-01T12:00:00.000Z"
    assert summary["finished_at"] == "2024-05-01T12:01:00.000Z"


def test_rows_parquet_has_every_row_with_the_contract_columns(tmp_path):
    write_two_batches(tmp_path)
    rows = pl.read_parquet(tmp_path / "rows.parquet")
    assert rows.schema == pl.Schema(ROW_COLUMNS)
    assert rows.height == 7
    assert rows["external_id"].to_list() == ["t1", "t2", "t3", "t4", "t1", "t5", "j1"]
    assert not list(tmp_path.glob("*.partial"))


def test_batches_are_cast_and_missing_optional_columns_are_null(tmp_path):
    writer = new_writer(tmp_path, formats=["json"])
    batch = pl.DataFrame(
        {
            "outcome": ["failed"],  # any column order
            "reason_code": ["invalid"],
            "source_row": pl.Series([3], dtype=pl.UInt32),
            "source_file": ["a.csv"],
            "amount": pl.Series([12], dtype=pl.Int32),
            "currency": ["USD"],
            "data_stream_key": ["ops"],
            "unrelated": [1],  # dropped
        }
    )
    writer.add_rows(batch)
    writer.add_source_totals(pl.DataFrame({"data_stream_key": ["ops"], "currency": ["USD"], "rows": [1], "amount": [12]}))
    rows = finish(writer).rows()
    assert rows.schema == pl.Schema(ROW_COLUMNS)
    assert rows.row(0, named=True)["bulk_request_id"] is None
    assert rows.row(0, named=True)["source_row"] == 3
    assert not (tmp_path / "rows.csv").exists()
    assert not (tmp_path / "report.html").exists()


def test_rows_without_required_columns_are_refused(tmp_path):
    writer = new_writer(tmp_path)
    with pytest.raises(ValueError, match="reason_code"):
        writer.add_rows(make_rows(BATCH_1).drop("reason_code"))


def test_many_batches_stream_into_one_parquet(tmp_path):
    writer = new_writer(tmp_path, formats=["json", "parquet", "csv"])
    for batch in range(50):
        rows = make_rows(
            [("ops", f"b{batch}-{i}", batch * 100 + i, "USD", "successful", "created") for i in range(20)],
            first_row=batch * 20,
        )
        writer.add_rows(rows)
        writer.add_source_totals(source_totals_of(rows))
    report = finish(writer)
    assert report.totals == {"total": 1000, "successful": 1000, "failed": 0, "skipped": 0}
    parquet = pq.ParquetFile(tmp_path / "rows.parquet")
    assert parquet.metadata.num_rows == 1000
    # small batches are buffered into row groups, not one row group per batch
    assert parquet.metadata.num_row_groups == 1
    rows = report.rows()
    assert rows["source_row"].to_list() == list(range(1000))
    assert rows["amount"].sum() == sum(b * 100 + i for b in range(50) for i in range(20))
    with open(tmp_path / "rows.csv", newline="") as f:
        assert sum(1 for _ in csv.reader(f)) == 1001  # one header


def test_row_groups_are_flushed_when_the_buffer_is_full(tmp_path):
    writer = new_writer(tmp_path, formats=["json", "csv"])
    writer.row_group_rows = 10
    for batch in range(5):
        rows = make_rows([("ops", f"{batch}-{i}", 1, "USD", "successful", "created") for i in range(6)])
        writer.add_rows(rows)
        writer.add_source_totals(source_totals_of(rows))
    finish(writer)
    parquet = pq.ParquetFile(tmp_path / "rows.parquet")
    assert parquet.metadata.num_rows == 30
    assert parquet.metadata.num_row_groups == 3  # 12, 12, then 6 at finish
    assert pl.read_csv(tmp_path / "rows.csv").height == 30


def test_csv_neutralises_formulas_and_keeps_numbers(tmp_path):
    writer = new_writer(tmp_path)
    rows = make_rows(
        [
            ("ops", "=HYPERLINK(\"http://x\")", -250, "USD", "failed", "rejected", "+1 refused"),
            ("ops", "-5", 10, "USD", "failed", "rejected", "@SUM(A1)"),
            ("ops", "\tcmd", 20, "USD", "failed", "rejected", "\rcr"),
            ("ops", "plain-id", 30, "USD", "successful", "created", "a=b"),
        ]
    )
    writer.add_rows(rows)
    writer.add_source_totals(source_totals_of(rows))
    finish(writer)
    with open(tmp_path / "rows.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0]) == list(ROW_COLUMNS)
    assert [line["external_id"] for line in lines] == ["'=HYPERLINK(\"http://x\")", "'-5", "'\tcmd", "plain-id"]
    assert [line["reason"] for line in lines] == ["'+1 refused", "'@SUM(A1)", "'\rcr", "a=b"]
    # numbers are untouched: a negative amount stays a number
    assert [line["amount"] for line in lines] == ["-250", "10", "20", "30"]
    assert lines[0]["source_row"] == "0" and lines[0]["date"] == "2024-04-01"
    # the parquet keeps the data as it was
    assert pl.read_parquet(tmp_path / "rows.parquet")["external_id"][1] == "-5"


def test_empty_run_writes_empty_files_with_the_columns(tmp_path):
    report = finish(new_writer(tmp_path), source={"files": []}, bulk_requests=[])
    assert report.totals == {"total": 0, "successful": 0, "failed": 0, "skipped": 0}
    assert pl.read_parquet(tmp_path / "rows.parquet").schema == pl.Schema(ROW_COLUMNS)
    assert (tmp_path / "rows.csv").read_text().strip() == ",".join(ROW_COLUMNS)
    assert "No rows." in (tmp_path / "report.html").read_text()


def test_writer_refuses_rows_after_finish(tmp_path):
    writer = new_writer(tmp_path)
    finish(writer, source={})
    with pytest.raises(RuntimeError, match="already finished"):
        writer.add_rows(make_rows(BATCH_1))


def test_report_load_round_trip(tmp_path):
    written = write_two_batches(tmp_path / "run")
    loaded = Report.load(tmp_path / "run")
    assert loaded.summary == written.summary
    assert loaded.run_id == "20240501T120000-abc"
    assert loaded.totals == {"total": 7, "successful": 3, "failed": 3, "skipped": 1}
    assert loaded.failed_rows == 3
    assert loaded.rows().height == 7
    assert loaded.failed()["external_id"].to_list() == ["t3", "t4", "t5"]
    assert set(loaded.failed()["outcome"]) == {"failed"}
    assert loaded.skipped()["reason_code"].to_list() == ["duplicate_in_source"]
    assert repr(loaded) == "Report(run_id='20240501T120000-abc', total=7, successful=3, failed=3, skipped=1)"


def test_report_load_of_a_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="summary.json is missing"):
        Report.load(tmp_path / "nope")


def test_raise_for_failures_threshold(tmp_path):
    report = write_two_batches(tmp_path)
    report.raise_for_failures(max_failed_rows=3)  # at the threshold: fine
    with pytest.raises(TooManyFailures) as caught:
        report.raise_for_failures(max_failed_rows=2)
    message = str(caught.value)
    assert "3 rows failed" in message and "the 2 allowed" in message
    assert "invalid 2, rejected 1" in message
    assert str(tmp_path / "rows.parquet") in message
    assert caught.value.exit_code == 1
    assert isinstance(caught.value, LoaderError)
    with pytest.raises(TooManyFailures):
        report.raise_for_failures()


def test_repr_html_shows_totals_and_top_failure_reasons(tmp_path):
    fragment = write_two_batches(tmp_path)._repr_html_()
    assert '<div class="card failed"><div class="label">Failed · 42%</div><div class="n">3</div>' in fragment
    assert '<div class="n">7</div>' in fragment
    assert "Top failure reasons" in fragment and ">rejected<" in fragment
    assert "Outcomes by reason code" in fragment and ">duplicate_in_source<" in fragment
    top = fragment.split("Top failure reasons", 1)[1]
    assert ">duplicate_in_source<" not in top  # a skip reason, not a failure reason
    assert "<script" not in fragment


def test_html_escapes_source_text(tmp_path):
    writer = new_writer(tmp_path, pipeline="p<i>")
    rows = make_rows(
        [("ops", "<script>alert(1)</script>", 5, "USD", "failed", "rejected", "bad <b>\"value\"</b> & more")],
        source_file="<img src=x onerror=alert(2)>.csv",
    )
    writer.add_rows(rows)
    writer.add_source_totals(source_totals_of(rows))
    finish(writer)
    page = (tmp_path / "report.html").read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bad &lt;b&gt;&quot;value&quot;&lt;/b&gt; &amp; more" in page
    assert "<img" not in page and "&lt;img src=x onerror=alert(2)&gt;.csv" in page
    assert "p&lt;i&gt;" in page
    assert "http://" not in page and "https://" not in page.replace("https://api.endclose.com/v1", "")


def test_format_major_is_exact():
    assert format_major(123456, "JPY") == "123,456"
    assert format_major(1234567, "BHD") == "1,234.567"
    assert format_major(-5, "USD") == "-0.05"
    assert format_major(-123456789012345678, "USD") == "-1,234,567,890,123,456.78"
    assert format_major(0, "EUR") == "0.00"
    assert format_major(100, "usd") == "1.00"
    assert format_major(5, "XAU") is None  # no exponent: minor units only
    assert format_major(5, "ZZZ") is None
    assert format_major(5, None) is None


def test_html_formats_amounts_exactly(tmp_path):
    writer = new_writer(tmp_path)
    rows = make_rows(
        [
            ("jp", "j1", 123456, "JPY", "successful", "created"),
            ("bh", "b1", 1234567, "BHD", "successful", "created"),
            ("us", "u1", -5, "USD", "failed", "rejected", "no"),
            ("gold", "g1", 42, "XAU", "successful", "created"),
        ]
    )
    writer.add_rows(rows)
    writer.add_source_totals(source_totals_of(rows))
    finish(writer)
    page = (tmp_path / "report.html").read_text()
    assert '123,456<span class="minor">123456</span>' in page
    assert '1,234.567<span class="minor">1234567</span>' in page
    assert '-0.05<span class="minor">-5</span>' in page
    assert '42<span class="minor">minor units</span>' in page
    # the failed row is listed too, with its amount
    assert "Failed rows" in page and "<td>u1</td>" in page


def test_html_is_self_contained_and_has_the_sections(tmp_path):
    write_two_batches(tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    for section in ("Control totals", "Reasons", "Failed rows", "chase_operating_backfill", "20240501T120000-abc"):
        assert section in page
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert "Showing all 3 failed rows" in page


def test_html_lists_only_the_first_failed_rows(tmp_path):
    writer = new_writer(tmp_path)
    rows = make_rows([("ops", f"f{i}", 1, "USD", "failed", "invalid", "x") for i in range(250)])
    writer.add_rows(rows)
    writer.add_source_totals(source_totals_of(rows))
    finish(writer)
    page = (tmp_path / "report.html").read_text()
    assert "the first 200 of 250" in page
    assert "<td>f199</td>" in page and "<td>f200</td>" not in page


def test_format_summary_text(tmp_path):
    text = format_summary_text(write_two_batches(tmp_path).summary)
    lines = text.splitlines()
    assert lines[0] == "run 20240501T120000-abc of chase_operating_backfill"
    assert lines[1] == "rows: 7 total, 3 successful, 3 failed, 1 skipped"
    assert "control totals:" in lines and "reasons:" in lines
    assert any(line.split() == ["jp", "JPY", "successful", "1", "123,456"] for line in lines)
    assert any(line.split() == ["(none)", "(none)", "failed", "1", "0", "minor", "units"] for line in lines)
    assert any(line.split() == ["failed", "invalid", "2"] for line in lines)


def test_format_summary_text_shows_dry_run_and_abort():
    summary = {
        "run_id": "r", "pipeline": "p", "dry_run": True, "error": "target unreachable",
        "totals": {"total": 0, "successful": 0, "failed": 0, "skipped": 0}, "by_stream": [], "reasons": [],
    }
    text = format_summary_text(summary)
    assert "dry run" in text and "aborted: target unreachable" in text
