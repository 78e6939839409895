"""The `loader` command: parse, call the library, print, exit. No logic of its own."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import ConfigError, LoaderError, RetryableTargetError

EXIT_USAGE = 2


def _fail(exc: LoaderError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a LoaderError into its one-line message and exit code."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LoaderError as exc:
            _fail(exc)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _vars(items: tuple[str, ...]) -> dict[str, str]:
    from .config import parse_var_assignments

    return parse_var_assignments(items)


def _load(pipeline_file: str, var: tuple[str, ...]) -> Any:
    from .config import load_pipeline

    return load_pipeline(Path(pipeline_file), _vars(var))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loader")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines on stderr as text, or as one JSON object per event (for schedulers).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Default: info with --log-format json; with text, no event lines (the command prints "
                   "its own summary and errors).")
def main(log_format: str, log_level: str | None) -> None:
    """Load financial records into EndClose: map, validate, dedupe, bulk-load, report."""
    from .logs import configure

    configure(log_format, log_level or ("info" if log_format == "json" else "critical"))


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--var", "var", multiple=True, metavar="K=V", help="Set ${K} in pipeline.yaml (repeatable).")
@click.option("--dry-run", is_flag=True, help="Stop before the target; report what would be sent.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--payloads", "payloads_dir", type=click.Path(file_okay=False), default=None,
              help="Also write each bulk request body, as sent, to DIR/<n>.json.")
@_guard
def run(pipeline_file: str, var: tuple[str, ...], dry_run: bool, as_json: bool, payloads_dir: str | None) -> None:
    """Run the pipeline: read, map, validate, dedupe, load, and write the report."""
    from .progress import terminal_progress
    from .report import format_summary_text
    from .run import run_pipeline

    pipeline = _load(pipeline_file, var)
    with terminal_progress() as on_progress:
        result = run_pipeline(pipeline, dry_run=dry_run, on_progress=on_progress,
                              payloads_dir=Path(payloads_dir) if payloads_dir else None)
    if as_json:
        click.echo(json.dumps(result.summary, indent=2, default=str))
    else:
        click.echo(format_summary_text(result.summary))
        click.echo(f"report: {result.report.directory}")
    if result.exit_code == 1:
        click.echo(
            f"error: {result.report.failed_rows} rows failed, more than fail_on.failed_rows "
            f"({pipeline.fail_on.failed_rows}); see {result.report.directory / 'rows.parquet'}",
            err=True,
        )
    elif result.error is not None:
        hint = "; run the same command again to finish the job" if isinstance(result.error, RetryableTargetError) else ""
        click.echo(f"error: {result.error}{hint}", err=True)
    sys.exit(result.exit_code)


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--var", "var", multiple=True, metavar="K=V", help="Set ${K} in pipeline.yaml (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@_guard
def reconcile(pipeline_file: str, var: tuple[str, ...], as_json: bool) -> None:
    """Compare the source with what the target holds for the pipeline's streams. Loads nothing.

    Writes summary.json and diff.parquet under report.dir; exit 0 when every key matched, 1 otherwise.
    """
    from .reconcile import format_reconcile_text, reconcile_pipeline

    result = reconcile_pipeline(_load(pipeline_file, var))
    if as_json:
        click.echo(json.dumps(result.summary, indent=2, default=str))
    else:
        click.echo(format_reconcile_text(result.summary))
    sys.exit(result.exit_code)


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--var", "var", multiple=True, metavar="K=V", help="Set ${K} in pipeline.yaml (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@_guard
def validate(pipeline_file: str, var: tuple[str, ...], as_json: bool) -> None:
    """Check the config, then read and validate the data. Loads nothing."""
    from .run import validate_pipeline

    pipeline = _load(pipeline_file, var)
    result = validate_pipeline(pipeline)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(f"config ok; {result['rows']} rows read: {result['valid']} valid, {result['invalid']} invalid")
        for reason in result["reasons"]:
            click.echo(f"  {reason['rows']:>8}  {reason['reason']}")
    sys.exit(1 if result["invalid"] > pipeline.fail_on.failed_rows else 0)


@main.group()
def streams() -> None:
    """Data streams of the local engine."""


@streams.command("add")
@click.argument("key")
@click.option("--name", default=None, help="Display name (defaults to KEY).")
@click.option("--description", default=None)
@click.option("--database", required=True, type=click.Path(dir_okay=False), help="The local engine's DuckDB file.")
@click.option("--environment", default="default", show_default=True)
@_guard
def streams_add(key: str, name: str | None, description: str | None, database: str, environment: str) -> None:
    """Create a data stream."""
    from .engine import Engine

    with Engine.open(Path(database)) as engine:
        engine.ensure_environment(environment)
        stream = engine.create_stream(environment, key, name or key, description=description)
    click.echo(json.dumps(stream, default=str))


@streams.command("list")
@click.option("--database", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--environment", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_guard
def streams_list(database: str, environment: str, as_json: bool) -> None:
    """List the data streams of an environment."""
    from .engine import Engine

    with Engine.open(Path(database), read_only=True) as engine:
        rows = engine.list_streams(environment)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    for stream in rows:
        click.echo(f"{stream['key']}\t{stream['name']}\t{stream.get('description') or ''}")


def _history(pipeline_file: str | None, cache: str | None) -> Any:
    from .history import History
    from .statedb import open_state

    if pipeline_file:
        path = Path(_load(pipeline_file, ()).dedupe.cache)
    else:
        path = Path(cache or ".loader/cache.duckdb")
    return History(open_state(path, read_only=True), read_only=True)


@main.command()
@click.argument("pipeline_file", required=False, type=click.Path(dir_okay=False))
@click.option("--cache", default=None, help="The state file, when no PIPELINE_FILE is given.",
              show_default=".loader/cache.duckdb")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_guard
def runs(pipeline_file: str | None, cache: str | None, limit: int, as_json: bool) -> None:
    """The run history, newest first."""
    name = _load(pipeline_file, ()).name if pipeline_file else None
    rows = _history(pipeline_file, cache).list(pipeline=name, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    for r in rows:
        click.echo(
            f"{r['run_id']}  {r['pipeline']:<24} {r['status']:<9} {'dry-run ' if r['dry_run'] else ''}"
            f"total={r['total']} successful={r['successful']} failed={r['failed']} skipped={r['skipped']}"
        )


@main.command()
@click.argument("run_id")
@click.argument("pipeline_file", required=False, type=click.Path(dir_okay=False))
@click.option("--cache", default=None, help="The state file, when no PIPELINE_FILE is given.",
              show_default=".loader/cache.duckdb")
@click.option("--json", "as_json", is_flag=True)
@_guard
def report(run_id: str, pipeline_file: str | None, cache: str | None, as_json: bool) -> None:
    """One run's summary."""
    from .report import Report, format_summary_text

    found = _history(pipeline_file, cache).get(run_id)
    if found is None:
        raise ConfigError([("RUN_ID", f"no run {run_id!r} in the history; `loader runs` lists them")])
    summary = Report.load(Path(found["report_dir"])).summary
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        click.echo(format_summary_text(summary))
        click.echo(f"report: {found['report_dir']}")


def _api_keys(items: tuple[str, ...]) -> dict[str, str]:
    """`KEY[=ENVIRONMENT]` -> {key: environment}; the environment defaults to `default`."""
    keys = {}
    for position, item in enumerate(items, start=1):
        key, _, environment = item.partition("=")
        if not key:
            raise ConfigError([("--api-key", f"argument {position} is empty; give KEY or KEY=ENVIRONMENT")])
        keys[key] = environment or "default"
    return keys


@main.command()
@click.option("--database", required=True, type=click.Path(dir_okay=False), help="The local engine's DuckDB file.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, help="Port to listen on; 0 picks a free one.")
@click.option("--api-key", "api_key", multiple=True, required=True, metavar="KEY[=ENVIRONMENT]",
              help="An accepted X-API-KEY and the environment it sees (default: default). Repeatable.")
@click.option("--latency", default=0, show_default=True, metavar="MS", help="Fault injection: added latency per request.")
@click.option("--fail-rate", default=0.0, show_default=True, metavar="F", help="Fault injection: share of requests answered 503.")
@click.option("--throttle-rate", default=0.0, show_default=True, metavar="F",
              help="Fault injection: share of requests answered 429 with Retry-After.")
@click.option("--drop-rate", default=0.0, show_default=True, metavar="F",
              help="Fault injection: share of bulk requests committed, then the connection dropped unanswered.")
@click.option("--job-fail-rate", default=0.0, show_default=True, metavar="F",
              help="Fault injection: share of bulk request jobs that fail midway.")
@click.option("--seed", default=None, type=int, help="Seed for the fault injection's random choices.")
@_guard
def serve(database: str, host: str, port: int, api_key: tuple[str, ...], latency: int, fail_rate: float,
          throttle_rate: float, drop_rate: float, job_fail_rate: float, seed: int | None) -> None:
    """Serve the local engine over the EndClose HTTP API (under /v1)."""
    from .server import Faults, serve as serve_forever

    faults = Faults(latency_ms=latency, fail_rate=fail_rate, throttle_rate=throttle_rate, drop_rate=drop_rate,
                    job_fail_rate=job_fail_rate, seed=seed)
    serve_forever(Path(database), host=host, port=port, api_keys=_api_keys(api_key), faults=faults,
                  on_ready=lambda url: click.echo(f"loader serve listening on {url}", nl=True))


@main.group()
def cache() -> None:
    """The local cache of ids already loaded."""


@cache.command("sync")
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--var", "var", multiple=True, metavar="K=V", help="Set ${K} in pipeline.yaml (repeatable).")
@click.option("--json", "as_json", is_flag=True)
@_guard
def cache_sync(pipeline_file: str, var: tuple[str, ...], as_json: bool) -> None:
    """Fill the cache with the external_ids the target already holds for the pipeline's streams."""
    from .cache_sync import sync_cache

    result = sync_cache(_load(pipeline_file, var))
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(f"{result['added']} ids added to the cache ({result['seen']} held by the target)")


# Polars' allocator (its own jemalloc, configured by this variable) with jemalloc's own decay:
# freed pages kept for 10 s, handed back by a background thread. With Polars' setting
# (`import polars` writes POLARS_OWN_ALLOCATOR when the variable is unset) freed pages go back
# within a second, and a run faults most of them in again: 3.4 million page faults in a
# 10M-row run instead of 2.0 million, and 69.5 s of CPU instead of 53.6 s (docs/benchmarks.md).
POLARS_ALLOCATOR_VARIABLE = "_RJEM_MALLOC_CONF"
POLARS_ALLOCATOR = "background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:0"
POLARS_OWN_ALLOCATOR = "dirty_decay_ms:500,muzzy_decay_ms:1000"


def prepare_process() -> None:
    """Set up Polars' allocator (POLARS_ALLOCATOR) while Polars is not loaded yet.

    A value the user set wins. Polars' own value does not count as the user's: a parent
    process that imported Polars (a scheduler, a notebook, a test) passes it on to the
    command. This is the command's choice for its own process: the library never sets it,
    as it may load after Polars, in a process that is its caller's.
    """
    if "polars" in sys.modules:
        return
    current = os.environ.get(POLARS_ALLOCATOR_VARIABLE, "")
    if set(filter(None, current.split(","))) <= set(POLARS_OWN_ALLOCATOR.split(",")):
        os.environ[POLARS_ALLOCATOR_VARIABLE] = POLARS_ALLOCATOR


def entry() -> None:
    """The `loader` command: `main`, then leave without the interpreter's teardown.

    Tearing down Polars, DuckDB and Arrow after a run (freeing each object, joining
    thread pools) takes about 0.25 s for a million rows, longer than many a small
    run. Every file and database is closed by then; logs and output are flushed here.
    Callers in the same process (tests, notebooks) call `main` and are not affected.
    """
    prepare_process()
    code = 0
    try:
        main.main(standalone_mode=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if isinstance(exit_.code, str):
            sys.stderr.write(exit_.code + "\n")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
