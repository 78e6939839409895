"""The Engine: one EndClose store in one DuckDB file, behind the API's verbs."""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence

import duckdb
import polars as pl

from loader.errors import LockedError, TerminalTargetError

from . import bulk, lifecycle, queries, streams
from .currencies import CURRENCIES_VIEW, currency_table
from .model import BulkSubmission
from .queries import utc_now
from .schema import allocate_ids, create_schema

# DuckDB's memory for one engine file. Bounded, so memory does not grow with the database
# (DuckDB would otherwise keep every block it read cached, up to 80% of RAM). A 10M-row backfill
# onto 4.9M records runs within 64 MB (bench/backfill.py); 128 MB leaves room for wider records,
# and an environment variable raises it for records far larger (descriptions of megabytes).
MEMORY_LIMIT_VARIABLE = "LOADER_ENGINE_MEMORY_LIMIT"
DEFAULT_MEMORY_LIMIT = "128MB"
# Rows per DuckDB row group. An append at least this large is stored as whole row groups
# but for the last one; see Engine._choose_vacuum.
ROW_GROUP_ROWS = 122_880

# DuckDB shares one database instance between the connections of a process,
# and two transactions writing the same row conflict. So every Engine of the
# same file in this process takes the same lock for each call.
_locks_guard = threading.Lock()
_locks: dict[str, threading.RLock] = {}


def _lock_for(path: Path) -> threading.RLock:
    with _locks_guard:
        return _locks.setdefault(str(path), threading.RLock())


class Engine:
    """An EndClose environment store: data streams, bulk requests and records.

    Thread-safe: writes are serialised per database file; reads run on a
    cursor of their own thread, in a snapshot, beside the writer (DuckDB's
    MVCC), so a server's polls never wait for its worker. Share one Engine per
    file in a process (DuckDB lets a single process hold the file).
    """

    def __init__(self, connection: duckdb.DuckDBPyConnection, path: Path, *, read_only: bool):
        self._con: duckdb.DuckDBPyConnection | None = connection
        self.path = path
        self.read_only = read_only
        self._lock = _lock_for(path)
        self._readers = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        # The readers' cursors and how many reads are running, apart from the writer's lock.
        self._reads = threading.Condition()
        self._reading = 0
        self._closing = False
        self._records_at_open = 0 if read_only else _record_count(connection)

    # -- opening and transactions --------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, read_only: bool = False) -> "Engine":
        """Open (creating file and tables if missing) the engine database at `path`.

        Raises LockedError when another process holds the file.
        """
        path = Path(path).expanduser().resolve()
        if read_only and not path.exists():
            raise TerminalTargetError(f"{path}: no such local database; load something into it first")
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = duckdb.connect(str(path), read_only=read_only, config={"memory_limit": memory_limit()})
        except duckdb.IOException as error:
            if "could not set lock" in str(error).lower():
                pid = re.search(r"PID (\d+)", str(error))
                holder = f" (PID {pid.group(1)})" if pid else ""
                raise LockedError(
                    f"{path} is in use by another loader process{holder}: wait for it to finish "
                    "or stop it, then run the command again"
                ) from None
            raise TerminalTargetError(f"{path}: cannot open the local database: {error}") from None
        except duckdb.Error as error:
            raise TerminalTargetError(f"{path}: cannot open the local database: {error}") from None
        try:
            # A view of this connection only, so it works on read-only files too.
            connection.register(CURRENCIES_VIEW, currency_table())
            if not read_only:
                with _lock_for(path):
                    create_schema(connection, str(path))
        except duckdb.Error as error:
            connection.close()
            raise TerminalTargetError(f"{path}: not a usable local database: {error}") from None
        except BaseException:
            connection.close()
            raise
        return cls(connection, path, read_only=read_only)

    def close(self) -> None:
        """Close the database file (idempotent), once the reads running finish; later ones fail."""
        with self._lock:
            if self._con is not None:
                with self._reads:
                    # DuckDB refuses to close a cursor in the middle of a query.
                    self._closing = True
                    self._reads.wait_for(lambda: self._reading == 0)
                    for cursor in self._cursors:
                        cursor.close()
                    self._cursors.clear()
                if not self.read_only:
                    self._choose_vacuum()
                self._con.close()
                self._con = None

    def _choose_vacuum(self) -> None:
        """Whether the checkpoint on close merges partial row groups (DuckDB's vacuum).

        The merge rewrites the partial row groups that bulk appends leave behind: a few hundred
        thousand rows (0.4 s of a 4 s load of a million rows) copied into new blocks. Large
        appends are whole row groups but for their last, so they skip it; small ones keep it,
        so that tiny row groups do not pile up. The setting is the database's, shared by the
        connections of this process: each close sets it one way or the other.
        """
        try:
            appended = _record_count(self._con) - self._records_at_open
            self._con.execute("SET max_vacuum_tasks = 0" if appended >= ROW_GROUP_ROWS else "RESET max_vacuum_tasks")
        except duckdb.Error:
            pass  # a choice about tidiness never keeps the file from closing

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"Engine({str(self.path)!r}, {mode})"

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        # One transaction per call (or per worker step); DuckDB errors become
        # loader errors here, at the edge where DuckDB is called.
        with self._lock:
            if self._con is None:
                raise TerminalTargetError(f"{self.path}: the engine is closed")
            con = self._con
            try:
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    try:
                        con.execute("ROLLBACK")
                    except duckdb.Error:
                        pass  # the original error says more than a failed rollback
                    raise
                con.execute("COMMIT")
            except duckdb.Error as error:
                raise self._database_error(error) from None

    @contextmanager
    def _snapshot(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only transaction on this thread's own cursor, beside any writer.

        The writer's lock is not taken: a write holds it for its whole transaction
        (40 ms for a 1000-row request), and every poll and result page would wait for it.
        """
        cursor = self._begin_read()
        try:
            cursor.execute("BEGIN TRANSACTION")
            try:
                yield cursor
            finally:
                cursor.execute("ROLLBACK")  # nothing was written; end the snapshot
        except duckdb.Error as error:
            raise self._database_error(error) from None
        finally:
            with self._reads:
                self._reading -= 1
                self._reads.notify_all()

    def _database_error(self, error: duckdb.Error) -> TerminalTargetError:
        return TerminalTargetError(f"{self.path}: local database error: {_explained(error)}")

    def _begin_read(self) -> duckdb.DuckDBPyConnection:
        """Count a read in, on this thread's cursor (made on first use); closed: TerminalTargetError."""
        with self._reads:
            con = self._con
            if con is None or self._closing:
                raise TerminalTargetError(f"{self.path}: the engine is closed")
            if getattr(self._readers, "owner", None) is con:
                cursor = self._readers.cursor
            else:
                # A cursor is a connection of its own to the same database: making one does
                # not touch the writer's transaction.
                try:
                    cursor = con.cursor()
                    cursor.register(CURRENCIES_VIEW, currency_table())
                except duckdb.Error as error:
                    raise self._database_error(error) from None
                self._cursors.append(cursor)
                self._readers.cursor, self._readers.owner = cursor, con
            self._reading += 1
        return cursor

    # -- environments and data streams -----------------------------------------------------

    def ensure_environment(self, name: str) -> None:
        """Create the environment `name` if it does not exist."""
        with self._transaction() as con:
            streams.ensure_environment(con, name, utc_now())

    def create_stream(
        self, environment: str, key: str, name: str, type: str = "api", description: str | None = None
    ) -> dict:
        """POST /data_streams: the new stream; Unprocessable if key/name are empty or key is taken."""
        stream = {"key": key, "name": name, "type": type, "description": description}
        with self._transaction() as con:
            streams.create_streams(con, environment, [stream], utc_now(), skip_existing=False)
            return streams.get_stream(con, environment, key)

    def ensure_streams(self, environment: str, stream_specs: list[dict]) -> list[str]:
        """Create the streams (dicts: key, name, description?) that do not exist; the keys created."""
        with self._transaction() as con:
            return streams.create_streams(con, environment, stream_specs, utc_now(), skip_existing=True)

    def list_streams(self, environment: str) -> list[dict]:
        """GET /data_streams: the environment's streams."""
        with self._snapshot() as con:
            return streams.list_streams(con, environment)

    def get_stream(self, environment: str, key: str) -> dict:
        """GET /data_streams/{key}; NotFound when unknown."""
        with self._snapshot() as con:
            return streams.get_stream(con, environment, key)

    def stream_health(self, environment: str, key: str) -> dict:
        """GET /data_streams/{key}/health: records_count, bulk_requests by status, last_ingestion_at."""
        with self._snapshot() as con:
            return streams.stream_health(con, environment, key, utc_now())

    # -- bulk requests ---------------------------------------------------------------------

    def submit(
        self, environment: str, submissions: Sequence[BulkSubmission], *, process: bool = True
    ) -> list[dict]:
        """POST /records/bulk for each submission, in one transaction; summaries in input order.

        With `process` the new requests are applied at once (completed);
        otherwise they stay pending for process_pending.
        """
        with self._transaction() as con:
            now = utc_now()
            streams.ensure_environment(con, environment, now)
            return bulk.submit(con, environment, list(submissions), process=process, now=now)

    def process_pending(
        self,
        bulk_request_ids: Sequence[int] | None = None,
        *,
        slice_rows: int = 1000,
        fail_after: int | None = None,
        on_slice: Callable[[int, int], None] | None = None,
    ) -> list[int]:
        """Run the worker: process pending requests (oldest first, or the given ids).

        Each request is applied `slice_rows` rows at a time, a commit per slice,
        stopping if it was cancelled meanwhile. `fail_after=N` (fault injection)
        fails each request after N rows of this call, leaving the rest
        unprocessed. `on_slice(bulk_request_id, rows_applied)` is called after
        each committed slice, outside the transaction (progress reporting).
        Returns the ids this call worked on.
        """
        if slice_rows < 1:
            raise ValueError(f"slice_rows must be >= 1, not {slice_rows}")
        if fail_after is not None and fail_after < 0:
            raise ValueError(f"fail_after must be >= 0, not {fail_after}")
        with self._transaction() as con:
            candidates = lifecycle.runnable_ids(con, bulk_request_ids)
        worked = []
        for bulk_request_id in candidates:
            with self._transaction() as con:
                if not lifecycle.start(con, bulk_request_id, utc_now()):
                    continue
            worked.append(bulk_request_id)
            done_here = 0
            while True:
                with self._transaction() as con:
                    budget = slice_rows if fail_after is None else min(slice_rows, fail_after - done_here)
                    if budget <= 0:
                        message = (
                            f"processing failed after {done_here} rows "
                            f"(injected failure, fail_after={fail_after})"
                        )
                        lifecycle.fail(con, bulk_request_id, message, utc_now())
                        break
                    applied, more = lifecycle.process_slice(con, bulk_request_id, budget, utc_now())
                    done_here += applied
                if on_slice is not None and applied:
                    on_slice(bulk_request_id, applied)
                if not more:
                    break
        return worked

    def process_together(
        self, bulk_request_ids: Sequence[int], *, on_slice: Callable[[int, int], None] | None = None
    ) -> list[int]:
        """Process several pending requests in one step (one transaction), in the given order.

        Gives what `process_pending` gives one request after another, for the fixed cost of one
        step: the server's worker uses it for requests queued while it was busy. A request that
        cannot finish this way (its inputs missing) stays processing; `process_pending` settles
        it. Returns the ids this call started.
        """
        with self._transaction() as con:
            now = utc_now()
            started = [i for i in lifecycle.runnable_ids(con, bulk_request_ids) if lifecycle.start(con, i, now)]
            applied = lifecycle.process_together(con, started, now) if started else {}
            unfinished = lifecycle.runnable_ids(con, started) if started else []
        if on_slice is not None:
            for bulk_request_id in started:
                if applied.get(bulk_request_id):
                    on_slice(bulk_request_id, applied[bulk_request_id])
        if unfinished:
            self.process_pending(unfinished, on_slice=on_slice)
        return started

    def existing_idempotency_keys(self, environment: str, keys: Sequence[str]) -> list[str]:
        """Which of these Idempotency-Keys already name a bulk request of the environment."""
        with self._snapshot() as con:
            return queries.existing_idempotency_keys(con, environment, keys)

    def get_bulk_request(
        self, environment: str, bulk_request_id: int, *, limit: int = 50, offset: int = 0
    ) -> dict:
        """GET /bulk_requests/{id}: the request and a page of per-row results; NotFound when unknown."""
        with self._snapshot() as con:
            return queries.get_bulk_request(con, environment, bulk_request_id, limit=limit, offset=offset)

    def bulk_request_items(self, environment: str, bulk_request_ids: Sequence[int]) -> pl.DataFrame:
        """Every processed item of these requests: bulk_request_id, index, status, record_id, error."""
        with self._snapshot() as con:
            return queries.bulk_request_items(con, environment, bulk_request_ids)

    def list_bulk_requests(
        self,
        environment: str,
        *,
        data_stream_key: str | None = None,
        status: str | None = None,
        source: str | None = None,
        created_after: datetime | str | None = None,
        created_before: datetime | str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict:
        """GET /bulk_requests: {data, next_cursor, limit}, newest first."""
        with self._snapshot() as con:
            return queries.list_bulk_requests(
                con,
                environment,
                data_stream_key=data_stream_key,
                status=status,
                source=source,
                created_after=created_after,
                created_before=created_before,
                limit=limit,
                cursor=cursor,
            )

    def cancel(self, environment: str, bulk_request_id: int) -> dict:
        """POST /bulk_requests/{id}/cancel: the cancelled request; Conflict unless pending/processing."""
        with self._transaction() as con:
            lifecycle.cancel(con, environment, bulk_request_id, utc_now())
            return queries.find_bulk_request(con, environment, bulk_request_id)

    def retry(self, environment: str, bulk_request_id: int, *, process: bool = False) -> dict:
        """POST /bulk_requests/{id}/retry: a new pending request re-running the parent's
        failed, skipped and unprocessed rows (with `process`, applied at once).

        Conflict unless the parent is failed or cancelled.
        """
        with self._transaction() as con:
            new_id = allocate_ids(con, "bulk_requests", 1)
            lifecycle.retry(con, environment, bulk_request_id, new_id, utc_now())
        if process:
            self.process_pending([new_id])
        with self._transaction() as con:
            return queries.find_bulk_request(con, environment, new_id)

    def external_ids(self, environment: str, data_stream_keys: Sequence[str]) -> pl.DataFrame:
        """Every record of these streams with an external_id, in one read (for `loader cache sync`):
        data_stream_key, external_id, bulk_request_id, record_id."""
        with self._snapshot() as con:
            return con.sql(
                "SELECT data_stream_key, external_id, bulk_request_id, id AS record_id FROM records "
                "WHERE environment = $environment AND list_contains($streams::VARCHAR[], data_stream_key) "
                "AND external_id IS NOT NULL ORDER BY id",
                params={"environment": environment, "streams": sorted(set(data_stream_keys))},
            ).pl()

    def records_frame(self, environment: str, data_stream_keys: Sequence[str], date_min, date_max) -> pl.DataFrame:
        """The records of these streams dated within [date_min, date_max], in one read (for
        `loader reconcile`): data_stream_key, external_id, date, amount, currency, direction,
        description, metadata (JSON text), record_id; oldest record first."""
        with self._snapshot() as con:
            return con.sql(
                "SELECT data_stream_key, external_id, date, amount, currency, direction, description, "
                "CAST(metadata AS VARCHAR) AS metadata, id AS record_id FROM records "
                "WHERE environment = $environment AND list_contains($streams::VARCHAR[], data_stream_key) "
                "AND date BETWEEN $date_min AND $date_max ORDER BY id",
                params={"environment": environment, "streams": sorted(set(data_stream_keys)),
                        "date_min": date_min, "date_max": date_max},
            ).pl()

    def list_records(
        self,
        environment: str,
        *,
        data_stream_key: str | None = None,
        external_id: str | None = None,
        bulk_request_id: int | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict:
        """GET /records: {data, next_cursor, limit}, newest first; Unprocessable without a filter."""
        with self._snapshot() as con:
            return queries.list_records(
                con,
                environment,
                data_stream_key=data_stream_key,
                external_id=external_id,
                bulk_request_id=bulk_request_id,
                limit=limit,
                cursor=cursor,
            )


def _record_count(connection: duckdb.DuckDBPyConnection) -> int:
    rows = connection.execute(
        "SELECT estimated_size FROM duckdb_tables() "
        "WHERE database_name = current_database() AND schema_name = 'main' AND table_name = 'records'"
    ).fetchall()
    return rows[0][0] if rows else 0


def memory_limit() -> str:
    """DuckDB's memory limit for an engine file: $LOADER_ENGINE_MEMORY_LIMIT, else 128MB."""
    return os.environ.get(MEMORY_LIMIT_VARIABLE) or DEFAULT_MEMORY_LIMIT


def _explained(error: duckdb.Error) -> str:
    """DuckDB's message, first line only; out of memory also says which setting to raise."""
    text = str(error).strip().splitlines()[0]
    if isinstance(error, duckdb.OutOfMemoryException):
        return (f"{text}; the local engine may use {memory_limit()}: set {MEMORY_LIMIT_VARIABLE} "
                "(for example to 1GB) and run again")
    return text
