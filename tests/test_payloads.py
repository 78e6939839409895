"""Bulk request bodies: the exact bytes the API receives."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl

from loader.payloads import encode_body


def test_body_shape_escaping_and_omitted_nulls():
    rows = pl.DataFrame({
        "date": [dt.date(2024, 1, 2), dt.date(2024, 2, 29)],
        "data_stream_key": ["ops", "ops"],
        "amount": [-1234, 5],
        "currency": ["USD", "JPY"],
        "direction": [None, "credit"],
        "description": ['a "quoted" </script>\n é', None],
        "external_id": ["X1", None],
        "metadata": ['{"k": [1, {"n": null}]}', "{}"],
    })
    body = json.loads(encode_body(rows, on_conflict="error"))
    assert body["on_conflict"] == "error"
    assert body["records"] == [
        {"date": "2024-01-02", "data_stream_key": "ops", "amount": -1234, "currency": "USD",
         "description": 'a "quoted" </script>\n é', "external_id": "X1", "metadata": {"k": [1, {"n": None}]}},
        {"date": "2024-02-29", "data_stream_key": "ops", "amount": 5, "currency": "JPY", "direction": "credit",
         "metadata": {}},
    ]
    assert isinstance(body["records"][0]["amount"], int)


def test_payload_files_replayed_with_plain_http_give_the_same_records(make_pipeline, tmp_path):
    """--payloads writes the bodies exactly as sent: POSTing them by hand loads the same records."""
    import httpx

    from conftest import run_cli
    from serve_fixture import running_server

    rows = [["2024-01-02", "T1", "Payroll", "100.50", "USD", "DR"], ["2024-01-03", "", "Fee", "0.99", "EUR", "CR"],
            ["2024-01-04", "T3", 'A "quoted" memo', "1500", "JPY", "DR"], ["2024-01-05", "T4", "x", "1.234", "BHD", "CR"],
            ["2024-01-06", "T5", "bad", "1.001", "USD", "CR"]]
    (tmp_path / "server").mkdir()
    with running_server(tmp_path / "server", api_keys={"k": "default"}) as server:
        headers = {"X-API-KEY": "k"}
        httpx.post(f"{server.url}/data_streams", headers=headers,
                   json={"key": "ops", "name": "Ops", "type": "api"}).raise_for_status()
        path = make_pipeline({"a.csv": rows}, target={"type": "api", "base_url": server.url, "api_key": "k",
                                                      "chunk_size": 2})
        payloads = tmp_path / "payloads"
        dry = run_cli("run", str(path), "--dry-run", "--payloads", str(payloads))
        assert dry.returncode == 0, dry.stderr
        files = sorted(payloads.glob("*.json"))
        assert [f.name for f in files] == ["000001.json", "000002.json"]
        for body in files:
            key = body.with_suffix(".idempotency-key").read_text().strip()
            answer = httpx.post(f"{server.url}/records/bulk", content=body.read_bytes(),
                                headers={**headers, "Idempotency-Key": key, "Content-Type": "application/json"})
            assert answer.status_code == 202, answer.text
            _wait_until_final(server.root + answer.json()["url"], headers)
        # The real run now sends the same bodies with the same keys: the server already has them.
        real = run_cli("run", str(path), "--json")
        assert real.returncode == 0, real.stderr
        summary = json.loads(real.stdout)
        assert summary["totals"] == {"total": 5, "successful": 0, "failed": 1, "skipped": 4}
        assert {(r["reason_code"], r["rows"]) for r in summary["reasons"]} == {("exists_in_target", 4), ("invalid", 1)}
        held = httpx.get(f"{server.url}/records", headers=headers,
                         params={"data_stream_key": "ops", "limit": 200}).json()["data"]
    assert sorted((r["currency"], r["amount"]) for r in held) == [("BHD", 1234), ("EUR", 99), ("JPY", 1500),
                                                                  ("USD", 10050)]


def _wait_until_final(url: str, headers: dict) -> None:
    """Poll the bulk request until the server's worker is done with it (a bounded loop on its status)."""
    import httpx

    for _ in range(2000):
        if httpx.get(url, headers=headers).json()["status"] in ("completed", "failed", "cancelled"):
            return
    raise AssertionError(f"{url} never reached a final status")
