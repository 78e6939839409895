"""A pipeline.yaml as a Dagster asset: `pip install 'loader[dagster]'`.

    from dagster import Definitions, EnvVar, MonthlyPartitionsDefinition
    from loader.integrations.dagster import LoaderResource, pipeline_asset

    backfill = pipeline_asset("pipelines/backfill/pipeline.yaml",
                              partitions_def=MonthlyPartitionsDefinition(start_date="2024-01-01"))
    defs = Definitions(assets=[backfill],
                       resources={"loader": LoaderResource(api_key=EnvVar("ENDCLOSE_API_KEY"))})

One materialisation is one `loader run`: a partition becomes a `--var`
(`MONTH=2024-01`), the API key comes from the `loader` resource (never from
code), the report's totals, control totals and path become materialisation
metadata, and the check `failed_rows_within_fail_on` fails when more rows
failed than the pipeline's `fail_on.failed_rows`. An aborted run (exit code 3)
fails the step with loader's message and the partial report's path; the
asset's `retry_policy` (pass `retry_policy=RetryPolicy(...)`) retries it, and
the rerun loads nothing twice. Note that the Python module is named `dagster` inside this
package only; `import dagster` below is the real Dagster (absolute imports).
"""

from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from loader.api import run
from loader.config import load_pipeline
from loader.errors import ConfigError, LoaderError, SourceError, TerminalTargetError
from loader.report import Report

CHECK_NAME = "failed_rows_within_fail_on"


class LoaderResource(dg.ConfigurableResource):
    """Settings of `loader` runs; set `api_key` with `EnvVar("ENDCLOSE_API_KEY")`, never a literal.

    Leave it unset for `target.type: local` (or when the variable is in the
    process's environment already: pipeline.yaml's `${ENDCLOSE_API_KEY}` falls
    back to the environment).
    """

    api_key: str | None = None


def pipeline_asset(
    pipeline_path: str | Path,
    *,
    name: str | None = None,
    partitions_def: dg.PartitionsDefinition | None = None,
    partition_var: str = "MONTH",
    partition_format: str | None = None,
    api_key_var: str = "ENDCLOSE_API_KEY",
    blocking: bool = False,
    **asset_kwargs: Any,
) -> dg.AssetsDefinition:
    """A Dagster asset that runs `pipeline_path`, with the check `failed_rows_within_fail_on`.

    - `name`: the asset's name; the pipeline's `name` by default.
    - `partitions_def`: each partition key is passed as `vars={partition_var: value}`.
      A time-window partition (daily, monthly, ...) is formatted with
      `partition_format` (`"%Y-%m"` by default for `MonthlyPartitionsDefinition`,
      the key as it is otherwise: `2024-01-31` for a day).
    - `api_key_var`: the `${NAME}` pipeline.yaml reads the key from; the
      `loader` resource's `api_key` is passed under that name.
    - `blocking`: when True, a failed check stops downstream assets.
    - `asset_kwargs`: passed to `@asset` (`group_name`, `retry_policy`, ...).
    """
    path = Path(pipeline_path).resolve()
    asset_name = name or str(yaml.safe_load(path.read_text(encoding="utf-8-sig"))["name"]).replace("-", "_")
    if partition_format is None and isinstance(partitions_def, dg.MonthlyPartitionsDefinition):
        partition_format = "%Y-%m"

    @dg.asset(
        name=asset_name,
        partitions_def=partitions_def,
        check_specs=[dg.AssetCheckSpec(CHECK_NAME, asset=asset_name, blocking=blocking,
                                       description="failed rows <= the pipeline's fail_on.failed_rows")],
        description=f"`loader run {path}`",
        **asset_kwargs,
    )
    def _asset(context: dg.AssetExecutionContext, loader: LoaderResource) -> dg.MaterializeResult:
        vars: dict[str, str] = {}
        if context.has_partition_key:
            vars[partition_var] = _partition_value(context, partition_format)
        if loader.api_key:
            vars[api_key_var] = loader.api_key
        try:
            pipeline = load_pipeline(path, vars)
            report = run(pipeline)
        except ConfigError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        except LoaderError as exc:  # the run was aborted; what it confirmed stays recorded
            partial = getattr(exc, "report", None)
            metadata = {"report": dg.MetadataValue.path(str(partial.directory))} if partial else {}
            # A retry resumes a run cut short (timeouts, 5xx, a locked file), but not a refused key
            # or a broken source file: those need a person first.
            retryable = not isinstance(exc, (TerminalTargetError, SourceError))
            raise dg.Failure(str(exc), metadata=metadata, allow_retries=retryable) from None
        max_failed = pipeline.fail_on.failed_rows
        return dg.MaterializeResult(
            metadata=_metadata(report, vars.get(partition_var)),
            check_results=[dg.AssetCheckResult(
                check_name=CHECK_NAME,
                passed=report.failed_rows <= max_failed,
                metadata={"failed_rows": report.failed_rows, "fail_on.failed_rows": max_failed,
                          "rows": dg.MetadataValue.path(str(report.rows_path))},
                description=f"{report.failed_rows} rows failed; fail_on.failed_rows allows {max_failed}",
            )],
        )

    return _asset


def _partition_value(context: dg.AssetExecutionContext, partition_format: str | None) -> str:
    if partition_format and isinstance(context.assets_def.partitions_def, dg.TimeWindowPartitionsDefinition):
        return context.partition_time_window.start.strftime(partition_format)
    return context.partition_key


def _metadata(report: Report, partition_value: str | None) -> dict[str, Any]:
    summary = report.summary
    totals = report.totals
    metadata: dict[str, Any] = {
        "run_id": report.run_id,
        **{name: dg.MetadataValue.int(totals[name]) for name in ("total", "successful", "failed", "skipped")},
        "control_totals": dg.MetadataValue.json(summary["by_stream"]),
        "reasons": dg.MetadataValue.json(summary["reasons"]),
        "report": dg.MetadataValue.path(str(report.directory)),
    }
    if partition_value is not None:
        metadata["partition_var"] = partition_value
    return metadata

