"""End to end: pipeline.yaml -> local engine -> report, through the Python API."""

from __future__ import annotations

import duckdb
import polars as pl
from conftest import SAMPLE_ROWS

from loader.run import run_pipeline

ROWS = SAMPLE_ROWS


def reasons(report) -> dict[tuple[str, str], int]:
    return {(r["outcome"], r["reason_code"]): r["rows"] for r in report.summary["reasons"]}


def run_with_faults(path, tmp_path, *, batch_rows=250_000, **faults):
    """The pipeline at `path`, run against a local target with fault injection (LocalTarget's options)."""
    from loader.config import load_pipeline
    from loader.run import Run, settings_from_pipeline
    from loader.source import Source, SourceSpec
    from loader.targets.local import LocalTarget

    pipeline = load_pipeline(path)
    target = LocalTarget(tmp_path / ".loader/endclose.duckdb", "default", [{"key": "ops", "name": "Ops"}], **faults)
    with Source(SourceSpec.from_pipeline(pipeline), batch_rows=batch_rows) as source:
        return Run(settings_from_pipeline(pipeline), target).execute(source.batches(), lambda: {"files": []})


def records(database) -> pl.DataFrame:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.sql(
            "select data_stream_key, external_id, date, amount, currency, direction, description, bulk_request_id "
            "from records order by id").pl()


def test_first_run_loads_valid_rows_and_accounts_for_every_row(make_pipeline, tmp_path):
    result = run_pipeline(make_pipeline({"jan.csv": ROWS}))
    report = result.report
    assert report.totals == {"total": 9, "successful": 6, "failed": 2, "skipped": 1}
    assert reasons(report) == {("successful", "created"): 6, ("failed", "invalid"): 2,
                               ("skipped", "duplicate_in_source"): 1}
    loaded = records(tmp_path / ".loader/endclose.duckdb")
    assert sorted(zip(loaded["currency"], loaded["amount"])) == sorted(
        [("USD", 10050), ("EUR", 2000), ("JPY", 1500), ("BHD", 1234), ("USD", 99), ("USD", 99)])
    rows = report.rows().sort("source_row")
    assert rows["source_row"].to_list() == list(range(9))
    assert rows.filter(pl.col("outcome") == "successful")["record_id"].null_count() == 0
    assert "same data_stream_key and external_id as" in rows["reason"][6]
    assert result.exit_code == 0


def test_rerun_creates_nothing_new(make_pipeline, tmp_path):
    path = make_pipeline({"jan.csv": ROWS}, target__chunk_size=2)  # three bulk requests
    run_pipeline(path)
    second = run_pipeline(path).report
    assert reasons(second)[("skipped", "already_loaded")] == 6
    assert second.totals["successful"] == 0
    held = records(tmp_path / ".loader/endclose.duckdb")
    assert held.height == 6
    assert not list((tmp_path / ".loader").glob("loader-run-*"))  # the runs' scratch space is gone
    # Each skipped row names the bulk request that holds its record.
    skipped = second.rows().filter(pl.col("reason_code") == "already_loaded")
    by_id = dict(zip(held["external_id"].to_list(), held["bulk_request_id"].to_list(), strict=True))
    for external_id, reason in skipped.select("external_id", "reason").iter_rows():
        if external_id is not None:
            assert reason == f"loaded before in bulk request {by_id[external_id]}"


def test_rerun_without_cache_finds_rows_in_the_target(make_pipeline, tmp_path):
    path = make_pipeline({"jan.csv": ROWS})
    run_pipeline(path)
    (tmp_path / ".loader/cache.duckdb").unlink()
    second = run_pipeline(path).report
    assert reasons(second)[("skipped", "exists_in_target")] == 6
    assert records(tmp_path / ".loader/endclose.duckdb").height == 6  # id-less rows not doubled either


def test_rerun_without_cache_under_on_conflict_error_fails_rows_as_conflicts(make_pipeline, tmp_path):
    path = make_pipeline({"jan.csv": ROWS})
    run_pipeline(path)
    (tmp_path / ".loader/cache.duckdb").unlink()
    second = make_pipeline({"jan.csv": ROWS}, target__on_conflict="error")
    report = run_pipeline(second).report
    codes = reasons(report)
    assert codes[("failed", "conflict")] == 4  # the four rows with an id
    conflict = report.failed().filter(pl.col("reason_code") == "conflict")
    assert conflict["reason"].str.contains("already exists").all()


def test_within_source_fail_marks_repeats_failed(make_pipeline):
    report = run_pipeline(make_pipeline({"jan.csv": ROWS}, dedupe={"within_source": "fail"})).report
    assert reasons(report)[("failed", "duplicate_in_source")] == 1


def test_unknown_stream_is_rejected_per_row_by_the_target(make_pipeline):
    rows = [["2024-01-02", "A1", "x", "1.00", "USD", "DR"], ["2024-01-02", "A2", "y", "2.00", "USD", "DR"]]
    path = make_pipeline({"a.csv": rows}, mapping__data_stream_key={"column": "memo"},
                         target__streams=[{"key": "x", "name": "X"}])
    report = run_pipeline(path).report
    assert reasons(report) == {("successful", "created"): 1, ("failed", "rejected"): 1}
    rejected = report.failed()
    assert rejected["data_stream_key"].to_list() == ["y"]
    assert "y" in rejected["reason"][0]


def test_glob_keeps_per_file_source_rows(make_pipeline):
    path = make_pipeline({"a.csv": ROWS[:3], "b.csv": ROWS[3:5]})
    report = run_pipeline(path).report
    rows = report.rows()
    per_file = rows.group_by("source_file").agg(pl.col("source_row").sort()).sort("source_file")
    assert [f.rsplit("/", 1)[1] for f in per_file["source_file"]] == ["a.csv", "b.csv"]
    assert per_file["source_row"].to_list() == [[0, 1, 2], [0, 1]]
    assert [f["rows"] for f in report.summary["source"]["files"]] == [3, 2]


def test_control_totals_add_up_per_stream_and_currency(make_pipeline):
    report = run_pipeline(make_pipeline({"jan.csv": ROWS})).report
    by = pl.DataFrame(report.summary["by_stream"])
    usd = by.filter(pl.col("currency") == "USD")
    assert usd.filter(pl.col("outcome") == "successful")["amount"].sum() == 10050 + 99 + 99
    assert usd.filter(pl.col("outcome") == "skipped")["amount"].sum() == 10050
    assert by["rows"].sum() == 9


def test_dry_run_touches_neither_target_nor_cache(make_pipeline, tmp_path):
    report = run_pipeline(make_pipeline({"jan.csv": ROWS}), dry_run=True).report
    assert reasons(report)[("skipped", "dry_run")] == 6
    assert not (tmp_path / ".loader/endclose.duckdb").exists()
    assert report.summary["dry_run"] is True


def test_fail_on_sets_exit_code_1(make_pipeline):
    result = run_pipeline(make_pipeline({"jan.csv": ROWS}, fail_on={"failed_rows": 1}))
    assert result.exit_code == 1
    result = run_pipeline(make_pipeline({"jan.csv": ROWS}, fail_on={"failed_rows": 2}))
    assert result.exit_code == 0


def test_transform_sql_filters_and_keeps_lineage(make_pipeline):
    path = make_pipeline({"jan.csv": ROWS}, transform={"sql": "select * from source where ccy <> 'USD'"})
    report = run_pipeline(path).report
    assert report.totals["total"] == 3
    assert sorted(report.rows()["source_row"].to_list()) == [1, 2, 3]


def test_a_job_that_fails_midway_leaves_unprocessed_rows_for_the_next_run(make_pipeline, tmp_path):
    path = make_pipeline({"jan.csv": ROWS[:4]}, target__chunk_size=4)
    first = run_with_faults(path, tmp_path, fail_jobs_after=2).report
    assert reasons(first) == {("successful", "created"): 2, ("failed", "unprocessed"): 2}
    unprocessed = first.failed()
    assert unprocessed["reason"].str.contains("ended failed").all()
    second = run_pipeline(path).report
    assert reasons(second) == {("skipped", "already_loaded"): 2, ("successful", "created"): 2}
    assert records(tmp_path / ".loader/endclose.duckdb").height == 4


def test_a_sandbox_load_never_hides_rows_from_production(make_pipeline, tmp_path):
    sandbox = run_pipeline(make_pipeline({"jan.csv": ROWS}, target__environment="sandbox")).report
    production = run_pipeline(make_pipeline({"jan.csv": ROWS}, target__environment="production")).report
    assert sandbox.totals["successful"] == production.totals["successful"] == 6
    with duckdb.connect(str(tmp_path / ".loader/endclose.duckdb"), read_only=True) as con:
        per_env = dict(con.sql("select environment, count(*) from records group by 1").fetchall())
    assert per_env == {"sandbox": 6, "production": 6}


def test_money_lands_exactly_in_the_engine(make_pipeline, tmp_path):
    rows = [["2024-01-02", f"M{i}", "x", amount, ccy, "DR"] for i, (amount, ccy) in enumerate(
        [("0.10", "USD"), ("0.20", "USD"), ("1234567.89", "EUR"), ("999", "JPY"), ("0.001", "BHD"),
         ("-12.345", "KWD"), ("1.0001", "CLF")])]
    run_pipeline(make_pipeline({"m.csv": rows}))
    held = records(tmp_path / ".loader/endclose.duckdb")
    assert list(zip(held["currency"], held["amount"])) == [
        ("USD", 10), ("USD", 20), ("EUR", 123456789), ("JPY", 999), ("BHD", 1), ("KWD", -12345), ("CLF", 10001)]


def test_an_answer_lost_after_commit_is_recovered_without_loading_twice(make_pipeline, tmp_path):
    """The engine committed, the run never heard: the rerun finds the same requests by their keys."""
    path = make_pipeline({"jan.csv": ROWS})
    aborted = run_with_faults(path, tmp_path, lose_answers=True)
    assert aborted.exit_code == 3
    assert reasons(aborted.report)[("failed", "unprocessed")] == 6
    assert aborted.report.summary["error"].startswith("the local engine's answer was lost")
    assert records(tmp_path / ".loader/endclose.duckdb").height == 6  # committed, unconfirmed

    rerun = run_pipeline(path).report  # first sends the journal's unanswered chunks again, then the source
    assert reasons(rerun)[("skipped", "already_loaded")] == 6
    assert records(tmp_path / ".loader/endclose.duckdb").height == 6  # id-less rows not doubled either
    assert run_pipeline(path).report.totals["successful"] == 0


def test_unanswered_chunks_are_recovered_even_when_the_source_changed(make_pipeline, tmp_path):
    """The journal keeps what was sent; a changed source cuts other chunks, and still nothing doubles."""
    path = make_pipeline({"jan.csv": ROWS})
    assert run_with_faults(path, tmp_path, lose_answers=True).exit_code == 3
    # New rows at the top: every later row moves, chunks are cut differently, keys differ.
    changed = make_pipeline({"jan.csv": [["2024-01-01", "N1", "new", "5.00", "USD", "DR"],
                                         ["2024-01-01", "N2", "new", "6.00", "USD", "DR"], *ROWS]})
    rerun = run_pipeline(changed).report
    assert reasons(rerun)[("skipped", "already_loaded")] == 6
    assert reasons(rerun)[("successful", "created")] == 2
    held = records(tmp_path / ".loader/endclose.duckdb")
    assert held.height == 8
    assert held.filter(pl.col("external_id").is_null()).height == 2  # the two identical id-less rows, once each


def test_the_journal_keeps_row_files_only_while_chunks_are_unanswered(make_pipeline, tmp_path):
    path = make_pipeline({"jan.csv": ROWS})
    folder = tmp_path / ".loader/cache.duckdb.journal"
    assert run_with_faults(path, tmp_path, lose_answers=True).exit_code == 3
    assert [p.suffix for p in folder.iterdir()] == [".arrow"]  # the unanswered batch's rows
    orphan = folder / "20000101T000000.000Z-000000-000000000.arrow"  # a crash before its chunks were recorded
    orphan.write_bytes(b"never recorded as sent")
    assert run_pipeline(path).exit_code == 0
    assert list(folder.iterdir()) == []
    assert records(tmp_path / ".loader/endclose.duckdb").height == 6


def test_batches_planned_after_an_abort_leave_the_journal_unsent(make_pipeline, tmp_path):
    """Batches are journaled when planned; those the run never sent (it aborted first) leave the journal,
    so only what may have reached the target is sent again by the next run."""
    rows = [[f"2024-01-{i % 28 + 1:02d}", f"J{i}", "x", "1.00", "USD", "DR"] for i in range(12)]
    path = make_pipeline({"jan.csv": rows}, target__chunk_size=2)
    aborted = run_with_faults(path, tmp_path, batch_rows=4, lose_answers=True)
    assert aborted.exit_code == 3
    with duckdb.connect(str(tmp_path / ".loader/cache.duckdb"), read_only=True) as con:
        journaled = con.sql("select count(*), sum(rows) from journal_chunks").fetchall()
    assert journaled == [(2, 4)]  # the first batch's two chunks: sent, answer lost
    assert len(list((tmp_path / ".loader/cache.duckdb.journal").iterdir())) == 1
    rerun = run_pipeline(path).report
    assert reasons(rerun) == {("skipped", "already_loaded"): 4, ("successful", "created"): 8}
    assert records(tmp_path / ".loader/endclose.duckdb").height == 12


def test_a_journal_kept_in_a_table_by_an_older_version_is_still_recovered(make_pipeline, tmp_path):
    """State files of loader 0.1 held unsent rows in `journal_rows`; they are resent, then the table goes."""
    path = make_pipeline({"jan.csv": ROWS})
    assert run_with_faults(path, tmp_path, lose_answers=True).exit_code == 3
    folder = tmp_path / ".loader/cache.duckdb.journal"
    (saved,) = folder.iterdir()
    with duckdb.connect(str(tmp_path / ".loader/cache.duckdb")) as con:
        rows = pl.read_ipc(saved)  # noqa: F841 - read by the SQL below
        con.execute("create table journal_rows as select * from rows")
        con.execute("update journal_chunks set rows_file = null")
    saved.unlink()
    rerun = run_pipeline(path).report
    assert reasons(rerun)[("skipped", "already_loaded")] == 6
    assert records(tmp_path / ".loader/endclose.duckdb").height == 6
    with duckdb.connect(str(tmp_path / ".loader/cache.duckdb"), read_only=True) as con:
        assert con.sql("select count(*) from duckdb_tables() where table_name = 'journal_rows'").fetchall() == [(0,)]


def test_a_source_that_breaks_partway_still_reports_what_was_read(make_pipeline, tmp_path):
    """A glob whose second file is unreadable: the first file's rows are loaded and reported, the run says why."""
    rows = [[f"2024-01-{i % 28 + 1:02d}", f"B{i}", "x", "1.00", "USD", "DR"] for i in range(30)]
    path = make_pipeline({"a.csv": rows, "b.csv": rows[:2]})
    broken = tmp_path / "data" / "b.csv"
    broken.write_bytes(broken.read_bytes() + b'2024-01-02,"B99,unterminated quote\n')
    result = run_pipeline(path)
    report = result.report
    assert "b.csv" in report.summary["error"]
    assert report.totals == {"total": 30, "successful": 30, "failed": 0, "skipped": 0}
    assert result.exit_code == 3  # something was loaded: aborted, and a rerun after fixing the file finishes
