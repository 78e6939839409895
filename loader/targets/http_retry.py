"""When the HTTP target tries again: which failures are transient, how long to wait, when to stop.

Built from tenacity's one-argument policies (stop, wait, retry-if), so each
decision can be read and tested alone; the sleep function is injected, so
tests never wait for real. A retry always resends the same request (same
body, same Idempotency-Key), so it can never create a second bulk request.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import httpx
import tenacity
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from ..errors import RetryableTargetError

T = TypeVar("T")

# What every HTTP service does under load; a retry may well succeed.
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,  # connect, read, write and pool timeouts
    httpx.NetworkError,  # refused, reset, unreachable
    httpx.RemoteProtocolError,  # the server dropped the connection mid-answer
)


class OutOfRetries(RetryableTargetError):
    """A call failed transiently every time the policy allowed; `attempts` and the `last` failure."""

    def __init__(self, what: str, attempts: int, last: str):
        self.what, self.attempts, self.last = what, attempts, last
        super().__init__(
            f"{what}: out of retries after {attempts} attempts (last: {last}); run the same command again to resume"
        )


class TransientError(Exception):
    """One attempt failed in a way a later attempt may not (never leaves the HTTP target)."""

    def __init__(self, reason: str, *, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def is_transient_status(status_code: int) -> bool:
    """408, 429 and every 5xx are worth another attempt; other answers are final."""
    return status_code in (408, 429) or status_code >= 500


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def transient_answer(response: httpx.Response) -> TransientError | None:
    """The TransientError for a 429/5xx answer, else None."""
    if not is_transient_status(response.status_code):
        return None
    return TransientError(
        f"{response.status_code} {response.reason_phrase}".strip(),
        retry_after=retry_after_seconds(response.headers.get("Retry-After")),
    )


def transport_failure(exc: Exception) -> TransientError:
    """A TransientError naming an httpx transport error, without its request (it holds the key header)."""
    detail = str(exc)
    return TransientError(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)


class wait_retry_after(wait_base):
    """The server's `Retry-After` when it sent one (up to `cap` seconds), else `fallback`."""

    def __init__(self, fallback: wait_base, *, cap: float):
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, TransientError) and error.retry_after is not None:
            return min(error.retry_after, self.cap)
        return self.fallback(retry_state)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by attempts and by time.

    With the defaults a failing call gives up after 8 attempts or 5 minutes,
    whichever comes first; waits double from 0.25 s (plus up to 0.25 s of
    jitter) to at most 20 s, or follow the server's `Retry-After` (up to 120 s).
    """

    attempts: int = 8
    max_seconds: float = 300.0
    initial_wait: float = 0.25
    max_wait: float = 20.0
    max_retry_after: float = 120.0
    sleep: Callable[[float], None] | None = None  # None: real time, cut short when `abort` is set

    def stop(self) -> tenacity.stop.stop_base:
        return stop_after_attempt(self.attempts) | stop_after_delay(self.max_seconds)

    def wait(self) -> wait_base:
        # Jitter keeps workers that failed together from retrying together.
        backoff = wait_exponential(multiplier=self.initial_wait, max=self.max_wait) + wait_random(0, self.initial_wait)
        return wait_retry_after(backoff, cap=self.max_retry_after)

    def retrying(self, *, abort: threading.Event | None = None,
                 before_sleep: Callable[[RetryCallState], None] | None = None) -> Retrying:
        """A tenacity Retrying that retries TransientError only; `abort` stops it early."""
        stop = self.stop()
        if abort is not None:
            stop = stop | stop_when_event_set(abort)
        return Retrying(
            stop=stop,
            wait=self.wait(),
            retry=retry_if_exception_type(TransientError),
            sleep=self.sleep if self.sleep is not None else (abort.wait if abort is not None else time.sleep),
            before_sleep=before_sleep,
            reraise=False,
        )

    def call(self, attempt: Callable[[], T], *, what: str, abort: threading.Event | None = None,
             before_sleep: Callable[[RetryCallState], None] | None = None) -> T:
        """`attempt()` until it returns, raises something other than TransientError, or the policy stops.

        Out of attempts: OutOfRetries (a RetryableTargetError) naming `what` and the last failure.
        """
        try:
            return self.retrying(abort=abort, before_sleep=before_sleep)(attempt)
        except tenacity.RetryError as exc:
            last = exc.last_attempt
            failure = OutOfRetries(what, last.attempt_number, str(last.exception()) if last.failed else "no answer")
        # Raised outside the except block: nothing chains back to the httpx request.
        raise failure
