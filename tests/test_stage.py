"""The run's background stages: order kept, at most `depth` ahead, failures raised where they belong."""

from __future__ import annotations

import threading

import pytest

from loader.stage import BackgroundStage, prefetched


def test_a_stage_handles_items_in_order_on_its_own_thread():
    handled: list[tuple[int, str]] = []
    stage = BackgroundStage(lambda item: handled.append((item, threading.current_thread().name)), name="t-stage")
    for item in range(50):
        stage.reserve()
        stage.submit(item)
    stage.close()
    assert [item for item, _ in handled] == list(range(50))
    assert {name for _, name in handled} == {"t-stage"}


def test_a_stage_lets_the_caller_plan_only_depth_items_ahead():
    release = threading.Event()
    stage = BackgroundStage(lambda item: release.wait(), depth=2)
    stage.reserve()
    stage.submit(1)  # being handled, blocked
    stage.reserve()
    stage.submit(2)
    # Both slots are taken until the first item is done.
    assert stage._slots.acquire(blocking=False) is False
    release.set()
    stage.reserve()  # returns once an item is done
    stage.submit(3)
    stage.close()


def test_a_failing_stage_raises_on_close_and_skips_the_rest():
    handled: list[int] = []

    def handle(item: int) -> None:
        if item == 2:
            raise ValueError("bug in stage")
        handled.append(item)

    stage = BackgroundStage(handle)
    for item in range(5):
        stage.reserve()  # never blocks for ever: a failed item still frees its slot
        stage.submit(item)
    with pytest.raises(ValueError, match="bug in stage"):
        stage.close()
    assert handled == [0, 1]


def test_prefetched_keeps_order_and_raises_an_error_after_the_items_before_it():
    def source():
        yield from (1, 2, 3)
        raise OSError("disk went away")

    seen = []
    with pytest.raises(OSError, match="disk went away"):
        for item in prefetched(source()):
            seen.append(item)
    assert seen == [1, 2, 3]


def test_prefetched_reads_ahead_on_another_thread_and_stops_when_the_reader_stops():
    readers: list[str] = []
    produced: list[int] = []

    def source():
        for item in range(100):
            readers.append(threading.current_thread().name)
            produced.append(item)
            yield item

    items = prefetched(source(), name="t-read")
    assert next(items) == 0
    (reader,) = [t for t in threading.enumerate() if t.name == "t-read"]
    items.close()
    reader.join(timeout=10)
    assert not reader.is_alive()  # it ended instead of waiting for ever to hand over a batch
    assert set(readers) == {"t-read"}
    assert len(produced) < 100
