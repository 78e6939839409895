"""The run history (table `runs` of the state database), for `loader runs` and `loader report`."""

from __future__ import annotations

import json
from datetime import datetime

import duckdb

SCHEMA = """
create table if not exists runs (
    run_id varchar primary key,
    pipeline varchar not null,
    pipeline_path varchar,
    target_key varchar,
    target json,
    dry_run boolean,
    status varchar not null,          -- running | finished | aborted
    started_at timestamptz,
    finished_at timestamptz,
    total bigint, successful bigint, failed bigint, skipped bigint,
    exit_code integer,
    error varchar,
    report_dir varchar
);
"""

COLUMNS = ("run_id", "pipeline", "status", "dry_run", "started_at", "finished_at",
           "total", "successful", "failed", "skipped", "exit_code", "report_dir", "error")


class History:
    def __init__(self, con: duckdb.DuckDBPyConnection, *, read_only: bool = False):
        self.con = con
        if not read_only:
            con.execute(SCHEMA)

    def start(self, *, run_id: str, pipeline: str, pipeline_path: str | None, target_key: str,
              target: dict, dry_run: bool, started_at: datetime, report_dir: str) -> None:
        self.con.execute(
            "insert into runs (run_id, pipeline, pipeline_path, target_key, target, dry_run, status, "
            "started_at, report_dir) values (?, ?, ?, ?, ?, ?, 'running', ?, ?)",
            [run_id, pipeline, pipeline_path, target_key, json.dumps(target), dry_run, started_at, report_dir],
        )

    def finish(self, run_id: str, *, status: str, finished_at: datetime, totals: dict,
               exit_code: int, error: str | None) -> None:
        self.con.execute(
            "update runs set status = ?, finished_at = ?, total = ?, successful = ?, failed = ?, skipped = ?, "
            "exit_code = ?, error = ? where run_id = ?",
            [status, finished_at, totals.get("total"), totals.get("successful"), totals.get("failed"),
             totals.get("skipped"), exit_code, error, run_id],
        )

    def list(self, *, pipeline: str | None = None, limit: int = 50) -> list[dict]:
        where, params = ("where pipeline = ?", [pipeline]) if pipeline else ("", [])
        rows = self.con.execute(
            f"select {', '.join(COLUMNS)} from runs {where} order by started_at desc limit ?", [*params, limit]
        ).fetchall()
        return [dict(zip(COLUMNS, row)) for row in rows]

    def get(self, run_id: str) -> dict | None:
        row = self.con.execute(f"select {', '.join(COLUMNS)} from runs where run_id = ?", [run_id]).fetchone()
        return dict(zip(COLUMNS, row)) if row else None
