"""loader.integrations.dagster: a pipeline.yaml as a (partitioned) Dagster asset, materialised in-process.

Needs the `dagster` extra (`pip install -e '.[test,dagster]'`); skipped without it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

dg = pytest.importorskip("dagster")

import duckdb  # noqa: E402
import httpx  # noqa: E402
import yaml  # noqa: E402

from loader.integrations.dagster import CHECK_NAME, LoaderResource, pipeline_asset  # noqa: E402
from serve_fixture import running_server  # noqa: E402

BACKFILL = Path(__file__).resolve().parents[1] / "pipelines" / "backfill"
MONTHS = dg.MonthlyPartitionsDefinition(start_date="2024-01-01", end_date="2024-04-01")
NO_KEY = {"loader": LoaderResource()}


def copy_backfill(tmp_path: Path, **changes) -> Path:
    """pipelines/backfill copied into tmp_path, with top-level sections of the YAML replaced."""
    folder = tmp_path / "backfill"
    shutil.copytree(BACKFILL / "data", folder / "data")
    config = yaml.safe_load((BACKFILL / "pipeline.yaml").read_text())
    config.update(changes)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def materialization(result: dg.ExecuteInProcessResult) -> dict:
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


def check_result(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == CHECK_NAME
    return evaluation


def records_in(database: Path) -> int:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.execute("select count(*) from records").fetchone()[0]


def test_two_monthly_partitions_then_a_rematerialisation_that_loads_nothing(tmp_path):
    path = copy_backfill(tmp_path)
    asset = pipeline_asset(path, partitions_def=MONTHS)
    instance = dg.DagsterInstance.ephemeral()

    january = dg.materialize([asset], partition_key="2024-01-01", resources=NO_KEY, instance=instance)
    february = dg.materialize([asset], partition_key="2024-02-01", resources=NO_KEY, instance=instance)

    for result, month in ((january, "2024-01"), (february, "2024-02")):
        assert result.success
        meta = materialization(result)
        assert meta["partition_var"] == month
        assert meta["total"] == meta["successful"] + meta["failed"] + meta["skipped"] > 0
        assert meta["successful"] > 0 and meta["failed"] == 3  # the sample has 3 bad rows a month
        assert Path(meta["report"]).is_dir() and Path(meta["report"]).name == meta["run_id"]
        # the report is the month's: its source is that month's file, its totals are the metadata's
        summary = yaml.safe_load((Path(meta["report"]) / "summary.json").read_text())
        assert summary["source"]["files"][0]["path"].endswith(f"card_export_{month}.csv")
        assert {k: meta[k] for k in summary["totals"]} == summary["totals"]
        assert meta["control_totals"] == summary["by_stream"]
        assert check_result(result).passed  # 3 failed rows, fail_on.failed_rows is 5
    loaded = materialization(january)["successful"] + materialization(february)["successful"]
    database = path.parent / ".loader" / "endclose.duckdb"
    assert records_in(database) == loaded
    assert instance.get_materialized_partitions(asset.key) == {"2024-01-01", "2024-02-01"}

    again = dg.materialize([asset], partition_key="2024-01-01", resources=NO_KEY, instance=instance)
    meta = materialization(again)
    assert again.success
    assert meta["successful"] == 0
    assert meta["skipped"] == materialization(january)["successful"] + materialization(january)["skipped"]
    assert meta["run_id"] != materialization(january)["run_id"]
    assert records_in(database) == loaded  # nothing loaded twice


def test_the_check_fails_when_failed_rows_pass_fail_on(tmp_path):
    path = copy_backfill(tmp_path, fail_on={"failed_rows": 0})
    asset = pipeline_asset(path, partitions_def=MONTHS)
    result = dg.materialize([asset], partition_key="2024-03-01", resources=NO_KEY)
    assert result.success  # the records loaded; the check says too many rows failed
    evaluation = check_result(result)
    assert not evaluation.passed
    meta = {k: v.value for k, v in evaluation.metadata.items()}
    assert meta["failed_rows"] == 3 and meta["fail_on.failed_rows"] == 0
    assert materialization(result)["failed"] == 3


def test_a_blocking_check_fails_the_step(tmp_path):
    path = copy_backfill(tmp_path, fail_on={"failed_rows": 0})
    asset = pipeline_asset(path, partitions_def=MONTHS, blocking=True)
    result = dg.materialize([asset], partition_key="2024-03-01", resources=NO_KEY, raise_on_error=False)
    assert not result.success
    assert not check_result(result).passed


def test_a_static_partition_and_a_custom_name(tmp_path):
    path = copy_backfill(tmp_path)
    asset = pipeline_asset(path, name="card_backfill",
                           partitions_def=dg.StaticPartitionsDefinition(["2024-02", "2024-03"]))
    result = dg.materialize([asset], partition_key="2024-03", resources=NO_KEY)
    assert asset.key == dg.AssetKey("card_backfill")
    assert materialization(result)["partition_var"] == "2024-03"
    assert materialization(result)["total"] == 73


def test_one_partition_against_loader_serve_with_the_key_from_a_resource(tmp_path, monkeypatch):
    key = "dagster-secret-7f3a9c"
    monkeypatch.delenv("ENDCLOSE_API_KEY", raising=False)  # the key comes only through the resource
    monkeypatch.setenv("LOADER_TEST_API_KEY", key)
    (tmp_path / "server").mkdir()
    with running_server(tmp_path / "server", api_keys={key: "default"}) as server:
        httpx.post(f"{server.url}/data_streams", headers={"X-API-KEY": key},
                   json={"key": "card_settlements", "name": "Card settlements", "type": "api"}).raise_for_status()
        path = copy_backfill(tmp_path, target={"type": "api", "base_url": server.url,
                                               "api_key": "${ENDCLOSE_API_KEY}", "chunk_size": 25})
        asset = pipeline_asset(path, partitions_def=MONTHS)
        instance = dg.DagsterInstance.ephemeral()
        resources = {"loader": LoaderResource(api_key=dg.EnvVar("LOADER_TEST_API_KEY"))}

        # a wrong key aborts the run (exit code 3): the step fails with loader's message and report path
        monkeypatch.setenv("LOADER_TEST_API_KEY", "wrong-key-0000")
        failed = dg.materialize([asset], partition_key="2024-01-01", instance=instance, raise_on_error=False,
                                resources=resources)
        assert not failed.success
        [failure] = failed.get_step_failure_events()
        assert "(401): check the key" in failure.step_failure_data.error.message
        assert Path(failure.step_failure_data.user_failure_data.metadata["report"].value).is_dir()
        assert "wrong-key-0000" not in _everything(failed, instance)
        # a refused key is not retried, even with a retry policy: a person must fix the key first
        retried = pipeline_asset(path, partitions_def=MONTHS, retry_policy=dg.RetryPolicy(max_retries=1))
        failed = dg.materialize([retried], partition_key="2024-01-01", instance=instance, raise_on_error=False,
                                resources=resources)
        assert [e.event_type for e in failed.all_events].count(dg.DagsterEventType.STEP_UP_FOR_RETRY) == 0
        assert not failed.success and "wrong-key-0000" not in _everything(failed, instance)

        monkeypatch.setenv("LOADER_TEST_API_KEY", key)
        result = dg.materialize([asset], partition_key="2024-01-01", instance=instance, resources=resources)
        held = httpx.get(f"{server.url}/records", headers={"X-API-KEY": key},
                         params={"data_stream_key": "card_settlements", "limit": 200}).json()["data"]

    assert result.success
    meta = materialization(result)
    assert meta["successful"] == len(held) == 61 and meta["failed"] == 3
    assert check_result(result).passed
    everything = _everything(result, instance)
    assert meta["run_id"] in everything and meta["report"] in everything  # the metadata is in what is searched
    assert key not in everything
    assert key not in "".join(p.read_text(errors="replace") for p in Path(meta["report"]).glob("*.json"))


def _everything(result: dg.ExecuteInProcessResult, instance: dg.DagsterInstance) -> str:
    """Every event of the run as text (metadata, messages, failures), and the run's stored config."""
    records = instance.all_logs(result.run_id)
    return "\n".join([repr(record) for record in records] + [repr(result.dagster_run.run_config)])
