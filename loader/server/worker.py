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

    `enqueue` wakes it. Requests left pending or processing by an earlier run
    of the served environments are resumed when it starts. `on_slice(id, rows)`
    is called after each committed slice (progress hooks, tests).
    """

    def __init__(
        self,
        engine: Engine,
        environments: list[str],
        *,
        slice_rows: int = 1000,
        injector: FaultInjector | None = None,
        on_slice: Callable[[int, int], None] | None = None,
    ):
        if slice_rows < 1:
            raise ValueError(f"slice_rows must be >= 1, not {slice_rows}")
        self.engine = engine
        self.environments = environments
        self.slice_rows = slice_rows
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
            item = self._queue.get()
            if item is _STOP:
                break
            bulk_request_id, rows_left = item
            try:
                self._process(bulk_request_id, rows_left)
            except _Stopping:
                break
            except Exception:
                # The request stays as the engine left it (its committed slices
                # count); the worker carries on with the next one.
                logger.exception("bulk request %s: processing raised", bulk_request_id)

    def _process(self, bulk_request_id: int, rows_left: int) -> None:
        fail_after = self.injector.fail_job_after(rows_left) if self.injector else None
        self.engine.process_pending(
            [bulk_request_id], slice_rows=self.slice_rows, fail_after=fail_after, on_slice=self._after_slice
        )

    def _after_slice(self, bulk_request_id: int, rows_applied: int) -> None:
        if self.on_slice is not None:
            self.on_slice(bulk_request_id, rows_applied)
        if self._stopping.is_set():
            raise _Stopping()
