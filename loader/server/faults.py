"""Fault injection for `loader serve`: the settings, and the dice that apply them."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from loader.errors import ConfigError

#: Seconds a throttled client is told to wait (an integer, as most clients parse it).
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class Faults:
    """What `loader serve` does wrong on purpose; all off by default.

    latency_ms      added to every authenticated request
    fail_rate       share of requests answered 503, doing nothing
    throttle_rate   share of requests answered 429 with Retry-After, doing nothing
    drop_rate       share of POST /records/bulk committed, then the connection dropped unanswered
    job_fail_rate   share of bulk request jobs failing after half their rows
    seed            makes the random choices reproducible
    """

    latency_ms: int = 0
    fail_rate: float = 0.0
    throttle_rate: float = 0.0
    drop_rate: float = 0.0
    job_fail_rate: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.latency_ms, bool) or not isinstance(self.latency_ms, int) or self.latency_ms < 0:
            problems.append(("latency_ms", f"must be a whole number of milliseconds >= 0, not {self.latency_ms!r}"))
        for name in ("fail_rate", "throttle_rate", "drop_rate", "job_fail_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                problems.append((name, f"must be a share from 0 to 1, not {value!r}"))
        if not problems and self.fail_rate + self.throttle_rate > 1:
            # One draw decides between 503, 429 and serving, so the shares must fit in 1.
            problems.append(("throttle_rate", "fail_rate + throttle_rate must not exceed 1"))
        if problems:
            raise ConfigError(problems)


#: The default: a server that behaves.
NO_FAULTS = Faults()


class FaultInjector:
    """The random decisions of one server, from one `random.Random(seed)`.

    A rate of 0 draws nothing, so turning one fault on does not change the
    choices of another. Thread-safe: the worker thread draws too.
    """

    def __init__(self, faults: Faults):
        self.faults = faults
        self._random = random.Random(faults.seed)
        self._lock = threading.Lock()

    def _draw(self, rate: float) -> float | None:
        if rate <= 0:
            return None
        with self._lock:
            return self._random.random()

    @property
    def latency_seconds(self) -> float:
        return self.faults.latency_ms / 1000

    def refusal(self) -> int | None:
        """503 or 429 when this request is to be refused, else None."""
        draw = self._draw(self.faults.fail_rate + self.faults.throttle_rate)
        if draw is None:
            return None
        if draw < self.faults.fail_rate:
            return 503
        if draw < self.faults.fail_rate + self.faults.throttle_rate:
            return 429
        return None

    def drop_connection(self) -> bool:
        """Whether to drop the connection of this committed bulk request."""
        draw = self._draw(self.faults.drop_rate)
        return draw is not None and draw < self.faults.drop_rate

    def fail_job_after(self, rows_left: int) -> int | None:
        """`fail_after` for the engine: half the job's rows, or None to let it run."""
        draw = self._draw(self.faults.job_fail_rate)
        if draw is None or draw >= self.faults.job_fail_rate:
            return None
        return rows_left // 2
