"""The CLI as a user types it: exit codes, --json, config errors, history."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import run_cli, summary_of

from loader.cli import POLARS_ALLOCATOR, POLARS_ALLOCATOR_VARIABLE

ROWS = [
    ["2024-01-02", "T1", "Payroll", "100.50", "USD", "DR"],
    ["2024-01-03", "T2", "Refund", "20", "EUR", "CR"],
    ["2024-01-04", "T3", "Bad", "1.001", "USD", "CR"],
]


def test_run_json_then_history_and_report(make_pipeline, tmp_path):
    path = make_pipeline({"a.csv": ROWS})
    first = run_cli("run", str(path), "--json")
    assert first.returncode == 0, first.stderr
    summary = summary_of(first)
    assert summary["totals"] == {"total": 3, "successful": 2, "failed": 1, "skipped": 0}
    assert (tmp_path / "reports" / "test_pipeline" / summary["run_id"] / "report.html").exists()

    runs = run_cli("runs", str(path), "--json")
    assert runs.returncode == 0, runs.stderr
    assert [r["run_id"] for r in json.loads(runs.stdout)] == [summary["run_id"]]

    shown = run_cli("report", summary["run_id"], str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    assert summary_of(shown)["totals"] == summary["totals"]
    missing = run_cli("report", "nope", str(path))
    assert missing.returncode == 2
    assert "loader runs" in missing.stderr


def test_failed_rows_beyond_fail_on_exit_1(make_pipeline):
    path = make_pipeline({"a.csv": ROWS}, fail_on={"failed_rows": 0})
    result = run_cli("run", str(path))
    assert result.returncode == 1
    assert "1 rows failed, more than fail_on.failed_rows (0)" in result.stderr
    assert "rows: 3 total, 2 successful, 1 failed, 0 skipped" in result.stdout


def test_config_error_names_the_key_and_exits_2_before_loading(make_pipeline, tmp_path):
    path = make_pipeline({"a.csv": ROWS}, mapping__amount={"column": "amount"})
    result = run_cli("run", str(path))
    assert result.returncode == 2
    assert "mapping.amount.unit: field required" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".loader").exists()
    assert not (tmp_path / "reports").exists()


def test_missing_source_column_exits_2(make_pipeline, tmp_path):
    path = make_pipeline({"a.csv": ROWS}, mapping__description={"column": "nope"})
    result = run_cli("run", str(path))
    assert result.returncode == 2
    assert "mapping.description.column: no column 'nope'" in result.stderr
    assert not (tmp_path / ".loader" / "endclose.duckdb").exists()


def test_bad_transform_sql_exits_2(make_pipeline):
    path = make_pipeline({"a.csv": ROWS}, transform={"sql": "select * from source where no_such_column = 1"})
    result = run_cli("run", str(path))
    assert result.returncode == 2
    assert "transform.sql:" in result.stderr


def test_var_and_environment_interpolation(make_pipeline, tmp_path):
    path = make_pipeline({"a.csv": ROWS}, source={"path": "data/${FILE}.csv"})
    assert run_cli("run", str(path), "--var", "FILE=a", "--json").returncode == 0
    unset = run_cli("run", str(path))
    assert unset.returncode == 2
    assert "source.path: ${FILE} is not set" in unset.stderr


def test_validate_loads_nothing(make_pipeline, tmp_path):
    path = make_pipeline({"a.csv": ROWS}, fail_on={"failed_rows": 5})
    result = run_cli("validate", str(path), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["rows"], out["valid"], out["invalid"]) == (3, 2, 1)
    assert "more decimals than USD allows" in out["reasons"][0]["reason"]
    assert not (tmp_path / ".loader").exists()


def test_dry_run_writes_payloads_and_loads_nothing(make_pipeline, tmp_path):
    path = make_pipeline({"a.csv": ROWS})
    payloads = tmp_path / "payloads"
    result = run_cli("run", str(path), "--dry-run", "--json", "--payloads", str(payloads))
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["reasons"] == [{"outcome": "skipped", "reason_code": "dry_run", "rows": 2},
                                             {"outcome": "failed", "reason_code": "invalid", "rows": 1}]
    body = json.loads((payloads / "000001.json").read_text())
    assert [r["amount"] for r in body["records"]] == [10050, 2000]
    assert len((payloads / "000001.idempotency-key").read_text().strip()) == 40
    assert not (tmp_path / ".loader" / "endclose.duckdb").exists()


def test_streams_add_and_list(tmp_path):
    db = str(tmp_path / "engine.duckdb")
    added = run_cli("streams", "add", "bank_ops", "--name", "Bank ops", "--database", db)
    assert added.returncode == 0, added.stderr
    again = run_cli("streams", "add", "bank_ops", "--database", db)
    assert again.returncode == 3 or again.returncode == 2
    listed = run_cli("streams", "list", "--database", db, "--json")
    assert [s["key"] for s in json.loads(listed.stdout)] == ["bank_ops"]


def test_every_command_has_help():
    for command in (["run"], ["validate"], ["reconcile"], ["serve"], ["cache", "sync"], ["streams", "add"],
                    ["streams", "list"], ["runs"], ["report"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0
        assert "Usage:" in result.stdout


def test_json_logs_one_object_per_event(make_pipeline):
    path = make_pipeline({"a.csv": ROWS})
    result = run_cli("--log-format", "json", "run", str(path))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert {"chunk_sent", "chunk_confirmed"} <= set(kinds)
    run_ids = {e["run_id"] for e in events}
    assert len(run_ids) == 1
    end = events[-1]
    assert (end["total"], end["successful"], end["failed"], end["exit_code"]) == (3, 2, 1, 0)
    confirmed = [e for e in events if e["event"] == "chunk_confirmed"]
    assert all(isinstance(e["bulk_request_id"], int) and len(e["idempotency_key"]) == 40 for e in confirmed)


def _python(code: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_loader_or_its_command_loads_neither_polars_nor_duckdb():
    # The command sets up Polars' allocator before Polars loads: that needs both imports light.
    loaded = _python("import sys, loader, loader.cli; print(sorted({'polars', 'duckdb'} & set(sys.modules)))")
    assert loaded == "[]"
    # The public names still resolve (to the functions, not to the modules of the same name).
    kinds = _python("import loader.run, loader; print(type(loader.run).__name__, type(loader.validate).__name__, "
                    "type(loader.reconcile).__name__, loader.Report.__name__)")
    assert kinds == "function function function Report"


def test_the_command_sets_polars_allocator_unless_the_user_did_or_polars_is_loaded():
    env = {k: v for k, v in os.environ.items() if k != POLARS_ALLOCATOR_VARIABLE}
    show = f"import os; from loader import cli; cli.prepare_process(); print(os.environ.get({POLARS_ALLOCATOR_VARIABLE!r}))"
    assert _python(show, env) == POLARS_ALLOCATOR
    assert _python(show, {**env, POLARS_ALLOCATOR_VARIABLE: "narenas:2"}) == "narenas:2"
    # What a parent that imported Polars passes on is Polars' value, not the user's.
    inherited = _python("import os, polars; print(os.environ[" + repr(POLARS_ALLOCATOR_VARIABLE) + "])", env)
    assert _python(show, {**env, POLARS_ALLOCATOR_VARIABLE: inherited}) == POLARS_ALLOCATOR
    # Polars, once loaded, has read the variable: the command leaves it.
    assert _python("import polars; " + show, env) == inherited
