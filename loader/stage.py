"""One background stage of a run: items handled in order, on one thread, a bounded number ahead.

The run plans batch k+1 (validate, dedupe, chunk, journal) on the calling
thread while this stage sends batch k and records its answer (target, cache,
report). Polars and DuckDB release the GIL, so the two share the cores.
At most `depth` items are planned but not yet handled, which bounds memory
to that many batches whatever the source's length.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_DONE = object()


class BackgroundStage:
    """Runs `handle(item)` for each submitted item, in submission order, on a thread of its own."""

    def __init__(self, handle: Callable[[Any], None], *, depth: int = 2, name: str = "loader-stage"):
        self._handle = handle
        self._slots = threading.Semaphore(depth)
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self.failure: BaseException | None = None  # a bug in `handle`: re-raised by `close`
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def reserve(self) -> None:
        """Wait until another item may be planned (call before planning it)."""
        self._slots.acquire()

    def unreserve(self) -> None:
        """Give back a `reserve` that no item came of."""
        self._slots.release()

    def submit(self, item: Any) -> None:
        """Hand over an item planned under a `reserve`."""
        self._items.put(item)

    def close(self) -> None:
        """Wait for every submitted item to be handled; re-raise what broke the stage, if anything."""
        self._items.put(_DONE)
        self._thread.join()
        if self.failure is not None:
            raise self.failure

    def _work(self) -> None:
        while True:
            item = self._items.get()
            if item is _DONE:
                return
            try:
                if self.failure is None:  # after a failure, items are only drained
                    self._handle(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by close()
                self.failure = exc
            finally:
                self._slots.release()


def prefetched(items: Iterator[Any], *, name: str = "loader-read") -> Prefetched:
    """`items`, read one ahead on a thread of its own (started now), errors raised in their place.

    The run reads (and maps) batch k+1 of the source while it plans batch k, and its first
    batch while it opens the state file and the target. `close()` lets the reader end.
    """
    return Prefetched(items, name=name)


class Prefetched:
    """An iterator over `items` that a thread of its own keeps one item ahead of its reader.

    At most one item is made and not yet taken: the thread makes the next only once the
    reader takes the last, so memory holds one batch ahead, not two.
    """

    def __init__(self, items: Iterator[Any], *, name: str):
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._wanted = threading.Semaphore(1)
        self._stop = threading.Event()
        self._finished = False
        threading.Thread(target=self._read, args=(iter(items),), name=name, daemon=True).start()

    def _read(self, items: Iterator[Any]) -> None:
        try:
            while True:
                self._wanted.acquire()
                if self._stop.is_set():
                    return
                item = next(items, _DONE)
                self._ready.put((item, None))
                if item is _DONE:
                    return
        except BaseException as exc:  # noqa: BLE001 - raised again on the reading side, in its place
            self._ready.put((None, exc))

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item, error = self._ready.get()
        if error is not None:
            self._finished = True
            raise error
        if item is _DONE:
            self._finished = True
            raise StopIteration
        self._wanted.release()  # the thread may make the next item while this one is used
        return item

    def close(self) -> None:
        """Stop reading; the thread ends once the item it is making, if any, is made."""
        self._finished = True
        self._stop.set()
        self._wanted.release()
