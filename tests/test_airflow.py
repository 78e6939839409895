"""The Airflow integration: the example DAG run by Airflow's own test runner (`dag.test()`).

Skipped unless Airflow is installed (`pip install -e '.[test,airflow]'`). Airflow
is never imported in the pytest process: it reads `AIRFLOW_HOME` when imported,
so every Airflow step runs in a subprocess with a throwaway `AIRFLOW_HOME`
(database migrated, the example DAG copied into its DAGs folder), pointed at a
copy of pipelines/backfill in tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("airflow") is None,
                                reason="apache-airflow is not installed (extra: airflow)")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DAG = ROOT / "examples" / "airflow" / "loader_backfill_dag.py"
BACKFILL = ROOT / "pipelines" / "backfill"

# Loads the DAG file, runs `dag.test()` for one logical date, prints the run's task states and XComs.
DRIVER = r'''
import json, os, runpy, sys
from datetime import datetime, timedelta, timezone

from sqlalchemy import select
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session

dag_file, day = sys.argv[1], sys.argv[2]
dag = runpy.run_path(dag_file)["dag"]
if len(sys.argv) > 3:  # retries for this test run, without waiting between tries
    for task in dag.tasks:
        task.retries, task.retry_delay = int(sys.argv[3]), timedelta(0)
for task in dag.tasks:  # extra vars for this test run
    task.vars.update(json.loads(os.environ.get("DRIVER_EXTRA_VARS", "{}")))
run = dag.test(logical_date=datetime.fromisoformat(day).replace(tzinfo=timezone.utc))
with create_session() as session:
    tis = session.scalars(select(TaskInstance).where(
        TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == run.run_id)).all()
    xcoms = session.scalars(select(XComModel).where(
        XComModel.dag_id == dag.dag_id, XComModel.run_id == run.run_id)).all()
    result = {
        "state": str(run.state),
        "tasks": {ti.task_id: {"state": str(ti.state), "try_number": ti.try_number} for ti in tis},
        "xcom": {f"{x.task_id}.{x.key}": x.value for x in xcoms},
    }
print("DAG_TEST_RESULT " + json.dumps(result, default=str))
'''

TASK = "load_card_settlements"


def _copy_backfill(destination: Path, *, failed_rows: int | None = None) -> Path:
    shutil.copytree(BACKFILL, destination, ignore=shutil.ignore_patterns(".loader", "reports"))
    pipeline = destination / "pipeline.yaml"
    if failed_rows is not None:
        text = pipeline.read_text()
        assert "failed_rows: 5" in text
        pipeline.write_text(text.replace("failed_rows: 5", f"failed_rows: {failed_rows}"))
    return pipeline


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    """A throwaway AIRFLOW_HOME: database migrated, the example DAG in its DAGs folder."""
    home = tmp_path_factory.mktemp("airflow_home")
    dags = home / "dags"
    dags.mkdir()
    shutil.copy(EXAMPLE_DAG, dags / EXAMPLE_DAG.name)
    (home / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
               AIRFLOW__CORE__LOAD_EXAMPLES="False")
    migrated = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=False,
                              capture_output=True, text=True, timeout=600)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    return home, env


def dag_test(airflow_home, pipeline: Path, day: str, retries: int | None = None,
             extra_vars: dict | None = None) -> tuple[dict, str]:
    """`dag.test()` of the example DAG for `day`, with the DAG pointed at `pipeline`; (result, log)."""
    home, env = airflow_home
    args = [sys.executable, str(home / "driver.py"), str(home / "dags" / EXAMPLE_DAG.name), day]
    if retries is not None:
        args.append(str(retries))
    env = {**env, "LOADER_BACKFILL_PIPELINE": str(pipeline), "DRIVER_EXTRA_VARS": json.dumps(extra_vars or {})}
    done = subprocess.run(args, env=env, cwd=home, check=False,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    line = next(line for line in done.stdout.splitlines() if line.startswith("DAG_TEST_RESULT "))
    return json.loads(line.removeprefix("DAG_TEST_RESULT ")), output


def events(output: str, event: str) -> list[dict]:
    """The loader's JSON event lines of a given kind in the task's log."""
    decoder = json.JSONDecoder()
    found = []
    for line in output.splitlines():
        start = line.find('{"time"')
        if start >= 0 and f'"event": "{event}"' in line:
            found.append(decoder.raw_decode(line, start)[0])
    return found


def records_in(pipeline: Path) -> int:
    with duckdb.connect(str(pipeline.parent / ".loader" / "endclose.duckdb"), read_only=True) as db:
        return db.execute("select count(*) from records").fetchone()[0]


def test_example_dag_loads_a_month_and_a_second_run_creates_nothing(airflow_home, tmp_path):
    pipeline = _copy_backfill(tmp_path / "backfill")

    result, output = dag_test(airflow_home, pipeline, "2024-01-01")
    assert result["state"] == "success", output
    assert result["tasks"][TASK]["state"] == "success"
    summary = result["xcom"][f"{TASK}.return_value"]
    assert summary["totals"] == {"total": 66, "successful": 61, "failed": 3, "skipped": 2}
    assert [f["path"] for f in summary["source"]["files"]] == [str(pipeline.parent / "data/card_export_2024-01.csv")]
    on_disk = json.loads((pipeline.parent / "reports" / summary["pipeline"] / summary["run_id"]
                          / "summary.json").read_text())
    assert on_disk["totals"] == summary["totals"]
    assert records_in(pipeline) == 61

    # one log line per chunk: run id, Idempotency-Key, bulk request id
    chunks = events(output, "chunk_confirmed")
    assert len(chunks) == 3 == len(summary["bulk_requests"])  # 61 rows, chunk_size 25
    assert {c["run_id"] for c in chunks} == {summary["run_id"]}
    assert sorted(c["bulk_request_id"] for c in chunks) == summary["bulk_requests"]
    assert all(re.fullmatch(r"[0-9a-f]{16,}", c["idempotency_key"]) for c in chunks)
    assert len({c["idempotency_key"] for c in chunks}) == 3
    assert events(output, "chunk_sent") == []
    assert "vars {'MONTH': '2024-01'}" in output

    again, output = dag_test(airflow_home, pipeline, "2024-01-01")
    assert again["tasks"][TASK]["state"] == "success", output
    second = again["xcom"][f"{TASK}.return_value"]
    assert second["run_id"] != summary["run_id"]
    assert second["totals"]["successful"] == 0
    assert {r["reason_code"]: r["rows"] for r in second["reasons"]}["already_loaded"] == 61
    assert events(output, "chunk_confirmed") == []
    assert records_in(pipeline) == 61


def test_too_many_failed_rows_fail_the_task_without_retry(airflow_home, tmp_path):
    pipeline = _copy_backfill(tmp_path / "strict", failed_rows=0)
    secret = "sk-test-never-in-a-log-4f1c9a"

    result, output = dag_test(airflow_home, pipeline, "2024-02-01", extra_vars={"ENDCLOSE_API_KEY": secret})
    task = result["tasks"][TASK]
    assert result["state"] == "failed"
    assert task == {"state": "failed", "try_number": 1}  # retries=3 in the DAG, yet not retried
    assert "3 rows failed, more than fail_on.failed_rows (0) allows (exit code 1; not retried" in output
    assert "AirflowFailException" in output
    summary = result["xcom"][f"{TASK}.summary"]  # still pushed, for whoever looks into the failure
    assert summary["totals"]["failed"] == 3
    assert f"{TASK}.return_value" not in result["xcom"]
    assert "vars {'MONTH': '2024-02', 'ENDCLOSE_API_KEY': '***'}" in output
    assert secret not in output


def test_an_aborted_run_is_retried(airflow_home, tmp_path):
    pipeline = _copy_backfill(tmp_path / "locked")
    database = pipeline.parent / ".loader" / "endclose.duckdb"
    database.parent.mkdir(parents=True)
    with duckdb.connect(str(database)):  # another process holds the local database: exit code 3
        result, output = dag_test(airflow_home, pipeline, "2024-03-01", retries=1)
    task = result["tasks"][TASK]
    assert task == {"state": "failed", "try_number": 2}  # the first try was retried
    assert "aborted (exit code 3)" in output
    assert "is in use by another loader process" in output
    assert "retryable: the task's next try resumes the run" in output
