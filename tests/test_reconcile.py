"""`loader reconcile`: source against target, on the local engine and on a real `loader serve`."""

from __future__ import annotations

import json
import time
from datetime import date

import duckdb
import httpx
import polars as pl
import pytest
import yaml
from conftest import pipeline_config, write_csv
from serve_fixture import running_server

from loader.config import load_pipeline
from loader.reconcile import DIFF_SCHEMA, STATUSES, reconcile_pipeline
from loader.run import run_pipeline

# Several currencies (USD 2 decimals, EUR, JPY 0, BHD 3), two id-less rows that are identical
# (occurrences 1 and 2), one invalid row and one repeated id (left out, and counted).
ROWS = [
    ["2024-01-02", "T1", "Payroll", "100.50", "USD", "DR"],
    ["2024-01-03", "T2", "Refund", "20", "EUR", "CR"],
    ["2024-01-04", "T3", "Vendor", "1500", "JPY", "DR"],
    ["2024-01-05", "T4", "Fees", "-0.125", "BHD", "DR"],
    ["2024-01-06", "T5", "Interest", "7.07", "USD", "CR"],
    ["2024-01-07", "", "Cash", "5.00", "USD", "CR"],
    ["2024-01-07", "", "Cash", "5.00", "USD", "CR"],
    ["2024-01-08", "T6", "Bad date", "1", "USD", "DR"],
    ["2024-01-09", "T1", "Repeated id", "9", "USD", "DR"],
]
ROWS[7][0] = "2024-02-30"  # invalid: no such date
KEY = "test-key"


def write_pipeline(folder, **overrides):
    write_csv(folder / "data" / "a.csv", ROWS)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(**overrides), sort_keys=False))
    return path


def edit(database, sql):
    with duckdb.connect(str(database)) as con:
        con.execute(sql)


def assert_clean(result):
    assert result.exit_code == 0, result.diff.filter(pl.col("status") != "matched")
    assert result.summary["counts"] == {"matched": 7, "mismatched": 0, "missing_in_target": 0,
                                        "unexpected_in_target": 0}
    assert result.summary["source"] == {"rows": 9, "valid": 8, "invalid": 1, "duplicates": 1, "keys": 7}
    assert result.diff.schema == pl.Schema(DIFF_SCHEMA)
    assert result.diff["fingerprint"].is_null().sum() == 5  # the id rows
    assert result.diff["fingerprint"].drop_nulls().n_unique() == 2  # identical id-less rows, two occurrences
    # Control totals of both sides agree exactly, per stream and currency.
    totals = {(t["data_stream_key"], t["currency"]): t for t in result.summary["control_totals"]}
    assert set(totals) == {("ops", "USD"), ("ops", "EUR"), ("ops", "JPY"), ("ops", "BHD")}
    expected = {"USD": (4, 10050 + 707 + 500 + 500), "EUR": (1, 2000), "JPY": (1, 1500), "BHD": (1, -125)}
    for (_, currency), line in totals.items():
        assert (line["source_rows"], line["source_amount"]) == expected[currency]
        assert (line["target_rows"], line["target_amount"]) == expected[currency]
        assert line["agree"]
    # The files match what the function returned.
    assert json.loads((result.directory / "summary.json").read_text())["counts"] == result.summary["counts"]
    assert pl.read_parquet(result.directory / "diff.parquet").equals(result.diff)
    assert result.directory.name.startswith("reconcile-")


def assert_changed(result, t2_record_id):
    counts = result.summary["counts"]
    assert counts == {"matched": 5, "mismatched": 1, "missing_in_target": 1, "unexpected_in_target": 1}
    assert result.exit_code == 1
    changed = result.mismatched().row(0, named=True)
    assert changed["external_id"] == "T1" and changed["fields"] == ["amount"]
    assert (changed["source_amount"], changed["target_amount"]) == (10050, 99999)
    assert changed["source_date"] == changed["target_date"] == date(2024, 1, 2)
    assert changed["source_row"] == 0 and changed["record_id"] is not None
    missing = result.missing().row(0, named=True)
    assert missing["external_id"] == "T3" and missing["record_id"] is None and missing["target_amount"] is None
    assert missing["source_amount"] == 1500 and missing["source_row"] == 2
    unexpected = result.unexpected().row(0, named=True)
    assert unexpected["external_id"] == "BYHAND" and unexpected["target_amount"] == 4242
    assert unexpected["source_file"] is None and unexpected["record_id"] is not None
    assert result.summary["mismatched_fields"] == {"amount": 1}
    totals = {t["currency"]: t for t in result.summary["control_totals"]}
    assert not totals["USD"]["agree"] and not totals["JPY"]["agree"] and totals["EUR"]["agree"]
    assert totals["JPY"]["target_rows"] == 0
    assert t2_record_id in result.matched()["record_id"].to_list()


# -- the local target ---------------------------------------------------------------------------


def test_local_clean_load_reconciles_to_all_matched(tmp_path):
    path = write_pipeline(tmp_path)
    assert run_pipeline(path).exit_code == 0
    result = reconcile_pipeline(path)
    assert_clean(result)
    assert set(result.diff["status"]) == {"matched"}
    assert result.summary["target"] == {"type": "local", "database": str(tmp_path / ".loader" / "endclose.duckdb"),
                                        "environment": "default"}


def test_local_edited_deleted_and_added_records_show_in_the_diff(tmp_path):
    path = write_pipeline(tmp_path)
    run_pipeline(path)
    database = tmp_path / ".loader" / "endclose.duckdb"
    with duckdb.connect(str(database)) as con:
        t2 = con.execute("select id from records where external_id = 'T2'").fetchone()[0]
        con.execute("update records set amount = 99999 where external_id = 'T1'")
        con.execute("delete from records where external_id = 'T3'")
        con.execute(
            "insert into records select max(id) + 1, 'default', 'ops', date '2024-01-05', 4242, 'USD', 'credit', "
            "'by hand', 'BYHAND', '{}', 0, now() from records"
        )
        # Outside the source's date range: not fetched, so not unexpected.
        con.execute(
            "insert into records select max(id) + 1, 'default', 'ops', date '2023-06-01', 1, 'USD', 'credit', "
            "'old', 'OLD', '{}', 0, now() from records"
        )
    assert_changed(reconcile_pipeline(path), t2)


def test_an_edited_idless_record_is_missing_and_unexpected(tmp_path):
    path = write_pipeline(tmp_path)
    run_pipeline(path)
    edit(tmp_path / ".loader" / "endclose.duckdb",
         "update records set description = 'Cash!' where id = (select max(id) from records where external_id is null)")
    result = reconcile_pipeline(path)
    assert result.summary["counts"] == {"matched": 6, "mismatched": 0, "missing_in_target": 1,
                                        "unexpected_in_target": 1}
    assert result.missing()["fingerprint"].is_not_null().all()
    assert result.unexpected()["fingerprint"].is_not_null().all()


def test_nothing_loaded_yet_is_all_missing_and_creates_no_database(tmp_path):
    path = write_pipeline(tmp_path)
    result = reconcile_pipeline(path)
    assert result.summary["counts"]["missing_in_target"] == 7
    assert result.exit_code == 1
    assert not (tmp_path / ".loader" / "endclose.duckdb").exists()


# -- the api target, against a real `loader serve` ------------------------------------------------


def _wait_final(url, bulk_request_id):
    for _ in range(200):
        status = httpx.get(f"{url}/bulk_requests/{bulk_request_id}", headers={"X-API-KEY": KEY}).json()["status"]
        if status in ("completed", "failed", "cancelled"):
            return
        time.sleep(0.05)
    raise AssertionError(f"bulk request {bulk_request_id} never finished")


def test_api_clean_then_edited_deleted_and_added(tmp_path):
    serve_dir = tmp_path / "server"
    serve_dir.mkdir()
    target = {"type": "api", "base_url": "${URL}", "api_key": "${ENDCLOSE_API_KEY}", "chunk_size": 3}
    path = write_pipeline(tmp_path, target=target)
    with running_server(serve_dir) as server:
        pipeline = lambda: load_pipeline(path, {"URL": server.url, "ENDCLOSE_API_KEY": KEY})  # noqa: E731
        httpx.post(f"{server.url}/data_streams", headers={"X-API-KEY": KEY},
                   json={"key": "ops", "name": "Operating", "type": "api"}).raise_for_status()
        # More than one page of GET /records (200 a page), all outside the source's date range.
        old = [{"date": "2023-06-01", "data_stream_key": "ops", "amount": n, "external_id": f"OLD{n}"}
               for n in range(210)]
        answer = httpx.post(f"{server.url}/records/bulk", headers={"X-API-KEY": KEY}, json={"records": old})
        _wait_final(server.url, answer.json()["id"])
        assert run_pipeline(pipeline()).exit_code == 0
        result = reconcile_pipeline(pipeline())
        assert_clean(result)
        assert result.summary["target_records"] == 7  # the old ones are outside the range
        assert result.summary["target"] == {"type": "api", "base_url": server.url}

        by_hand = {"date": "2024-01-05", "data_stream_key": "ops", "amount": 4242, "currency": "USD",
                   "direction": "credit", "external_id": "BYHAND"}
        answer = httpx.post(f"{server.url}/records/bulk", headers={"X-API-KEY": KEY}, json={"records": [by_hand]})
        _wait_final(server.url, answer.json()["id"])
    # The server holds its database: edit it between two servers.
    with duckdb.connect(str(server.database)) as con:
        t2 = con.execute("select id from records where external_id = 'T2'").fetchone()[0]
        con.execute("update records set amount = 99999 where external_id = 'T1'")
        con.execute("delete from records where external_id = 'T3'")
    with running_server(serve_dir) as server:
        result = reconcile_pipeline(load_pipeline(path, {"URL": server.url, "ENDCLOSE_API_KEY": KEY}))
        assert_changed(result, t2)


def test_api_wrong_key_is_a_target_error(tmp_path):
    from loader.errors import AuthenticationError

    serve_dir = tmp_path / "server"
    serve_dir.mkdir()
    target = {"type": "api", "base_url": "${URL}", "api_key": "wrong-key"}
    path = write_pipeline(tmp_path, target=target)
    with running_server(serve_dir) as server:
        with pytest.raises(AuthenticationError):
            reconcile_pipeline(load_pipeline(path, {"URL": server.url}))


def test_statuses_are_the_contract():
    assert STATUSES == ("matched", "mismatched", "missing_in_target", "unexpected_in_target")


def test_the_text_table_names_statuses_fields_and_totals_in_major_units(tmp_path):
    from loader.reconcile import format_reconcile_text

    path = write_pipeline(tmp_path)
    run_pipeline(path)
    edit(tmp_path / ".loader" / "endclose.duckdb", "update records set amount = 99999 where external_id = 'T1'")
    result = reconcile_pipeline(path)
    text = format_reconcile_text(result.summary)
    assert "differences found" in text and "differing fields: amount 1" in text
    assert "mismatched            1" in text
    assert "-0.125" in text and "1,017.06  differs" in text
    assert str(result.directory) in text
    assert "<table>" in result._repr_html_()
