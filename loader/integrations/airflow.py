"""Airflow: run a loader pipeline as a task.

    from loader.integrations.airflow import LoaderOperator

    LoaderOperator(
        task_id="load_card_settlements",
        pipeline_path="pipelines/backfill/pipeline.yaml",
        vars={"MONTH": "{{ logical_date.strftime('%Y-%m') }}"},   # templated
        retries=3,                                                # exit 3 is retried
    )

The task runs the pipeline in-process (the same core as `loader run`) and:

- logs one line per chunk the target confirmed (`chunk confirmed`, with
  `run_id`, `idempotency_key` and `bulk_request_id`), plus the run's start and
  end, into the task's log;
- returns the run's summary (`summary.json`: `run_id`, `totals`, `by_stream`,
  ...), so it is the task's XCom `return_value`;
- exit code 1 (more rows failed than `fail_on.failed_rows` allows) fails the
  task without retrying (the summary is still pushed, under the XCom key
  `summary`): the data or the threshold has to change first;
- exit code 3 (the run was aborted: database in use, target unreachable)
  raises a retryable `AirflowException`: what was confirmed stays recorded, and
  the task's next try resumes the run without loading anything twice;
- a config error (exit code 2) fails the task without retrying.

Values of `vars` whose name looks like a credential (`..._KEY`, `..._TOKEN`,
`..._SECRET`, `..._PASSWORD`) are registered with Airflow's secrets masker and
never logged by this operator. Better still, leave the API key out of `vars`
and set `ENDCLOSE_API_KEY` in the worker's environment: `${NAME}` in
pipeline.yaml falls back to the environment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

try:  # Airflow 3: the Task SDK
    from airflow.sdk import BaseOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # pragma: no cover - Airflow 2.10
    from airflow.exceptions import AirflowException, AirflowFailException  # type: ignore[no-redef]
    from airflow.models import BaseOperator  # type: ignore[no-redef]

try:  # Airflow 3
    from airflow.sdk.log import mask_secret
except ImportError:  # pragma: no cover - Airflow 2.10
    from airflow.utils.log.secrets_masker import mask_secret  # type: ignore[no-redef]

from ..config import load_pipeline
from ..errors import ConfigError, LoaderError
from ..logs import configure as configure_logs
from ..run import run_pipeline

__all__ = ["LoaderOperator"]

# The events that reach the task's log: one line per confirmed chunk, plus the run's start, end and abort.
# (`chunk_sent` is left out so that each chunk has exactly one line.)
TASK_LOG_EVENTS = frozenset({"run_start", "chunk_confirmed", "run_end", "error"})
_SECRET_WORDS = ("key", "secret", "password", "token", "authorization", "credential")


class LoaderOperator(BaseOperator):
    """Run a loader pipeline (pipeline.yaml) and push its summary to XCom.

    :param pipeline_path: path to pipeline.yaml (templated). Relative paths in
        the YAML resolve against its folder, whatever the worker's directory.
    :param vars: values for `${NAME}` in the YAML (templated), e.g.
        `{"MONTH": "{{ logical_date.strftime('%Y-%m') }}"}`.
    :param dry_run: stop before the target, as `loader run --dry-run`.
    :param log_format: `json` (one JSON object per event) or `text` for the
        per-chunk lines in the task's log.
    """

    template_fields: Sequence[str] = ("pipeline_path", "vars")
    template_fields_renderers: ClassVar[dict[str, str]] = {"vars": "json"}
    ui_color = "#e8f0fe"

    def __init__(self, *, pipeline_path: str | Path, vars: Mapping[str, Any] | None = None,
                 dry_run: bool = False, log_format: str = "json", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if log_format not in ("json", "text"):
            raise ValueError(f"log_format must be 'json' or 'text', not {log_format!r}")
        self.pipeline_path = str(pipeline_path)
        self.vars = dict(vars or {})
        self.dry_run = dry_run
        self.log_format = log_format

    def execute(self, context: Any) -> dict:
        variables = {str(name): str(value) for name, value in (self.vars or {}).items()}
        for name, value in variables.items():
            if _looks_secret(name) and value:
                mask_secret(value, name)
        path = Path(self.pipeline_path)
        shown = {name: ("***" if _looks_secret(name) else value) for name, value in variables.items()}
        self.log.info("loader: running %s with vars %s%s", path, shown, " (dry run)" if self.dry_run else "")

        with _events_to(self.log, self.log_format):
            try:
                pipeline = load_pipeline(path, variables)
                result = run_pipeline(pipeline, vars=variables, dry_run=self.dry_run)
            except ConfigError as exc:
                raise AirflowFailException(
                    f"loader: invalid pipeline config (exit code 2; not retried, nothing was loaded): {exc}"
                ) from exc
            except LoaderError as exc:
                if exc.exit_code == 3:
                    raise AirflowException(
                        f"loader: run of {path} aborted (exit code 3): {exc}; retryable: the task's next "
                        "try resumes the run and loads nothing twice") from exc
                raise AirflowFailException(
                    f"loader: run of {path} failed (exit code {exc.exit_code}; not retried): {exc}") from exc

        summary = result.summary
        totals = summary["totals"]
        report_dir = result.report.directory
        self.log.info("loader: run %s finished with exit code %d: total=%d successful=%d failed=%d skipped=%d "
                      "(report: %s)", summary["run_id"], result.exit_code, totals["total"], totals["successful"],
                      totals["failed"], totals["skipped"], report_dir)
        if result.exit_code == 0:
            return summary

        _push(context, summary)  # the summary of a failed run is still worth reading
        if result.exit_code == 1:
            message = (f"loader: run {summary['run_id']}: {totals['failed']} rows failed, more than "
                       f"fail_on.failed_rows ({pipeline.fail_on.failed_rows}) allows (exit code 1; not retried: "
                       f"fix the data or the threshold). Failed rows: {report_dir}")
            self.log.error(message)
            raise AirflowFailException(message)
        if result.exit_code == 3:
            message = (f"loader: run {summary['run_id']} aborted (exit code 3): {summary.get('error')}; "
                       "retryable: what was confirmed stays recorded and the task's next try resumes the run "
                       f"without loading anything twice (report: {report_dir})")
            self.log.error(message)
            raise AirflowException(message)
        message = (f"loader: run {summary['run_id']} failed (exit code {result.exit_code}; not retried): "
                   f"{summary.get('error')} (report: {report_dir})")
        self.log.error(message)
        raise AirflowFailException(message)


def _looks_secret(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


def _push(context: Any, summary: dict) -> None:
    ti = context.get("ti") if hasattr(context, "get") else None
    if ti is not None:
        ti.xcom_push(key="summary", value=summary)


class _LoggerStream:
    """A text stream whose every line becomes one INFO record of `logger` (the task's log)."""

    def __init__(self, logger: Any):
        self._logger = logger

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._logger.info(line)
        return len(text)

    def flush(self) -> None:
        pass


class _TaskEvents(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "event", None) in TASK_LOG_EVENTS


@contextmanager
def _events_to(task_log: Any, log_format: str) -> Iterator[None]:
    """Route the `loader` logger's events to the task's log for the duration of a run, then restore it."""
    logger = logging.getLogger("loader")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    handler = configure_logs(log_format, "info", _LoggerStream(task_log))
    handler.addFilter(_TaskEvents())
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
