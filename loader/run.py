"""The core: one run of a pipeline, from source batches to the report.

    source batch -> map -> validate -> dedupe within the source -> drop ids
    already loaded (cache) -> chunk -> target -> outcomes -> cache + report

Each stage is a function of its own module; this one composes them, batch by
batch, so memory is bounded by the batch size and not by the source. Three
threads share the work (Polars and DuckDB release the GIL): a reader reads and
maps batch k+2, the run's thread validates, dedupes, chunks and journals batch
k+1, and a send stage (stage.py) sends batch k and records its answer in the
cache and the report, in source order. The CLI, notebooks and orchestrators all
call `run_pipeline` / `load_frame`.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from .cache import CONFIRMED_COLUMNS, Cache
from .chunk import Chunk, plan_chunks
from .dedupe import SourceDeduper
from .errors import LoaderError, SourceError, TargetError
from .history import History
from .journal import Journal, journal_folder
from .mapping import check_columns, map_batch
from .report import Report, ReportWriter
from .source import (
    SOURCE_FILE,
    SOURCE_ROW,
    Source,
    SourceSpec,
    frame_batches,
    row_counts,
)
from .stage import BackgroundStage, prefetched
from .statedb import open_state
from .targets.base import SendResult, Target
from .validate import Rules, split_valid, warm_up

log = logging.getLogger("loader")

ProgressCallback = Callable[[dict], None]
_REPORT_FIELDS = ("data_stream_key", "external_id", "date", "amount", "currency")


@dataclass
class RunSettings:
    """Everything a run needs besides its rows; built from a Pipeline or from `load_frame` arguments."""

    name: str
    mapping: Any
    rules: Rules
    within_source: str
    cache_path: Path
    on_conflict: str
    chunk_size: int
    report_dir: Path
    report_formats: tuple[str, ...]
    max_failed_rows: int
    pipeline_path: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class RunResult:
    """A finished run: its report and the exit code of the contract."""

    report: Report
    exit_code: int
    error: LoaderError | None = None  # why the run was aborted

    @property
    def summary(self) -> dict:
        return self.report.summary


def new_run_id(now: datetime) -> str:
    # Sortable to the millisecond, unique by its random tail.
    return now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


class Run:
    """One run in progress; `execute` drives it."""

    def __init__(self, settings: RunSettings, target: Target, *, dry_run: bool = False,
                 on_progress: ProgressCallback | None = None, payloads: Any = None):
        self.settings = settings
        self.target = target
        self.dry_run = dry_run
        self.on_progress = on_progress
        self.payloads = payloads
        self.started_at = datetime.now(UTC)
        self.run_id = new_run_id(self.started_at)
        self.directory = settings.report_dir / settings.name / self.run_id
        self.bulk_request_ids: set[int] = set()
        self.chunks_planned = 0
        self.cache_target_id = 0
        self.rows_read = 0
        self.counts = {"successful": 0, "failed": 0, "skipped": 0}
        self.abort: LoaderError | None = None  # why the run stopped sending, once it has
        self._last_planned: Planned | None = None  # set once the source is read to its end
        self._closing_lock = threading.Lock()
        self._target_closed = False

    # -- the whole run ------------------------------------------------------
    def execute(self, batches: Iterator[pl.DataFrame], source_summary: Callable[[], dict]) -> RunResult:
        s = self.settings
        # Batches are read and mapped one ahead on a thread of their own, starting now: the
        # first while the run opens its files, the next while this thread plans the last.
        mapped = prefetched(_mapped(batches, s.mapping))
        try:
            return self._execute(mapped, source_summary)
        finally:
            mapped.close()

    def _execute(self, mapped: Iterator[pl.DataFrame], source_summary: Callable[[], dict]) -> RunResult:
        s = self.settings
        warm_up(s.rules)  # pandera's first use costs ~0.3 s: pay it while the first batch is read
        state = open_state(s.cache_path)
        cache, history = Cache(state), History(state)
        journal = Journal(state, journal_folder(s.cache_path))
        self.cache_target_id = cache.target_id(self.target.target_key)
        history.start(run_id=self.run_id, pipeline=s.name, pipeline_path=s.pipeline_path,
                      target_key=self.target.target_key, target=self.target.describe(), dry_run=self.dry_run,
                      started_at=self.started_at, report_dir=str(self.directory))
        writer = ReportWriter(self.directory, formats=s.report_formats, run_id=self.run_id, pipeline=s.name,
                              started_at=self.started_at, dry_run=self.dry_run, target=self.target.describe(),
                              **s.extra)
        deduper = SourceDeduper(self.target.target_key, scratch_dir=s.cache_path.parent)
        log.info("run started", extra={"event": "run_start", "run_id": self.run_id, "pipeline": s.name})
        errors: list[SourceError] = []  # a source that breaks partway: rows read so far are reported
        # Closing the local engine checkpoints its file (about 0.3 s a million rows): it starts
        # once the last batch is sent, beside recording its answer and writing the report.
        self._closing = BackgroundStage(lambda close: close(), depth=1, name="loader-close-target")
        try:
            try:
                self._load(mapped, state, cache, journal, writer, deduper, errors)
            finally:
                deduper.close()
                self._close_target()
            result = self._finish(writer, history, state, errors, source_summary)
        finally:
            self._closing.close()  # raises what closing the target raised
        return result

    def _close_target(self) -> None:
        """Start closing the target, once (from the send stage after the last send, or at the end)."""
        with self._closing_lock:
            if self._target_closed:
                return
            self._target_closed = True
        self._closing.reserve()
        self._closing.submit(self.target.close)

    def _load(self, batches: Iterator[pl.DataFrame], state: Any, cache: Cache, journal: Journal,
              writer: ReportWriter, deduper: SourceDeduper, errors: list[SourceError]) -> None:
        """Recover what earlier runs left unanswered, then plan, send and settle every batch."""
        s = self.settings
        if not self.dry_run:
            try:
                self.target.prepare()
                self.abort = self._recover(journal, cache)
                journal.sweep()  # row files of chunks never recorded as sent (a crash between the two)
            except TargetError as exc:
                self.abort = exc  # every row is still read and reported, as unprocessed
        # The stage sends batch k and records its answer (own cursor: one connection per thread)
        # while this thread plans batch k+1.
        answers = state.cursor()
        sending = Sending(Cache(answers), Journal(answers, journal.folder), writer)
        stage = BackgroundStage(lambda item: self._send_and_settle(item, sending), name="loader-send")
        planned: Planned | None = None
        mapped_batches = _until_unreadable(batches, on_error=lambda exc: errors.append(exc))
        try:
            while True:
                stage.reserve()  # before taking a batch: no batch waits here while the stage is busy
                mapped = None if stage.failure is not None else next(mapped_batches, None)
                if mapped is None:  # the source is read (or the stage broke: closing it says why)
                    stage.unreserve()
                    break
                self.rows_read += mapped.height
                if self.abort is not None:
                    planned = Planned.unprocessed(mapped, self.abort)
                else:
                    planned = self._plan(mapped, cache, deduper)
                    if planned.chunks and not self.dry_run:
                        # Intent first: a chunk is in the journal before it can reach the target.
                        # Written here, it overlaps with the stage sending the batch before.
                        journal.record_sending(target_key=self.target.target_key, run_id=self.run_id,
                                               on_conflict=s.on_conflict, chunks=planned.chunks,
                                               rows=planned.to_send)
                stage.submit(planned)
                self._progress()
            self._last_planned = planned  # the source is read: after sending this, the target can close
        finally:
            stage.close()

    def _finish(self, writer: ReportWriter, history: History, state: Any, errors: list[SourceError],
                source_summary: Callable[[], dict]) -> RunResult:
        """Write the report, check it adds up, and record the run in the history."""
        s = self.settings
        error = self.abort
        if errors and error is None:
            error = errors[0]
        self._progress()
        finished_at = datetime.now(UTC)
        report = writer.finish(finished_at=finished_at, source=source_summary(),
                               bulk_requests=sorted(self.bulk_request_ids),
                               error=str(error) if error else None)
        exit_code = error.exit_code if error else (1 if report.failed_rows > s.max_failed_rows else 0)
        if isinstance(error, SourceError) and self.bulk_request_ids:
            exit_code = 3  # something was loaded before the source broke: aborted, not refused
        if error is not None:
            log.error("run aborted", extra={"event": "error", "run_id": self.run_id, "pipeline": s.name,
                                            "error": str(error), "exit_code": exit_code})
        history.finish(self.run_id, status="aborted" if error else "finished", finished_at=finished_at,
                       totals=report.totals, exit_code=exit_code, error=str(error) if error else None)
        state.close()
        log.info("run finished", extra={"event": "run_end", "run_id": self.run_id, "pipeline": s.name,
                                        **report.totals, "exit_code": exit_code})
        return RunResult(report=report, exit_code=exit_code, error=error)

    def _send_and_settle(self, planned: Planned, sending: Sending) -> None:
        """The background stage, for one batch (journaled when planned): send, record the answer, report."""
        s = self.settings
        sending.writer.add_source_totals(planned.source_totals)
        if not planned.chunks or self.dry_run:
            self._report(sending.writer, planned.rows())
            return
        if self.abort is not None:
            # Journaled when planned, never sent: out of the journal, or the next run would send it.
            self._record_answers(sending.cache, sending.journal, None,
                                 [chunk.idempotency_key for chunk in planned.chunks])
            self._report(sending.writer, planned.abandon(self.abort))
            return
        self._log_sending(planned.chunks)
        try:
            result = self.target.send(planned.chunks, on_conflict=s.on_conflict)
        except TargetError as exc:
            self.abort = exc
            self._report(sending.writer, planned.abandon(exc))
            return
        if planned is self._last_planned:
            self._close_target()
        self._log_requests(planned.chunks, result)
        sent = _sent_outcomes(planned.to_send, result, on_conflict=s.on_conflict)
        confirmed = sent.filter(pl.col("reason_code").is_in(["created", "exists_in_target"]))
        self._record_answers(sending.cache, sending.journal, confirmed,
                             [chunk.idempotency_key for chunk in planned.chunks])
        self._report(sending.writer, planned.rows(sent))

    # -- one batch ------------------------------------------------------------
    def _plan(self, mapped: pl.DataFrame, cache: Cache, deduper: SourceDeduper) -> Planned:
        """Everything about a batch that needs no target: outcomes known now, and the chunks to send."""
        s = self.settings
        valid, invalid = split_valid(mapped, s.rules)
        known = [_outcome(invalid, "failed", "invalid")]
        deduplicated = deduper.split(valid)
        duplicate_outcome = "failed" if s.within_source == "fail" else "skipped"
        known.append(_outcome(deduplicated.duplicates, duplicate_outcome, "duplicate_in_source"))

        unique = deduplicated.unique
        is_loaded, loaded = cache.loaded_mask(unique)
        already = unique.filter(is_loaded).with_columns(
            pl.format("loaded before in bulk request {}", loaded.get_column("bulk_request_id")).alias("reason")
        )
        known.append(_outcome(already, "skipped", "already_loaded"))
        to_send, chunks = plan_chunks(
            unique.filter(~is_loaded),
            chunk_size=s.chunk_size, target_key=self.target.target_key, on_conflict=s.on_conflict,
            first_number=self.chunks_planned,
        )
        self.chunks_planned += len(chunks)
        if self.payloads is not None:
            self.payloads.write(chunks, on_conflict=s.on_conflict)
        if self.dry_run:
            known.append(_dry_run_outcomes(to_send))
        return Planned(known=known, to_send=to_send, chunks=chunks, source_totals=_source_totals(mapped))

    def _record_answers(self, cache: Cache, journal: Journal, confirmed: pl.DataFrame | None,
                        keys: list[str]) -> None:
        """The cache learns what the target confirmed, and the chunks leave the journal: one transaction."""
        cache.con.execute("begin")
        if confirmed is not None:
            cache.record_confirmed(self.cache_target_id, confirmed.select(CONFIRMED_COLUMNS).to_arrow())
        files = journal.confirm(keys)
        cache.con.execute("commit")
        journal.forget(files)

    def _recover(self, journal: Journal, cache: Cache) -> LoaderError | None:
        """Send again, unchanged and under their keys, the chunks an earlier run sent but never heard of."""
        unanswered, rows = journal.unanswered(self.target.target_key)
        if unanswered.height == 0:
            return None
        by_key = {key[0]: frame for key, frame in rows.partition_by("idempotency_key", as_dict=True).items()}
        for (on_conflict,), group in unanswered.group_by("on_conflict", maintain_order=True):
            chunks = []
            for key in group["idempotency_key"].to_list():
                frame = by_key.get(key)
                if frame is None or frame.height == 0:
                    continue
                chunks.append(Chunk(number=self.chunks_planned, idempotency_key=key,
                                    rows=frame.sort("index").with_columns(pl.lit(self.chunks_planned).alias("chunk"))))
                self.chunks_planned += 1
            if not chunks:
                journal.confirm(group["idempotency_key"].to_list())
                continue
            try:
                result = self.target.send(chunks, on_conflict=on_conflict)
            except TargetError as exc:
                return exc
            sent = pl.concat([chunk.rows for chunk in chunks]).with_columns(pl.col("index").cast(pl.Int64))
            answered = sent.join(result.items, on=["chunk", "index"], how="inner").join(
                result.requests.select("chunk", "bulk_request_id"), on="chunk")
            confirmed = answered.filter(pl.col("status").is_in(["successful", "skipped"]))
            self._record_answers(cache, journal, confirmed, group["idempotency_key"].to_list())
            self.bulk_request_ids.update(result.requests["bulk_request_id"].to_list())
            for request in result.requests.iter_rows(named=True):
                log.info("chunk recovered", extra={
                    "event": "chunk_recovered", "run_id": self.run_id, "pipeline": self.settings.name,
                    "chunk": request["chunk"], "bulk_request_id": request["bulk_request_id"],
                    "status": request["status"]})
        return None

    def _report(self, writer: ReportWriter, rows: pl.DataFrame) -> None:
        writer.add_rows(rows)
        for outcome, n in rows.group_by("outcome").len().iter_rows():
            self.counts[outcome] += n

    def _progress(self) -> None:
        # Called on the run's own thread, so a notebook's display is updated where it was made.
        if self.on_progress is not None:
            self.on_progress({"run_id": self.run_id, "rows": self.rows_read, **self.counts})

    def _log_sending(self, chunks: list[Chunk]) -> None:
        if log.isEnabledFor(logging.INFO):
            for chunk in chunks:
                log.info("chunk sent", extra={
                    "event": "chunk_sent", "run_id": self.run_id, "pipeline": self.settings.name,
                    "chunk": chunk.number, "idempotency_key": chunk.idempotency_key, "rows": len(chunk)})

    def _log_requests(self, chunks: list[Chunk], result: SendResult) -> None:
        self.bulk_request_ids.update(result.requests["bulk_request_id"].to_list())
        if not log.isEnabledFor(logging.INFO):
            return
        keys = {chunk.number: chunk.idempotency_key for chunk in chunks}
        for request in result.requests.iter_rows(named=True):
            log.info("chunk confirmed", extra={
                "event": "chunk_confirmed", "run_id": self.run_id, "pipeline": self.settings.name,
                "chunk": request["chunk"], "idempotency_key": keys[request["chunk"]],
                "bulk_request_id": request["bulk_request_id"], "status": request["status"]})


@dataclass
class Sending:
    """What the background stage writes to: its own cursor on the state file, and the report."""

    cache: Cache
    journal: Journal
    writer: ReportWriter


@dataclass
class Planned:
    """A batch between planning and settling."""

    known: list[pl.DataFrame]  # outcomes decided without the target
    to_send: pl.DataFrame  # rows for the target, with `chunk` and `index`
    chunks: list[Chunk]
    source_totals: pl.DataFrame  # rows and amount per stream and currency, as read

    @classmethod
    def unprocessed(cls, mapped: pl.DataFrame, error: LoaderError) -> Planned:
        """A batch read after the run stopped sending: every row `unprocessed`."""
        reason = f"not sent: the run was aborted ({error})"
        rows = _outcome(mapped.with_columns(pl.lit(reason).alias("reason")), "failed", "unprocessed")
        return cls(known=[rows], to_send=mapped.head(0), chunks=[], source_totals=_source_totals(mapped))

    def rows(self, sent: pl.DataFrame | None = None) -> pl.DataFrame:
        parts = self.known if sent is None else [*self.known, sent]
        # Back in source order: by the batch position map_batch's caller gave each row.
        return pl.concat([p.select(*_ROW_SELECT, "_pos") for p in parts], how="vertical_relaxed").sort(
            "_pos"
        ).drop("_pos")

    def abandon(self, error: LoaderError) -> pl.DataFrame:
        """The batch's rows when its send failed: the unsent ones are `unprocessed`."""
        unsent = self.to_send.with_columns(pl.lit(f"not sent: the run was aborted ({error})").alias("reason"))
        return self.rows(_outcome(unsent, "failed", "unprocessed"))


def _mapped(batches: Iterator[pl.DataFrame], mapping: Any) -> Iterator[pl.DataFrame]:
    """Each source batch mapped onto the record contract, with its position in the batch (`_pos`)."""
    for batch in batches:
        yield map_batch(batch, mapping).with_row_index("_pos")


def _until_unreadable(batches: Iterator[pl.DataFrame], *, on_error: Callable[[SourceError], None]
                      ) -> Iterator[pl.DataFrame]:
    """The source's batches until one cannot be read; that error goes to `on_error`."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except SourceError as exc:
            on_error(exc)
            return
        yield batch


# -- outcomes -----------------------------------------------------------------

_ROW_SELECT = [
    pl.col(SOURCE_FILE), pl.col(SOURCE_ROW), *[pl.col(c) for c in _REPORT_FIELDS],
    pl.col("outcome"), pl.col("reason_code"), pl.col("reason"), pl.col("bulk_request_id"), pl.col("record_id"),
]


def _outcome(rows: pl.DataFrame, outcome: str, reason_code: str) -> pl.DataFrame:
    extra = []
    if "reason" not in rows.columns:
        extra.append(pl.lit(None, dtype=pl.String).alias("reason"))
    if "bulk_request_id" not in rows.columns:
        extra.append(pl.lit(None, dtype=pl.Int64).alias("bulk_request_id"))
    if "record_id" not in rows.columns:
        extra.append(pl.lit(None, dtype=pl.Int64).alias("record_id"))
    return rows.with_columns(
        *extra, pl.lit(outcome).alias("outcome"), pl.lit(reason_code).alias("reason_code")
    )


def _dry_run_outcomes(to_send: pl.DataFrame) -> pl.DataFrame:
    return _outcome(
        to_send.with_columns(
            pl.format("dry run: would be sent in bulk request {} of this run", pl.col("chunk") + 1).alias("reason")
        ),
        "skipped",
        "dry_run",
    )


def _sent_outcomes(to_send: pl.DataFrame, result: SendResult, *, on_conflict: str) -> pl.DataFrame:
    """Each sent row's outcome, from its bulk request and its item (none: unprocessed)."""
    rows = pl.concat([to_send, _answers_in_order(to_send, result)], how="horizontal")
    status, error = pl.col("status"), pl.col("error").fill_null("").str.to_lowercase()
    looks_like_conflict = (
        pl.lit(on_conflict == "error") & pl.col("external_id").is_not_null()
        & (error.str.contains("already exists") | error.str.contains("conflict"))
    )
    outcome_code = (
        pl.when((status == "successful") & pl.col("preexisting")).then(pl.lit("skipped:exists_in_target"))
        .when(status == "successful").then(pl.lit("successful:created"))
        .when(status == "skipped").then(pl.lit("skipped:exists_in_target"))
        .when((status == "failed") & looks_like_conflict).then(pl.lit("failed:conflict"))
        .when(status == "failed").then(pl.lit("failed:rejected"))
        .otherwise(pl.lit("failed:unprocessed"))
    )
    reason = (
        pl.when((status == "successful") & pl.col("preexisting"))
        .then(pl.format("created earlier by bulk request {} (same Idempotency-Key)", pl.col("bulk_request_id")))
        .when(status == "successful").then(None)
        .when(status == "skipped")
        .then(pl.format("the target already holds external_id '{}' in data stream '{}'",
                        pl.col("external_id"), pl.col("data_stream_key")))
        .when(status == "failed").then(pl.col("error"))
        .otherwise(pl.format("bulk request {} ended {}{}; a later run sends this row again",
                             pl.col("bulk_request_id"), pl.col("_request_status"),
                             pl.when(pl.col("error_message").is_not_null())
                             .then(pl.lit(": ") + pl.col("error_message")).otherwise(pl.lit(""))))
    )
    parts = outcome_code.str.split_exact(":", 1)
    return rows.with_columns(
        parts.struct.field("field_0").alias("outcome"),
        parts.struct.field("field_1").alias("reason_code"),
        reason.alias("reason"),
        pl.when(status == "successful").then(pl.col("record_id")).otherwise(None).alias("record_id"),
    )


def _answers_in_order(to_send: pl.DataFrame, result: SendResult) -> pl.DataFrame:
    """Each sent row's request and item columns, in the order of `to_send`.

    Joins only the narrow (chunk, index) columns; when the target answered every row in
    order (the usual case), the items are taken as they are, without a join.
    """
    sent = to_send.select("chunk", pl.col("index").cast(pl.Int64))
    requests = sent.join(result.requests.rename({"status": "_request_status"}), on="chunk", how="left",
                         maintain_order="left")
    items = result.items
    in_order = items.height == sent.height and items.select("chunk", "index").equals(sent)
    if not in_order:
        items = sent.join(items, on=["chunk", "index"], how="left", maintain_order="left")
    return pl.concat([requests.drop("chunk", "index"), items.select("status", "record_id", "error")],
                     how="horizontal")


def _source_totals(mapped: pl.DataFrame) -> pl.DataFrame:
    return mapped.group_by("data_stream_key", "currency").agg(
        pl.len().alias("rows"), pl.col("amount").sum().alias("amount")
    )


# -- entry points -------------------------------------------------------------


def settings_from_pipeline(pipeline: Any) -> RunSettings:
    return RunSettings(
        name=pipeline.name,
        mapping=pipeline.mapping,
        rules=Rules.from_config(pipeline.validation),
        within_source=pipeline.dedupe.within_source,
        cache_path=Path(pipeline.dedupe.cache),
        on_conflict=pipeline.target.on_conflict,
        chunk_size=pipeline.target.chunk_size,
        report_dir=Path(pipeline.report.dir),
        report_formats=tuple(pipeline.report.formats),
        max_failed_rows=pipeline.fail_on.failed_rows,
        pipeline_path=str(pipeline.path) if getattr(pipeline, "path", None) else None,
    )


def make_target(pipeline: Any) -> Target:
    """The pipeline's target, not yet connected."""
    from .errors import ConfigError
    from .targets.local import LocalTarget

    t = pipeline.target
    if t.type == "local":
        streams = [s.model_dump() if hasattr(s, "model_dump") else dict(s) for s in (t.streams or [])]
        return LocalTarget(Path(t.database), t.environment, streams)
    if t.type == "api":
        from .targets.http import HttpTarget

        return HttpTarget.from_config(t)
    raise ConfigError([("target.type", f"target type {t.type!r} is not supported by this version of loader")])


def run_pipeline(pipeline: Any, *, vars: Mapping[str, str] | None = None, dry_run: bool = False,
                 on_progress: ProgressCallback | None = None, payloads_dir: Path | None = None) -> RunResult:
    """Run a pipeline (a path to pipeline.yaml, or a loaded Pipeline) and return its result."""
    from .config import load_pipeline

    if not hasattr(pipeline, "mapping"):
        pipeline = load_pipeline(Path(pipeline), vars or {})
    settings = settings_from_pipeline(pipeline)
    spec = SourceSpec.from_pipeline(pipeline)
    with Source(spec) as source:
        check_columns(pipeline.mapping, source.columns)
        run = Run(settings, make_target(pipeline), dry_run=dry_run, on_progress=on_progress,
                  payloads=_payload_writer(payloads_dir))
        files = [str(f) for f in spec.files] if spec.query is None else ["query"]
        return run.execute(source.batches(), lambda: {"files": row_counts(files, source.file_rows)})


def load_frame(frame: pl.DataFrame, settings: RunSettings, target: Target, *, dry_run: bool = False,
               on_progress: ProgressCallback | None = None) -> RunResult:
    """Load an in-memory Polars DataFrame with the given settings and target."""
    check_columns(settings.mapping, frame.columns)
    run = Run(settings, target, dry_run=dry_run, on_progress=on_progress)
    return run.execute(frame_batches(frame), lambda: {"files": [{"path": "dataframe", "rows": frame.height}]})


def _payload_writer(directory: Path | None) -> Any:
    if directory is None:
        return None
    from .payloads import PayloadWriter

    return PayloadWriter(Path(directory))


def validated_batches(pipeline: Any) -> Iterator[tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]]:
    """(source batch, valid rows, invalid rows) of a pipeline's source: what `run` checks, loading nothing."""
    rules = Rules.from_config(pipeline.validation)
    with Source(SourceSpec.from_pipeline(pipeline)) as source:
        check_columns(pipeline.mapping, source.columns)
        for batch in source.batches():
            valid, invalid = split_valid(map_batch(batch, pipeline.mapping), rules)
            yield batch, valid, invalid


def validate_pipeline(pipeline: Any, *, vars: Mapping[str, str] | None = None, top: int = 10) -> dict:
    """Read, map and validate the source; load nothing. Counts and the most common reasons."""
    from .config import load_pipeline

    if not hasattr(pipeline, "mapping"):
        pipeline = load_pipeline(Path(pipeline), vars or {})
    counts = {"rows": 0, "valid": 0, "invalid": 0}
    reasons: list[pl.DataFrame] = []
    for batch, valid, invalid in validated_batches(pipeline):
        counts["rows"] += batch.height
        counts["valid"] += valid.height
        counts["invalid"] += invalid.height
        reasons.append(invalid.group_by("reason").len("rows"))
    merged = (
        pl.concat(reasons).group_by("reason").agg(pl.col("rows").sum()).sort("rows", "reason", descending=[True, False])
        if reasons else pl.DataFrame(schema={"reason": pl.String, "rows": pl.UInt32})
    )
    return {**counts, "reasons": merged.head(top).to_dicts()}
