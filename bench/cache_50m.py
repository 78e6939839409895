"""Benchmark: a large cache does not slow the run.

The same 1M-row `loader run` on the local target (bench/generate.py data: 1%
invalid rows, 1% repeated ids) is timed from two states, alternating trial by
trial (and which goes first):

  (a) the state primed by an untimed run of the first half of the file, as in
      run_local.py: about 490,000 ids in the cache;
  (b) that same state plus 50,000,000 extra ids of the same target in its
      `loaded_ids` table (the `dedupe.cache` DuckDB file).

    python bench/cache_50m.py [--rows 1000000] [--extra-ids 50000000] [--trials 3]

Target: (b) takes at most 1.5x the time of (a).

The extra ids are synthetic: one INSERT ... SELECT in DuckDB writes rows with
key_hi/key_lo = the two 64-bit halves of md5('bench-extra' \\x1f n), the
target_id the primed file already uses for this target, and made-up
bulk_request_id/record_id values. That is equivalent to a cache filled by
real runs because the cache is only ever looked up by its two key columns
(`loaded_ids semi join keys using (key_hi, key_lo)`, loader/cache.py), and
real keys are md5 halves too: just as uniformly spread and unordered, so
neither the synthetic nor the real ones let DuckDB skip row groups. The texts
hashed here cannot be the key text of a row (those start with a 16-character
target tag, see loader/dedupe.py), so no extra id matches a row of the file:
both states give the same outcomes, which the script checks. The extra rows
are appended after the primed ones; order does not matter to the semi join.

The state with the extra ids is built once per invocation (bench/out/
cache_<rows>_plus_<extra>/primed_big/) and each trial copies it, as run_local.py
copies the primed state.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import duckdb
from backfill import last_summary
from run_local import OUT, ensure_data, loader_trial, prepare_work

RATIO_TARGET = 1.5
STATES = ("primed", "primed_big")


def add_extra_ids(cache_file: Path, extra: int) -> float:
    """Append `extra` synthetic ids of the file's one target to `loaded_ids`; returns the seconds it took."""
    started = time.perf_counter()
    con = duckdb.connect(str(cache_file))
    try:
        targets = con.execute("select id, target_key from cache_targets").fetchall()
        if len(targets) != 1:
            raise SystemExit(f"{cache_file}: expected the primed run's one target in cache_targets, found {targets}")
        target_id = targets[0][0]
        con.execute(
            """
            insert into loaded_ids (key_hi, key_lo, target_id, bulk_request_id, record_id)
            select (h >> 64)::ubigint, (h & 18446744073709551615::uhugeint)::ubigint, $target_id,
                   1000000000 + n // 1000, 1000000000000 + n
            from (select n, md5_number('bench-extra' || chr(31) || n::varchar) as h from range($extra) t(n))
            """,
            {"target_id": target_id, "extra": extra},
        )
        con.execute("checkpoint")
    finally:
        con.close()
    return time.perf_counter() - started


def cache_rows(state: Path) -> int:
    con = duckdb.connect(str(state / "cache.duckdb"), read_only=True)
    try:
        return con.execute("select count(*) from loaded_ids").fetchall()[0][0]
    finally:
        con.close()


def outcome(summary: dict) -> tuple:
    """What must be the same in both states: totals and rows per reason."""
    return (tuple(sorted(summary["totals"].items())),
            tuple(sorted((r["outcome"], r["reason_code"], r["rows"]) for r in summary["reasons"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the timed run (default 1000000)")
    parser.add_argument("--extra-ids", type=int, default=50_000_000, help="ids added to the cache (default 50000000)")
    parser.add_argument("--trials", type=int, default=3, help="trials of each state, alternating (default 3)")
    args = parser.parse_args()

    started = time.perf_counter()
    full, prime = ensure_data(args.rows)
    work = OUT / f"cache_{args.rows}_plus_{args.extra_ids}"
    prepare_work(work, full, prime)
    shutil.copytree(work / "primed", work / "primed_big")
    build_s = add_extra_ids(work / "primed_big" / "cache.duckdb", args.extra_ids)
    sizes = {name: (cache_rows(work / name), (work / name / "cache.duckdb").stat().st_size / 1e6) for name in STATES}
    prepare_s = time.perf_counter() - started

    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in STATES}
    outcomes: dict[str, set] = {name: set() for name in STATES}
    for trial in range(args.trials):
        order = list(STATES) if trial % 2 == 0 else list(reversed(STATES))
        for name in order:
            runs[name].append(loader_trial(work, name))
            outcomes[name].add(outcome(last_summary(work)))
    if len(outcomes["primed"] | outcomes["primed_big"]) != 1:
        raise SystemExit(f"the two states gave different outcomes: {outcomes}")

    seconds = {name: statistics.median(w for w, _ in runs[name]) for name in STATES}
    ratio = seconds["primed_big"] / seconds["primed"]
    print(f"loader run, local target, {args.rows:,} rows (1% invalid, 1% repeated ids); "
          f"trials: {args.trials} per state, alternating")
    header = f"{'state':<38} {'cache ids':>12} {'cache file MB':>13} {'median s':>9} {'peak MB':>8}  trials s"
    print(header)
    print("-" * len(header))
    labels = {"primed": "(a) primed: first half of the file", "primed_big": f"(b) (a) + {args.extra_ids:,} extra ids"}
    for name, label in labels.items():
        ids, megabytes = sizes[name]
        print(f"{label:<38} {ids:>12,} {megabytes:>13.0f} {seconds[name]:>9.2f} "
              f"{max(m for _, m in runs[name]):>8.0f}  " + ", ".join(f"{w:.2f}" for w, _ in runs[name]))
    print(f"ratio (b) / (a): {ratio:.2f}x; target at most {RATIO_TARGET}x: "
          f"{'met' if ratio <= RATIO_TARGET else 'NOT met'}")
    print(f"(data, priming and {args.extra_ids:,} extra ids: {prepare_s:.0f} s, of which the extra ids {build_s:.0f} s)")


if __name__ == "__main__":
    main()
