"""Benchmark: `loader reconcile` of N rows against a real `loader serve` (GET /records, paged).

Setup, untimed: bench/generate.py writes the source; a `run` into a local target
loads it straight into the database file that `loader serve` then serves (the
engine, no HTTP). Timed: one reconcile_pipeline of the api target (source read,
map, validate, dedupe; every GET /records page; the join; the files), and,
apart, the fetch alone.

    python bench/reconcile_1m.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from generate import bench_pipeline

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
KEY = "bench-key"

LOCAL = {"type": "local", "database": "state/serve.duckdb",
         "streams": [{"key": "bank_operating", "name": "Bank operating"}]}
API = {"type": "api", "base_url": "${URL}", "api_key": "${KEY}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    from loader.config import load_pipeline
    from loader.reconcile import reconcile_pipeline
    from loader.run import make_target, run_pipeline

    source = DATA / f"rows_{args.rows}.csv"
    if not source.exists():
        subprocess.run([sys.executable, str(HERE / "generate.py"), str(args.rows), str(source)], check=True)
    work = Path(tempfile.mkdtemp(prefix="loader-bench-reconcile-"))
    try:
        (work / "local.yaml").write_text(bench_pipeline("bench_reconcile", source, LOCAL))
        (work / "api.yaml").write_text(bench_pipeline("bench_reconcile", source, API))
        start = time.perf_counter()
        loaded = run_pipeline(work / "local.yaml")
        print(f"setup: loaded {loaded.report.totals['successful']:,} records into the engine "
              f"in {time.perf_counter() - start:.1f} s (untimed)")

        server = subprocess.Popen(
            [sys.executable, "-m", "loader", "serve", "--database", str(work / "state" / "serve.duckdb"),
             "--port", "0", "--api-key", f"{KEY}=default"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            url = None
            for line in server.stdout:  # type: ignore[union-attr]
                match = re.match(r"^loader serve listening on (http://\S+)$", line.strip())
                if match:
                    url = match.group(1) + "/v1"
                    break
            if url is None:
                raise SystemExit("loader serve did not start")
            pipeline = load_pipeline(work / "api.yaml", {"URL": url, "KEY": KEY})

            target = make_target(pipeline)
            start = time.perf_counter()
            from datetime import date

            fetched = target.records_for(["bank_operating"], date(2024, 1, 1), date(2024, 12, 31))
            target.close()
            fetch = time.perf_counter() - start
            print(f"fetch alone: {fetched.height:,} records in {fetch:.1f} s ({fetched.height / fetch:,.0f} records/s)")

            start = time.perf_counter()
            result = reconcile_pipeline(pipeline)
            seconds = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(30)
        records = result.summary["target_records"]
        print(f"reconcile: {result.summary['source']['rows']:,} source rows, {records:,} target records "
              f"in {seconds:.1f} s ({records / seconds:,.0f} records/s); counts {result.summary['counts']}; "
              f"exit {result.exit_code}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
