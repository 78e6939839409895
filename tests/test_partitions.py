"""A backfill split into partitions that run at once, as separate processes, against one target."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import yaml

from conftest import pipeline_config, write_csv
from serve_fixture import running_server


def test_four_partitions_in_parallel_load_every_row_exactly_once(tmp_path):
    # 4 monthly files; a few ids cross partitions (re-exported rows), some rows have no id.
    months = ["2024-01", "2024-02", "2024-03", "2024-04"]
    expected_ids, idless = set(), 0
    for m, month in enumerate(months):
        rows = []
        for i in range(60):
            txn = f"T{m}-{i}" if i % 10 else ""
            rows.append([f"{month}-{i % 28 + 1:02d}", txn, f"row {i}", f"{m * 100 + i}.25", "USD", "DR"])
            if txn:
                expected_ids.add(txn)
            else:
                idless += 1
        if m:  # the last rows of the previous month, exported again
            rows += [[f"{months[m - 1]}-28", f"T{m - 1}-{i}", "again", "1.00", "USD", "DR"] for i in (57, 58)]
        write_csv(tmp_path / "data" / f"{month}.csv", rows)
    (tmp_path / "server").mkdir()
    with running_server(tmp_path / "server", api_keys={"k": "default"}) as server:
        httpx.post(f"{server.url}/data_streams", headers={"X-API-KEY": "k"},
                   json={"key": "ops", "name": "Ops", "type": "api"}).raise_for_status()
        config = pipeline_config(
            source={"path": "data/${MONTH}.csv"},
            dedupe={"cache": ".loader/cache-${MONTH}.duckdb"},  # one cache shard per partition
            target={"type": "api", "base_url": server.url, "api_key": "${KEY}", "chunk_size": 7, "concurrency": 2},
            report={"dir": "reports/${MONTH}"},
        )
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "KEY": "k"}
        processes = [
            subprocess.Popen([sys.executable, "-m", "loader", "run", str(path), "--var", f"MONTH={month}", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for month in months
        ]
        summaries = []
        for process in processes:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, err
            summaries.append(json.loads(out))
        held = []
        cursor = None
        while True:
            params = {"data_stream_key": "ops", "limit": 200, **({"cursor": cursor} if cursor else {})}
            page = httpx.get(f"{server.url}/records", headers={"X-API-KEY": "k"}, params=params).json()
            held += page["data"]
            cursor = page["next_cursor"]
            if not cursor:
                break
    ids = [r["external_id"] for r in held if r["external_id"] is not None]
    assert len(ids) == len(set(ids)) == len(expected_ids)  # every id once, crossing ids caught by the target
    assert set(ids) == expected_ids
    assert sum(1 for r in held if r["external_id"] is None) == idless
    for summary in summaries:
        totals = summary["totals"]
        assert totals["total"] == totals["successful"] + totals["failed"] + totals["skipped"]
        assert totals["failed"] == 0
    crossing = sum(r["rows"] for s in summaries for r in s["reasons"] if r["reason_code"] == "exists_in_target")
    assert crossing == 6  # 2 re-exported rows in each of the last 3 months
