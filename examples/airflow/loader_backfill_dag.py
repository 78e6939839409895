"""Monthly backfill of pipelines/backfill into the local engine, one DAG run per month.

Copy this file into Airflow's DAGs folder. The pipeline is found through
`LOADER_BACKFILL_PIPELINE` (a path to pipeline.yaml), else at
pipelines/backfill/pipeline.yaml of the repository this file sits in.

Each run loads the month of its logical date (`--var MONTH=2024-01` for the
run of January 2024). The schedule has data intervals, so the run for a month
starts once that month is over and its logical date is the month's first day.

- exit code 1 (more failed rows than `fail_on` allows) fails the task at once;
- exit code 3 (aborted) is retried: the next try resumes the run, and nothing
  is loaded twice (cache + Idempotency-Keys), so retries are safe.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

try:  # Airflow 3
    from airflow.sdk import DAG, CronDataIntervalTimetable
except ImportError:  # Airflow 2.10
    from airflow import DAG  # type: ignore[no-redef]
    from airflow.timetables.interval import CronDataIntervalTimetable  # type: ignore[no-redef]

from loader.integrations.airflow import LoaderOperator

PIPELINE = os.environ.get(
    "LOADER_BACKFILL_PIPELINE",
    str(Path(__file__).resolve().parents[2] / "pipelines" / "backfill" / "pipeline.yaml"),
)

with DAG(
    dag_id="loader_backfill",
    schedule=CronDataIntervalTimetable("0 0 1 * *", timezone="UTC"),  # monthly, one data interval per month
    start_date=datetime(2024, 1, 1),
    end_date=datetime(2024, 3, 31),   # the export has 2024-01 .. 2024-03
    catchup=True,
    max_active_runs=1,                # one month at a time, in order
    default_args={"retries": 3, "retry_delay": timedelta(minutes=5)},
    tags=["loader"],
) as dag:
    LoaderOperator(
        task_id="load_card_settlements",
        pipeline_path=PIPELINE,
        vars={"MONTH": "{{ logical_date.strftime('%Y-%m') }}"},
    )
