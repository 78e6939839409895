"""Benchmark: a backfill. `loader run` on the local target keeps memory bounded and time linear in rows.

For each size: the generated CSV (bench/generate.py: 1% invalid rows, 1%
repeated ids), its first half loaded by an untimed priming run (so half the
ids are already in the cache, as in run_local.py), then per trial the timed
`loader run pipeline.yaml` from a fresh copy of that primed state, and the
floor on the same file (Polars reads the CSV, DuckDB inserts it in one
statement). Wall seconds and peak memory (max RSS of the child process) are
medians / maxima over the trials of each size; sizes run one after another in
the same invocation, so their ratios compare like with like.

    python bench/backfill.py [--sizes 1000000,10000000] [--trials 1 | --trials 3,1]

Targets: the largest size takes at most 1.1x its row ratio of the smallest's
time (10M at most 11x of 1M); peak memory of the largest at most 1.3x the
smallest's and under 2 GB.

Work folders are bench/out/backfill_<rows>/; data is bench/data/rows_<rows>.csv
(shared with run_local.py, generated once, in chunks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from run_local import OUT, ensure_data, floor_trial, loader_trial, prepare_work

TIME_SLACK = 1.1  # 10x the rows may take 11x the time
MEMORY_RATIO = 1.3
MEMORY_LIMIT_MB = 2048


def int_list(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def last_summary(work: Path) -> dict:
    """summary.json of the newest run in the work folder's reports."""
    summaries = sorted((work / "reports").glob("*/*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not summaries:
        raise SystemExit(f"no report under {work / 'reports'}: did the run fail?")
    return json.loads(summaries[-1].read_text())


def reason_rows(summary: dict, outcome: str, reason_code: str) -> int:
    return sum(r["rows"] for r in summary["reasons"] if (r["outcome"], r["reason_code"]) == (outcome, reason_code))


def measure(rows: int, trials: int) -> dict:
    started = time.perf_counter()
    full, prime = ensure_data(rows)
    work = OUT / f"backfill_{rows}"
    prepare_work(work, full, prime)
    prepared = time.perf_counter() - started
    loader_runs, floor_runs, summaries = [], [], []
    for _ in range(trials):
        loader_runs.append(loader_trial(work))
        summaries.append(last_summary(work))
        floor_runs.append(floor_trial(work, full))
    totals = summaries[-1]["totals"]
    if totals["total"] != rows:
        raise SystemExit(f"{rows:,} rows: the run reported {totals['total']:,} rows")
    return {
        "rows": rows,
        "trials": trials,
        "prepare_s": prepared,
        "loader_s": statistics.median(w for w, _ in loader_runs),
        "floor_s": statistics.median(w for w, _ in floor_runs),
        "loader_mb": max(m for _, m in loader_runs),
        "floor_mb": max(m for _, m in floor_runs),
        "loader_trials": [w for w, _ in loader_runs],
        "floor_trials": [w for w, _ in floor_runs],
        "created": reason_rows(summaries[-1], "successful", "created"),
        "already_loaded": reason_rows(summaries[-1], "skipped", "already_loaded"),
        "invalid": reason_rows(summaries[-1], "failed", "invalid"),
    }


def memory_trace(rows: int, every_s: float = 1.0) -> list[tuple[float, int]]:
    """One more run of the largest size, its RSS (MB) sampled every `every_s` seconds: flat is bounded."""
    import shutil
    import subprocess
    import sys
    import threading

    work = OUT / f"backfill_{rows}"
    shutil.rmtree(work / "state", ignore_errors=True)
    shutil.copytree(work / "primed", work / "state")
    proc = subprocess.Popen([sys.executable, "-m", "loader", "run", str(work / "pipeline.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started, samples, tick = time.perf_counter(), [], threading.Event()
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            break
        rss = next((int(line.split()[1]) // 1024 for line in status.splitlines() if line.startswith("VmRSS")), 0)
        samples.append((time.perf_counter() - started, rss))
        tick.wait(every_s)
    return samples


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int_list, default=[1_000_000, 10_000_000],
                        help="comma-separated row counts (default 1000000,10000000)")
    parser.add_argument("--trials", type=int_list, default=[1],
                        help="trials per size: one number for every size, or one per size (e.g. 3,1)")
    parser.add_argument("--trace-memory", action="store_true",
                        help="then run the largest size once more, printing its RSS over time")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    if len(args.trials) not in (1, len(sizes)):
        parser.error("--trials takes one number, or one per size")
    trials = args.trials * len(sizes) if len(args.trials) == 1 else args.trials

    results = [measure(rows, n) for rows, n in zip(sizes, trials)]

    print("loader run, local target, end to end; half of each file's ids already in the cache "
          "(1% invalid, 1% repeated ids)")
    header = (f"{'rows':>12} {'trials':>6} {'floor s':>8} {'loader s':>9} {'loader/floor':>12} {'us/row':>7} "
              f"{'loader MB':>10} {'floor MB':>9} {'created':>10} {'already':>10} {'invalid':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['rows']:>12,} {r['trials']:>6} {r['floor_s']:>8.2f} {r['loader_s']:>9.2f} "
              f"{r['loader_s'] / r['floor_s']:>12.2f} {r['loader_s'] / r['rows'] * 1e6:>7.2f} "
              f"{r['loader_mb']:>10.0f} {r['floor_mb']:>9.0f} {r['created']:>10,} {r['already_loaded']:>10,} "
              f"{r['invalid']:>8,}")
    for r in results:
        print(f"  {r['rows']:,} rows: loader trials "
              + ", ".join(f"{w:.2f}" for w in r["loader_trials"]) + " s; floor trials "
              + ", ".join(f"{w:.2f}" for w in r["floor_trials"]) + f" s; data + priming {r['prepare_s']:.0f} s")
        # Each trial times the loader and then the floor, seconds apart: the ratio within a trial
        # is less exposed to the machine's drift than the ratio of the two medians (the table's).
        paired = sorted(lw / fw for lw, fw in zip(r["loader_trials"], r["floor_trials"]))
        print(f"  {r['rows']:,} rows: loader/floor per trial " + ", ".join(f"{x:.2f}" for x in paired)
              + f"; median {statistics.median(paired):.2f}")
    if len(results) > 1:
        small, large = results[0], results[-1]
        row_ratio = large["rows"] / small["rows"]
        time_ratio = large["loader_s"] / small["loader_s"]
        floor_ratio = large["floor_s"] / small["floor_s"]
        memory_ratio = large["loader_mb"] / small["loader_mb"]
        print(f"largest / smallest ({large['rows']:,} / {small['rows']:,} rows):")
        print(f"  rows {row_ratio:.1f}x; loader time {time_ratio:.2f}x (floor time {floor_ratio:.2f}x); "
              f"target at most {row_ratio * TIME_SLACK:.1f}x: {verdict(time_ratio <= row_ratio * TIME_SLACK)}")
        print(f"  loader peak memory {memory_ratio:.2f}x ({small['loader_mb']:.0f} -> {large['loader_mb']:.0f} MB); "
              f"target at most {MEMORY_RATIO}x and under {MEMORY_LIMIT_MB} MB: "
              f"{verdict(memory_ratio <= MEMORY_RATIO and large['loader_mb'] < MEMORY_LIMIT_MB)}")

    if args.trace_memory:
        samples = memory_trace(sizes[-1])
        print(f"RSS of one more {sizes[-1]:,}-row run, every second (MB):")
        print("  " + " ".join(f"{mb}" for _, mb in samples))
        middle = [mb for t, mb in samples if 0.1 * samples[-1][0] <= t <= 0.9 * samples[-1][0]]
        if middle:
            print(f"  from 10% to 90% of the run: min {min(middle)} MB, max {max(middle)} MB")


if __name__ == "__main__":
    main()
