"""Benchmark: `loader run` on the local target end to end, against the floor, in one run.

The floor is what the machine needs at least: a process that reads the same
CSV with Polars and inserts it into a fresh DuckDB file in one statement. The
loader run gets the harder job: 1% invalid rows, 1% repeated ids and half of
the ids already in the cache (primed by an earlier, untimed run), so it
validates, dedupes, applies the bulk semantics and writes the report.

    python bench/run_local.py --rows 1000000 --trials 3

Prints each figure's median, peak memory (max RSS of the process) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from generate import bench_pipeline, write_first_half, write_rows

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
OUT = HERE / "out"

FLOOR = textwrap.dedent("""
    import sys, duckdb, polars as pl
    frame = pl.read_csv(sys.argv[1], infer_schema=False)
    con = duckdb.connect(sys.argv[2])
    con.execute("create table records as select * from frame")
    con.close()
""")

LOCAL_TARGET = {"type": "local", "database": "state/endclose.duckdb",
                "streams": [{"key": "bank_operating", "name": "Bank operating"}]}


def timed(cmd: list[str], *, cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"{cmd} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, usage.ru_maxrss / 1024


def ensure_data(rows: int) -> tuple[Path, Path]:
    """The generated CSV of `rows` rows and its first half (for priming), written once, in chunks."""
    full, prime = DATA / f"rows_{rows}.csv", DATA / f"rows_{rows}_first_half.csv"
    if not full.exists():
        write_rows(rows, full, prime)
    elif not prime.exists():
        write_first_half(full, prime, rows // 2)
    return full, prime


def prepare_work(work: Path, full: Path, prime: Path) -> Path:
    """A fresh `work` folder whose `primed/` state holds the first half of the file; returns pipeline.yaml.

    The priming run is untimed. It uses the same paths the timed run uses (the
    cache is keyed by the database's path); its state folder becomes `primed/`,
    which each trial copies back to `state/`.
    """
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "prime.yaml").write_text(bench_pipeline("bench_local", prime, LOCAL_TARGET))
    primed = subprocess.run([sys.executable, "-m", "loader", "run", str(work / "prime.yaml")], check=False,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if primed.returncode not in (0, 1):
        raise SystemExit(f"the priming run failed ({primed.returncode}): {primed.stderr.decode()}")
    (work / "state").rename(work / "primed")
    shutil.rmtree(work / "reports", ignore_errors=True)
    (work / "pipeline.yaml").write_text(bench_pipeline("bench_local", full, LOCAL_TARGET))
    return work / "pipeline.yaml"


def loader_trial(work: Path, primed: str = "primed") -> tuple[float, float]:
    """`loader run pipeline.yaml` from a fresh copy of the `primed` state folder: (wall s, peak MB)."""
    shutil.rmtree(work / "state", ignore_errors=True)
    shutil.copytree(work / primed, work / "state")
    return timed([sys.executable, "-m", "loader", "run", str(work / "pipeline.yaml")])


def floor_trial(work: Path, full: Path) -> tuple[float, float]:
    """The floor on the same CSV, into a fresh DuckDB file: (wall s, peak MB)."""
    floor_db = work / "floor.duckdb"
    floor_db.unlink(missing_ok=True)
    return timed([sys.executable, "-c", FLOOR, str(full), str(floor_db)])


def run_trial(work: Path, full: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    """One trial: the loader run, then the floor."""
    return loader_trial(work), floor_trial(work, full)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    full, prime = ensure_data(args.rows)
    work = OUT / f"local_{args.rows}"
    prepare_work(work, full, prime)
    loader_runs, floor_runs = [], []
    for _ in range(args.trials):
        loader_run, floor_run = run_trial(work, full)
        loader_runs.append(loader_run)
        floor_runs.append(floor_run)
    loader_s = statistics.median(w for w, _ in loader_runs)
    floor_s = statistics.median(w for w, _ in floor_runs)
    print(f"rows: {args.rows:,} (1% invalid, 1% repeated ids, 50% already in the cache); trials: {args.trials}")
    print(f"floor  (polars read + one DuckDB insert): {floor_s:6.2f} s  peak {max(m for _, m in floor_runs):6.0f} MB")
    print(f"loader run, local target, end to end:    {loader_s:6.2f} s  peak {max(m for _, m in loader_runs):6.0f} MB")
    print(f"ratio loader / floor: {loader_s / floor_s:.2f}")
    print("trials (loader s / floor s): " + ", ".join(f"{lw:.2f}/{fw:.2f}" for (lw, _), (fw, _) in
                                                     zip(loader_runs, floor_runs)))


if __name__ == "__main__":
    main()
