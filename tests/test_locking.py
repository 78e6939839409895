"""A second process on the same state file gets a clear error, never a corrupt file."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli

HOLD = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("create table if not exists held (x int)")
print("holding", flush=True)
sys.stdin.readline()
con.close()
"""

ROWS = [["2024-01-02", "T1", "Payroll", "100.50", "USD", "DR"]]


def test_run_fails_with_exit_3_while_another_process_holds_the_cache(make_pipeline, tmp_path):
    path = make_pipeline({"a.csv": ROWS})
    cache = tmp_path / ".loader" / "cache.duckdb"
    cache.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        result = run_cli("run", str(path))
        assert result.returncode == 3
        assert "in use by another loader process" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
    # Once released, the same command runs normally.
    again = run_cli("run", str(path))
    assert again.returncode == 0, again.stderr


def test_run_fails_with_exit_3_while_another_process_holds_the_local_database(make_pipeline, tmp_path):
    path = make_pipeline({"a.csv": ROWS})
    database = tmp_path / ".loader" / "endclose.duckdb"
    database.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(database)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        result = run_cli("run", str(path))
        assert result.returncode == 3
        assert "in use by another loader process" in result.stderr
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
