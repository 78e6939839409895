"""The background worker: applies pending bulk requests slice by slice, as EndClose does."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from loader.engine import Engine
from loader.errors import LoaderError

from .faults import FaultInjector

logger = logging.getLogger("loader.server")

_STOP = object()


class _Stopping(Exception):
    """Raised between two slices to leave a request processing when the server stops."""


class Worker:
    """One thread running `Engine.process_pending` for the requests it is handed.

    `enqueue` wakes it. Requests queued while it was busy, each of at most
    `slice_rows` rows, are applied together in one step of up to about
    `group_rows` rows (`Engine.process_together`): the same outcome as one after
    the other, for the fixed cost of one transaction, so the more clients send
    at once the less each request costs. Larger requests go alone, slice by
    slice. Requests left pending or processing by an earlier run of the served
    environments are resumed when it starts. `on_slice(id, rows)` is called
    after each committed slice (progress hooks, tests).
    """

    def __init__(
        self,
        engine: Engine,
        environments: list[str],
        *,
        slice_rows: int = 1000,
        group_rows: int = 10_000,
        injector: FaultInjector | None = None,
        on_slice: Callable[[int, int], None] | None = None,
    ):
        if slice_rows < 1:
            raise ValueError(f"slice_rows must be >= 1, not {slice_rows}")
        self.engine = engine
        self.environments = environments
        self.slice_rows = slice_rows
        self.group_rows = group_rows
        self.injector = injector
        self.on_slice = on_slice
        # A queue is a wake-up Event and a hand-off in one: get() sleeps until a request arrives.
        self._queue: queue.Queue = queue.Queue()
        self._seen: set[int] = set()
        self._seen_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; it first resumes the unfinished requests of the served environments."""
        if self._thread is not None:
            raise RuntimeError("the worker is already started")
        self._thread = threading.Thread(target=self._run, name="loader-serve-worker", daemon=True)
        self._thread.start()

    def enqueue(self, bulk_request_id: int, rows_left: int) -> None:
        """Hand a new pending request to the worker (a request handed twice runs once)."""
        with self._seen_lock:
            if bulk_request_id in self._seen:
                return
            self._seen.add(bulk_request_id)
        self._queue.put((bulk_request_id, rows_left))

    def stop(self, timeout: float = 30) -> None:
        """Stop after the current slice; a request cut short stays processing and resumes next start."""
        self._stopping.set()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("the bulk request worker did not stop within %s seconds", timeout)

    def _unfinished(self) -> list[tuple[int, int]]:
        found = {}
        for environment in self.environments:
            for status in ("processing", "pending"):
                cursor = None
                while True:
                    page = self.engine.list_bulk_requests(environment, status=status, limit=200, cursor=cursor)
                    for request in page["data"]:
                        found[request["id"]] = request["total_items"] - request["processed_items"]
                    cursor = page["next_cursor"]
                    if cursor is None:
                        break
        return sorted(found.items())  # oldest first, as they were submitted

    def _run(self) -> None:
        try:
            for bulk_request_id, rows_left in self._unfinished():
                self.enqueue(bulk_request_id, rows_left)
        except LoaderError:
            logger.exception("could not look up the unfinished bulk requests to resume")
        while not self._stopping.is_set():
            queued = self._take()
            try:
                for step in self._steps(queued):
                    self._process(step)
            except _Stopping:
                break
            if queued and queued[-1] is _STOP:
                break

    def _take(self) -> list:
        """The next request, and those queued behind it up to about group_rows rows."""
        queued = [self._queue.get()]
        rows = 0 if queued[0] is _STOP else queued[0][1]
        while queued[-1] is not _STOP and rows < self.group_rows:
            try:
                queued.append(self._queue.get_nowait())
            except queue.Empty:
                break
            if queued[-1] is not _STOP:
                rows += queued[-1][1]
        return queued

    def _steps(self, queued: list) -> list[tuple[list[int], int | None]]:
        """Queue order, cut into steps: runs of small requests together, others alone."""
        steps: list[tuple[list[int], int | None]] = []
        together: list[int] = []
        for item in queued:
            if item is _STOP:
                break
            bulk_request_id, rows_left = item
            fail_after = self.injector.fail_job_after(rows_left) if self.injector else None
            if fail_after is None and rows_left <= self.slice_rows:
                together.append(bulk_request_id)
                continue
            if together:
                steps.append((together, None))
                together = []
            steps.append(([bulk_request_id], fail_after))
        if together:
            steps.append((together, None))
        return steps

    def _process(self, step: tuple[list[int], int | None]) -> None:
        ids, fail_after = step
        try:
            if len(ids) > 1:
                self.engine.process_together(ids, on_slice=self._after_slice)
            else:
                self.engine.process_pending(
                    ids, slice_rows=self.slice_rows, fail_after=fail_after, on_slice=self._after_slice
                )
        except _Stopping:
            raise
        except Exception:
            # The requests stay as the engine left them (committed steps count); the
            # worker carries on with the next ones.
            logger.exception("bulk requests %s: processing raised", ", ".join(map(str, ids)))

    def _after_slice(self, bulk_request_id: int, rows_applied: int) -> None:
        if self.on_slice is not None:
            self.on_slice(bulk_request_id, rows_applied)
        if self._stopping.is_set():
            raise _Stopping()
