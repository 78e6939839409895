"""The Python API: what notebooks, Airflow tasks and Dagster assets call.

The CLI calls the same functions (through `loader.run`'s core), so a run from
a notebook and a run from a shell behave the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import polars as pl

from .config import (
    DedupeConfig,
    FailOnConfig,
    MappingConfig,
    ReportConfig,
    TargetConfig,
    ValidationConfig,
    parse_section,
)
from .errors import ConfigError
from .report import Report
from .run import RunResult, RunSettings, make_target, run_pipeline, validate_pipeline
from .run import load_frame as _load_frame
from .validate import Rules


def run(pipeline: str | Path | Any, *, vars: Mapping[str, str] | None = None, dry_run: bool = False,
        payloads_dir: str | Path | None = None, progress: bool = False) -> Report:
    """Run a pipeline file (or a loaded `Pipeline`) and return its report.

    Raises the run's `TargetError` (with `.report` set) when the run was aborted;
    failed rows are report data: check `report.failed_rows` or call
    `report.raise_for_failures(n)`.
    """
    result = _with_progress(progress, lambda cb: run_pipeline(
        pipeline, vars=vars, dry_run=dry_run, on_progress=cb,
        payloads_dir=Path(payloads_dir) if payloads_dir else None))
    return _report_or_raise(result)


def load(frame: pl.DataFrame, *, mapping: Mapping[str, Any] | MappingConfig,
         target: Mapping[str, Any] | TargetConfig | None = None, name: str = "dataframe",
         validation: Mapping[str, Any] | ValidationConfig | None = None,
         dedupe: Mapping[str, Any] | DedupeConfig | None = None,
         report: Mapping[str, Any] | ReportConfig | None = None,
         fail_on: Mapping[str, Any] | FailOnConfig | None = None,
         base_dir: str | Path = ".", dry_run: bool = False, progress: bool = False) -> Report:
    """Load a Polars DataFrame already in memory, with the sections of pipeline.yaml as dicts.

    Relative paths (the cache, the local database, the report folder) resolve
    against `base_dir`.
    """
    base = Path(base_dir).resolve()

    def section(model: type, value: Any, key: str) -> Any:
        if isinstance(value, model):
            return value
        return parse_section(model, dict(value or {}), key, base_dir=base)

    mapping_config = section(MappingConfig, mapping, "mapping")
    target_config = section(TargetConfig, target, "target")
    validation_config = section(ValidationConfig, validation, "validation")
    dedupe_config = section(DedupeConfig, dedupe, "dedupe")
    report_config = section(ReportConfig, report, "report")
    fail_on_config = section(FailOnConfig, fail_on, "fail_on")
    if not name or not name.replace("_", "a").replace("-", "a").isalnum() or name != name.lower():
        raise ConfigError([("name", "must match [a-z0-9_-]+")])
    settings = RunSettings(
        name=name,
        mapping=mapping_config,
        rules=Rules.from_config(validation_config),
        within_source=dedupe_config.within_source,
        cache_path=Path(dedupe_config.cache),
        on_conflict=target_config.on_conflict,
        chunk_size=target_config.chunk_size,
        report_dir=Path(report_config.dir),
        report_formats=tuple(report_config.formats),
        max_failed_rows=fail_on_config.failed_rows,
    )
    holder = _TargetHolder(target_config)
    result = _with_progress(progress, lambda cb: _load_frame(
        frame, settings, make_target(holder), dry_run=dry_run, on_progress=cb))
    return _report_or_raise(result)


def validate(pipeline: str | Path | Any, *, vars: Mapping[str, str] | None = None) -> dict:
    """Read, map and validate the source; load nothing. Row counts and the top reasons."""
    return validate_pipeline(pipeline, vars=vars)


class _TargetHolder:
    """`make_target` reads `pipeline.target`; a bare TargetConfig is wrapped to look the same."""

    def __init__(self, target: TargetConfig):
        self.target = target


def _with_progress(progress: bool, call: Any) -> RunResult:
    from .progress import terminal_progress

    with (terminal_progress(force=True) if progress else nullcontext(None)) as on_progress:
        return call(on_progress)


def _report_or_raise(result: RunResult) -> Report:
    """The report; or, for an aborted run, the error that aborted it (its class kept, so callers can
    tell a retryable abort from a terminal one) with the partial report as `.report`."""
    if result.error is not None:
        result.error.report = result.report  # type: ignore[attr-defined]
        raise result.error
    return result.report
