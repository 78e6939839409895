"""A run killed with SIGKILL at any moment, then run again, loads every valid row exactly once.

`loader run` talks to a real `loader serve --latency 30` (api target,
concurrency 2, chunk_size 20). Each trial kills the run at a moment chosen by
what the run itself says (its `--log-format json` events on stderr) or by what
the server already holds (GET /bulk_requests), never by a sleep; then runs the
same command to the end and checks the served database, the report and the
cache. Rows without `external_id`, identical ones included, are the hard case:
only the Idempotency-Keys of identical chunks keep them from being loaded twice.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pytest
import yaml

from conftest import pipeline_config, write_csv
from serve_fixture import running_server

KEY = "kill-test-key"
CHUNK_SIZE = 20
WAIT_LIMIT = 60  # seconds: an upper bound on one run, never a synchronisation


def source_rows() -> tuple[list[list[str]], int]:
    """300 rows: 200 with ids, 60 distinct id-less, 2 x 18 identical id-less, 4 invalid; shuffled."""
    rows = []
    for n in range(200):
        rows.append(["2024-01-%02d" % (1 + n % 28), f"E{n:03d}", f"paid {n}", f"{n + 1}.{n % 100:02d}", "USD",
                     "DR" if n % 2 else "CR"])
    for n in range(60):
        rows.append(["2024-02-%02d" % (1 + n % 28), "", f"fee {n}", f"0.{n + 10}", "USD", "DR"])
    for _ in range(18):
        rows.append(["2024-03-01", "", "card fee", "1.00", "USD", "DR"])
        rows.append(["2024-03-02", "", "wire fee", "2.50", "EUR", "DR"])
    invalid = [["2024-04-01", "BAD1", "x", "12.345", "USD", "DR"],
               ["not a date", "BAD2", "x", "1.00", "USD", "DR"],
               ["2024-04-01", "", "x", "1,000.00", "USD", "DR"],
               ["2024-04-01", "BAD4", "x", "1.00", "XXX", "DR"]]
    rows += invalid
    random.Random(7).shuffle(rows)
    return rows, len(invalid)


def expected_counts(rows: list[list[str]], invalid: int) -> dict[tuple, int]:
    """(external_id) or (date, description, amount text, currency) -> how many records the target must hold."""
    counts: dict[tuple, int] = {}
    for date, txn_id, memo, amount, ccy, _ in rows:
        if txn_id.startswith("BAD") or date == "not a date" or "," in amount:
            continue
        key = ("id", txn_id) if txn_id else ("content", date, memo, ccy)
        counts[key] = counts.get(key, 0) + 1
    assert sum(counts.values()) == len(rows) - invalid
    return counts


def setup(tmp_path: Path, server) -> tuple[Path, int, dict]:
    rows, invalid = source_rows()
    write_csv(tmp_path / "data" / "in.csv", rows)
    config = pipeline_config(
        target={"type": "api", "base_url": server.url, "api_key": "${ENDCLOSE_API_KEY}",
                "chunk_size": CHUNK_SIZE, "concurrency": 2},
    )
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    answer = httpx.post(f"{server.url}/data_streams", headers={"X-API-KEY": KEY}, timeout=30,
                        json={"key": "ops", "name": "Ops", "type": "api"})
    assert answer.status_code == 201, answer.text
    return path, len(rows), expected_counts(rows, invalid)


def command(path: Path) -> list[str]:
    return [sys.executable, "-m", "loader", "--log-format", "json", "run", str(path), "--json"]


def env() -> dict:
    return {**os.environ, "ENDCLOSE_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}


def events_until_killed(path: Path, should_kill, server) -> list[dict]:
    """Start the run; SIGKILL it when `should_kill(events, server)` first says so; its events."""
    process = subprocess.Popen(command(path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, env=env())
    events: list[dict] = []
    pending = b""
    deadline = time.monotonic() + WAIT_LIMIT
    killed = False
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stderr.fileno(), selectors.EVENT_READ)
            while not killed:
                assert time.monotonic() < deadline, f"no kill moment within {WAIT_LIMIT}s; events: {events}"
                if should_kill(events, server):
                    process.send_signal(signal.SIGKILL)
                    killed = True
                    break
                # Event-driven kill points wait for the next line; polling ones look again at once.
                if not selector.select(0.05 if getattr(should_kill, "polls", False) else WAIT_LIMIT):
                    continue
                chunk = os.read(process.stderr.fileno(), 65536)
                if not chunk:
                    break  # the run ended before the kill moment
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    text = line.decode(errors="replace")
                    assert "Traceback" not in text, text
                    if text.strip():
                        events.append(json.loads(text))
                    if should_kill(events, server):
                        process.send_signal(signal.SIGKILL)
                        killed = True
                        break
    finally:
        if process.poll() is None and not killed:
            process.kill()
        process.wait(WAIT_LIMIT)
        process.stderr.close()
    assert killed, f"the run finished before its kill moment; events: {[e.get('event') for e in events]}"
    assert process.returncode == -signal.SIGKILL
    return events


def after_event(name: str, n: int = 1):
    def should_kill(events, server) -> bool:
        return sum(1 for e in events if e.get("event") == name) >= n
    should_kill.__name__ = f"after_{n}_{name}"
    return should_kill


def after_bulk_requests_in_target(n: int):
    """Kill once the server holds `n` bulk requests (the run is mid-send)."""
    def should_kill(events, server) -> bool:
        if not any(e.get("event") == "chunk_sent" for e in events):
            return False
        answer = httpx.get(f"{server.url}/bulk_requests", params={"limit": 100},
                           headers={"X-API-KEY": KEY}, timeout=30)
        assert answer.status_code == 200, answer.text
        return len(answer.json()["data"]) >= n
    should_kill.polls = True
    return should_kill


KILL_MOMENTS = {
    "right_after_run_start": after_event("run_start"),
    "after_first_chunk_sent": after_event("chunk_sent"),
    "after_3_bulk_requests_in_target": after_bulk_requests_in_target(3),
    "after_9_bulk_requests_in_target": after_bulk_requests_in_target(9),
    "after_first_chunk_confirmed": after_event("chunk_confirmed"),
    "after_10_chunks_confirmed": after_event("chunk_confirmed", 10),
}


def finish(path: Path) -> dict:
    result = subprocess.run(command(path), capture_output=True, text=True, env=env(), timeout=WAIT_LIMIT * 2)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr  # 4 invalid rows, within fail_on.failed_rows (1000)
    return json.loads(result.stdout)


def held_counts(database: Path) -> tuple[dict[tuple, int], set[int]]:
    with duckdb.connect(str(database), read_only=True) as con:
        rows = con.sql(
            "select id, external_id, date::varchar, description, currency from records "
            "where environment = 'default'"
        ).fetchall()
    counts: dict[tuple, int] = {}
    for _, external_id, date, description, currency in rows:
        key = ("id", external_id) if external_id else ("content", date, description, currency)
        counts[key] = counts.get(key, 0) + 1
    return counts, {row[0] for row in rows}


def cached_record_ids(cache: Path) -> list[int | None]:
    with duckdb.connect(str(cache), read_only=True) as con:
        return [r[0] for r in con.sql("select record_id from loaded_ids").fetchall()]


@pytest.mark.parametrize("moment", list(KILL_MOMENTS), ids=list(KILL_MOMENTS))
def test_a_killed_run_then_a_rerun_loads_every_valid_row_exactly_once(tmp_path, moment):
    database = tmp_path / "serve.duckdb"
    with running_server(tmp_path, api_keys={KEY: "default"}, extra_args=("--latency", "30")) as server:
        path, total, expected = setup(tmp_path, server)
        events = events_until_killed(path, KILL_MOMENTS[moment], server)
        assert events and events[0]["event"] == "run_start"
        left_behind = list((tmp_path / ".loader").glob("loader-run-*"))
        assert left_behind, "the killed run's scratch folder"
        summary = finish(path)
    # The rerun removed the scratch folder of the killed run, and its own when it ended.
    assert not list((tmp_path / ".loader").glob("loader-run-*"))
    held, record_ids = held_counts(database)

    # The target holds every valid source row exactly once: no row lost, none loaded twice.
    twice = {k: v for k, v in held.items() if v > expected.get(k, 0)}
    lost = {k: v for k, v in expected.items() if held.get(k, 0) < v}
    assert not twice, f"loaded more than once (key: records held): {twice}"
    assert not lost, f"never loaded (key: rows expected): {lost}"
    assert held == expected

    # The second run's report accounts for every source row.
    totals = summary["totals"]
    assert totals["total"] == total == totals["successful"] + totals["failed"] + totals["skipped"]
    reasons = {(r["outcome"], r["reason_code"]): r["rows"] for r in summary["reasons"]}
    assert reasons.get(("failed", "invalid")) == 4
    assert totals["failed"] == 4  # nothing unprocessed, rejected or conflicting
    assert summary["error"] is None

    # The cache agrees with the target: every record the target holds is in the cache.
    cached = cached_record_ids(tmp_path / ".loader" / "cache.duckdb")
    assert len(cached) == len(set(cached)) == len(record_ids), "one cache entry per record held"
    assert set(cached) == record_ids


def test_serve_logs_no_traceback_when_a_client_dies_mid_body(tmp_path):
    """A client killed while it sends a bulk request body (as SIGKILL does to `loader run`) is
    not the server's error: `loader serve` must answer nothing and log no traceback.
    """
    import socket

    with running_server(tmp_path, api_keys={KEY: "default"}) as server:
        url = httpx.URL(server.url)
        body = json.dumps({"records": [{"data_stream_key": "ops", "date": "2024-01-01", "amount": 1}]}).encode()
        with socket.create_connection((url.host, url.port), timeout=30) as conn:
            conn.sendall(
                f"POST {url.path}/records/bulk HTTP/1.1\r\nHost: {url.host}\r\nX-API-KEY: {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body) + 1000}\r\n\r\n".encode()
                + body
            )
        # The server is still healthy, and has recorded nothing for the half-sent request.
        answer = httpx.get(f"{server.url}/bulk_requests", headers={"X-API-KEY": KEY}, timeout=30)
        assert answer.status_code == 200 and answer.json()["data"] == []
    # running_server fails the test here if the server logged a traceback.
