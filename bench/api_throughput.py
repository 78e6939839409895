"""Benchmark: records per second through the `api` target against `loader serve`.

    /work/venv/bin/python bench/api_throughput.py [--rows 40000] [--concurrency 1 4 8] [--latency 0 50]

For each added server latency, starts `loader serve` on a free port with a
fresh database, then sends the same number of new records (1000 per bulk
request) through `HttpTarget.send` at each concurrency. Prints records per
second, the client's CPU time per 1000 records (time.process_time of this
process around send: encoding, httpx, JSON pages, frames), and the speed-up
of concurrency 4 over 1 at 50 ms. The server's CPU time per 1000 records
(from /proc) shows when the server, not the client, is the limit: both share
this machine's cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
import polars as pl

from loader.chunk import plan_chunks
from loader.targets.http import HttpTarget

KEY = "bench-key"
STREAM = "bench_operating"


def start_server(database: Path, latency_ms: int) -> tuple[subprocess.Popen, str]:
    """`loader serve` on a free port; returns the process and its base URL (with /v1)."""
    command = [sys.executable, "-m", "loader", "serve", "--database", str(database), "--port", "0",
               "--api-key", KEY]
    if latency_ms:
        command += ["--latency", str(latency_ms)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline() if process.stdout else ""
    found = re.search(r"(https?://\S+)", line)
    if not found:
        process.kill()
        raise SystemExit(f"loader serve did not start: {line}{process.stderr.read() if process.stderr else ''}")
    url = found.group(1).rstrip("/")
    return process, url if url.endswith("/v1") else url + "/v1"


def mapped_rows(rows: int, prefix: str) -> pl.DataFrame:
    """Rows as the pipeline hands them to a target: mapped, valid, keyed."""
    n = pl.int_range(0, rows, eager=True)
    frame = pl.DataFrame({"n": n}).select(
        date=pl.lit(date(2024, 1, 1)) + pl.duration(days=pl.col("n") % 365),
        data_stream_key=pl.lit(STREAM),
        amount=(pl.col("n") * 7919) % 1_000_000 - 500_000,
        currency=pl.when(pl.col("n") % 10 == 0).then(pl.lit("EUR")).otherwise(pl.lit("USD")),
        direction=pl.when(pl.col("n") % 2 == 0).then(pl.lit("credit")).otherwise(pl.lit("debit")),
        description=pl.format("payment {} to supplier", pl.col("n")),
        external_id=pl.format(f"{prefix}-{{}}", pl.col("n")),
        metadata=pl.format('{{"batch": {}}}', pl.col("n") // 1000),
    )
    # Any distinct key per row will do here: the chunks' Idempotency-Keys derive from it.
    return frame.with_columns(
        key_hi=pl.col("external_id").hash(seed=1), key_lo=pl.col("external_id").hash(seed=2)
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_trial(url: str, server_pid: int, rows: int, concurrency: int, prefix: str) -> dict:
    target = HttpTarget(url, KEY, concurrency=concurrency)
    try:
        target.prepare()
        _, chunks = plan_chunks(mapped_rows(rows, prefix), chunk_size=1000, target_key=target.target_key,
                                on_conflict="skip")
        server_cpu = cpu_seconds(server_pid)
        cpu, wall = time.process_time(), time.perf_counter()
        result = target.send(chunks, on_conflict="skip")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        server_cpu = cpu_seconds(server_pid) - server_cpu
    finally:
        target.close()
    created = result.items.filter(pl.col("status") == "successful").height
    if created != rows:
        raise SystemExit(f"expected {rows} records created, the server reports {created}")
    return {"seconds": wall, "rows_per_second": rows / wall, "cpu_ms_per_1000": cpu * 1000 / (rows / 1000),
            "server_cpu_ms_per_1000": server_cpu * 1000 / (rows / 1000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000, help="records per trial (default 40000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--latency", type=int, nargs="+", default=[0, 50], help="added server latency, ms")
    args = parser.parse_args()

    results: dict[tuple[int, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="loader-bench-api-") as folder:
        for latency in args.latency:
            process, url = start_server(Path(folder) / f"latency_{latency}.duckdb", latency)
            try:
                httpx.post(f"{url}/data_streams", headers={"X-API-KEY": KEY},
                           json={"key": STREAM, "name": "Bench", "type": "api"}).raise_for_status()
                for concurrency in args.concurrency:
                    results[latency, concurrency] = one_trial(url, process.pid, args.rows, concurrency,
                                                              f"l{latency}-c{concurrency}")
            finally:
                process.terminate()
                process.wait(timeout=30)

    print(f"{args.rows} records per trial, 1000 per bulk request, loader serve on 127.0.0.1")
    print(f"{'latency':>8} {'concurrency':>11} {'seconds':>8} {'records/s':>10} {'client CPU ms/1000':>19} "
          f"{'server CPU ms/1000':>19}")
    for (latency, concurrency), r in results.items():
        print(f"{latency:>6}ms {concurrency:>11} {r['seconds']:>8.2f} {r['rows_per_second']:>10.0f} "
              f"{r['cpu_ms_per_1000']:>19.1f} {r['server_cpu_ms_per_1000']:>19.1f}")
    for latency in args.latency:
        if (latency, 1) in results and (latency, 4) in results:
            ratio = results[latency, 4]["rows_per_second"] / results[latency, 1]["rows_per_second"]
            print(f"c4/c1 at {latency} ms: {ratio:.2f}x")


if __name__ == "__main__":
    main()
