"""Time one Engine.submit of N rows (1000-row requests) against a plain Arrow INSERT.

    /work/venv/bin/python bench/engine_submit.py [N] [--repeat R]

Prints, for the same generated Arrow table in the same run: a plain
`INSERT INTO t SELECT * FROM arrow` into a fresh table of a fresh file, one
`submit` of all requests into a fresh engine file (validation, conflicts,
ids, records, items, counters), a second submit of the same rows on top
(every external_id then conflicts), and the ratios. Medians of R runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from loader.engine import RECORD_COLUMNS, BulkSubmission, Engine

STREAMS = [f"stream_{n}" for n in range(5)]


def generate(rows: int) -> pa.Table:
    """Records like a bank feed: 1% repeated external ids, 0.5% bad dates, some without id."""
    n = pl.int_range(0, rows, eager=True)
    # Every 100th row (n % 100 == 1) repeats the row before it: same stream, same id.
    base = pl.when(pl.col("n") % 100 == 1).then(pl.col("n") - 1).otherwise(pl.col("n"))
    frame = pl.DataFrame({"n": n}).select(
        date=pl.when(pl.col("n") % 200 == 7)
        .then(pl.lit("2023-02-30"))
        .otherwise(pl.lit("2023-01-01").str.to_date() + pl.duration(days=pl.col("n") % 365))
        .cast(pl.String),
        data_stream_key=pl.lit(pl.Series(STREAMS)).gather(base % len(STREAMS)),
        amount=(pl.col("n") * 7919) % 1_000_000 - 500_000,
        currency=pl.when(pl.col("n") % 10 == 0).then(pl.lit("eur")).otherwise(None),
        direction=pl.when(pl.col("n") % 2 == 0).then(pl.lit("credit")).otherwise(pl.lit("debit")),
        description=pl.format("payment {} to supplier", pl.col("n")),
        external_id=pl.when(pl.col("n") % 50 == 3).then(None).otherwise(pl.format("txn-{}", base)),
        metadata=pl.when(pl.col("n") % 3 == 0).then(pl.format('{{"batch": {}}}', pl.col("n") // 1000)).otherwise(None),
        input_error=pl.lit(None, pl.String),
    )
    return frame.to_arrow().cast(RECORD_COLUMNS)


def plain_insert(table: pa.Table, folder: Path) -> float:
    con = duckdb.connect(str(folder / "plain.duckdb"))
    con.execute(
        "CREATE TABLE plain (date VARCHAR, data_stream_key VARCHAR, amount BIGINT, currency VARCHAR, "
        "direction VARCHAR, description VARCHAR, external_id VARCHAR, metadata VARCHAR, input_error VARCHAR)"
    )
    con.register("arrow_input", table)
    started = time.perf_counter()
    con.execute("BEGIN TRANSACTION")
    con.execute("INSERT INTO plain SELECT * FROM arrow_input")
    con.execute("COMMIT")
    elapsed = time.perf_counter() - started
    con.close()
    return elapsed


def engine_submits(table: pa.Table, folder: Path, request_rows: int) -> tuple[float, float, list[dict]]:
    submissions = [
        BulkSubmission(table.slice(offset, request_rows), on_conflict="skip", idempotency_key=None, source="bench")
        for offset in range(0, table.num_rows, request_rows)
    ]
    with Engine.open(folder / "engine.duckdb") as engine:
        engine.ensure_streams("bench", [{"key": key, "name": key} for key in STREAMS])
        started = time.perf_counter()
        first = engine.submit("bench", submissions)
        first_elapsed = time.perf_counter() - started
        started = time.perf_counter()
        engine.submit("bench", submissions)
        second_elapsed = time.perf_counter() - started
    return first_elapsed, second_elapsed, first


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", type=int, default=500_000)
    parser.add_argument("--request-rows", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    table = generate(args.rows)
    plain, first, second = [], [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="engine-bench-") as folder:
            plain.append(plain_insert(table, Path(folder)))
            one, two, summaries = engine_submits(table, Path(folder), args.request_rows)
            first.append(one)
            second.append(two)
    totals = {k: sum(s[k] for s in summaries) for k in ("successful_items", "failed_items", "skipped_items")}
    requests = len(summaries)
    p, f, s = statistics.median(plain), statistics.median(first), statistics.median(second)
    print(f"rows {args.rows:,} in {requests} requests of <= {args.request_rows}; medians of {args.repeat} runs")
    print(f"first submit outcome: {totals}")
    print(f"plain INSERT of the Arrow table       {p:7.3f} s")
    print(f"engine submit, empty database        {f:7.3f} s   ratio {f / p:5.2f}x")
    print(f"engine submit again (all conflict)   {s:7.3f} s   ratio {s / p:5.2f}x")


if __name__ == "__main__":
    sys.exit(main())
