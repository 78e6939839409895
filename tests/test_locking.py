"""A second process on the same state file gets a clear error, never a corrupt file."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

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


@contextmanager
def held(path):
    """Another process holding the DuckDB file at `path`, until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)


def test_run_fails_with_exit_3_while_another_process_holds_the_cache(make_pipeline, tmp_path):
    path = make_pipeline({"a.csv": ROWS})
    with held(tmp_path / ".loader" / "cache.duckdb"):
        result = run_cli("run", str(path))
        assert result.returncode == 3
        assert "in use by another loader process" in result.stderr
        assert "Traceback" not in result.stderr
    # Once released, the same command runs normally.
    again = run_cli("run", str(path))
    assert again.returncode == 0, again.stderr


def test_run_fails_with_exit_3_while_another_process_holds_the_local_database(make_pipeline, tmp_path):
    path = make_pipeline({"a.csv": ROWS})
    with held(tmp_path / ".loader" / "endclose.duckdb"):
        result = run_cli("run", str(path))
        assert result.returncode == 3
        assert "in use by another loader process" in result.stderr


def test_a_run_refused_by_a_lock_leaves_no_reader_behind(make_pipeline, tmp_path):
    """In a notebook the process lives on: the source reader started with the run must end with it."""
    import threading

    import pytest

    from loader.errors import LockedError
    from loader.run import run_pipeline

    path = make_pipeline({"a.csv": ROWS * 3})
    with held(tmp_path / ".loader" / "cache.duckdb"), pytest.raises(LockedError):
        run_pipeline(path)
    for reader in [t for t in threading.enumerate() if t.name == "loader-read"]:
        reader.join(timeout=30)
        assert not reader.is_alive()
