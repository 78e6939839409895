"""`loader cache sync`: ids loaded by other means become `already_loaded`, on both targets."""

from __future__ import annotations

import json

import duckdb
import httpx
import yaml
from conftest import pipeline_config, run_cli, summary_of, write_csv
from serve_fixture import running_server

from loader.cache_sync import pipeline_streams, sync_cache
from loader.config import load_pipeline
from loader.engine import BulkSubmission, Engine
from loader.engine.normalize import normalize_json_records

ROWS = [
    ["2024-01-02", "T1", "Payroll", "100.50", "USD", "DR"],
    ["2024-01-03", "T2", "Refund", "20", "EUR", "CR"],
    ["2024-01-04", "T3", "Vendor", "1500", "JPY", "DR"],
]
# What someone loaded by other means: the same three records, as the API's JSON.
ELSEWHERE = [
    {"date": "2024-01-02", "data_stream_key": "ops", "amount": 10050, "currency": "USD", "external_id": "T1"},
    {"date": "2024-01-03", "data_stream_key": "ops", "amount": 2000, "currency": "EUR", "external_id": "T2"},
    {"date": "2024-01-04", "data_stream_key": "ops", "amount": 1500, "currency": "JPY", "external_id": "T3"},
]


def write_pipeline(folder, rows=ROWS, **overrides):
    write_csv(folder / "data" / "a.csv", rows)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(**overrides), sort_keys=False))
    return path


def bulk_requests(database) -> int:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.sql("select count(*) from bulk_requests").fetchall()[0][0]


def load_elsewhere_local(database):
    with Engine.open(database) as engine:
        engine.ensure_environment("default")
        engine.ensure_streams("default", [{"key": "ops", "name": "Operating"}])
        records = normalize_json_records(json.dumps(ELSEWHERE))
        engine.submit("default", [BulkSubmission(records=records, on_conflict="skip", idempotency_key=None,
                                                 source="script")], process=True)


def test_local_sync_then_run_reports_already_loaded_and_sends_nothing(tmp_path):
    path = write_pipeline(tmp_path)
    database = tmp_path / ".loader" / "endclose.duckdb"
    load_elsewhere_local(database)

    synced = run_cli("cache", "sync", str(path), "--json")
    assert synced.returncode == 0, synced.stderr
    assert summary_of(synced) == {"added": 3, "seen": 3}
    again = sync_cache(load_pipeline(path))
    assert again == {"added": 0, "seen": 3}  # already known: nothing twice

    result = run_cli("run", str(path), "--json")
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["totals"] == {"total": 3, "successful": 0, "failed": 0, "skipped": 3}
    assert summary["reasons"] == [{"outcome": "skipped", "reason_code": "already_loaded", "rows": 3}]
    assert summary["bulk_requests"] == []
    assert bulk_requests(database) == 1  # only the load by other means


def test_without_sync_the_target_skips_them_instead(tmp_path):
    path = write_pipeline(tmp_path)
    load_elsewhere_local(tmp_path / ".loader" / "endclose.duckdb")
    summary = summary_of(run_cli("run", str(path), "--json"))
    assert summary["reasons"] == [{"outcome": "skipped", "reason_code": "exists_in_target", "rows": 3}]


def test_sync_of_a_missing_database_adds_nothing_and_creates_nothing(tmp_path):
    path = write_pipeline(tmp_path)
    assert sync_cache(load_pipeline(path)) == {"added": 0, "seen": 0}
    assert not (tmp_path / ".loader" / "endclose.duckdb").exists()


def test_streams_from_a_column_are_read_from_the_source(tmp_path):
    rows = [["2024-01-02", "T1", "x", "1", "USD", "DR", "ops"], ["2024-01-02", "T2", "x", "1", "USD", "DR", ""],
            ["2024-01-02", "T3", "x", "1", "USD", "DR", "payroll"]]
    write_csv(tmp_path / "data" / "a.csv", rows, header=["posted", "txn_id", "memo", "amount", "ccy", "dr_cr",
                                                          "stream"])
    config = pipeline_config(mapping__data_stream_key={"column": "stream", "default": "fallback"},
                             target__streams=[{"key": "declared", "name": "Declared"}])
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert pipeline_streams(load_pipeline(path)) == ["declared", "fallback", "ops", "payroll"]


def test_ids_of_other_streams_and_environments_are_not_synced(tmp_path):
    path = write_pipeline(tmp_path)
    database = tmp_path / ".loader" / "endclose.duckdb"
    with Engine.open(database) as engine:
        for environment in ("default", "sandbox"):
            engine.ensure_environment(environment)
            engine.ensure_streams(environment, [{"key": "ops", "name": "Ops"}, {"key": "other", "name": "Other"}])
        other = [{**record, "data_stream_key": "other"} for record in ELSEWHERE]
        for environment, records in (("default", other), ("sandbox", ELSEWHERE)):
            engine.submit(environment, [BulkSubmission(records=normalize_json_records(json.dumps(records)), on_conflict="skip",
                                                       idempotency_key=None, source="script")], process=True)
    assert sync_cache(load_pipeline(path)) == {"added": 0, "seen": 0}


# -- the api target, against a real `loader serve` --------------------------------------------

def test_api_sync_then_run_reports_already_loaded_and_sends_nothing(tmp_path):
    (tmp_path / "server").mkdir()
    with running_server(tmp_path / "server") as server:
        headers = {"X-API-KEY": "test-key"}
        httpx.post(f"{server.url}/data_streams", headers=headers,
                   json={"key": "ops", "name": "Operating", "type": "api"}).raise_for_status()
        # Loaded by other means: a direct POST, more than one page of GET /records (200) in all.
        many = ELSEWHERE + [{"date": "2024-02-01", "data_stream_key": "ops", "amount": n, "external_id": f"X{n}"}
                            for n in range(250)]
        answer = httpx.post(f"{server.url}/records/bulk", headers=headers, json={"records": many})
        assert answer.status_code == 202, answer.text
        _wait_final(server.url, headers, answer.json()["id"])

        path = write_pipeline(tmp_path, target={"type": "api", "base_url": server.url, "api_key": "${ENDCLOSE_API_KEY}",
                                                "chunk_size": 3})
        env = {**_environ(), "ENDCLOSE_API_KEY": "test-key"}
        synced = run_cli("cache", "sync", str(path), "--json", env=env)
        assert synced.returncode == 0, synced.stderr
        assert summary_of(synced) == {"added": 253, "seen": 253}

        result = run_cli("run", str(path), "--json", env=env)
        assert result.returncode == 0, result.stderr
        summary = summary_of(result)
        assert summary["reasons"] == [{"outcome": "skipped", "reason_code": "already_loaded", "rows": 3}]
        assert summary["bulk_requests"] == []
        listed = httpx.get(f"{server.url}/bulk_requests", headers=headers, params={"limit": 200}).json()
        assert len(listed["data"]) == 1  # only the direct POST


def _wait_final(url, headers, bulk_request_id):
    import time

    for _ in range(200):
        status = httpx.get(f"{url}/bulk_requests/{bulk_request_id}", headers=headers).json()["status"]
        if status in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"bulk request {bulk_request_id} never finished")


def _environ():
    import os

    return dict(os.environ)
