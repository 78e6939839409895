"""The `api` target: EndClose's bulk records API over HTTP (httpx).

Each chunk is one `POST /records/bulk` with the chunk's Idempotency-Key, then
polls of the bulk request until it is final, then its result pages. Up to
`concurrency` chunks are in flight at once: a thread pool around one
httpx.Client (polars encodes bodies, and httpx waits on sockets, without
holding the GIL). Every call goes through the retry policy of http_retry.py,
always with the same body and key, so a retry after a dropped connection
finds the request the first attempt created instead of making a second.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import polars as pl
from pydantic import SecretStr
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, stop_when_event_set, wait_exponential

from ..cache_sync import HELD_SCHEMA
from ..chunk import Chunk
from ..errors import RetryableTargetError, TargetError, TerminalTargetError
from ..payloads import encode_body
from .base import ITEM_SCHEMA, REQUEST_SCHEMA, SendResult
from .http_client import ApiClient
from .http_retry import OutOfRetries, RetryPolicy

FINAL_STATUSES = ("completed", "failed", "cancelled")
PAGE_SIZE = 200  # the API's largest page
POLL_FIRST_WAIT = 0.05
POLL_MAX_WAIT = 2.0

_RESULT_SCHEMA = {name: dtype for name, dtype in ITEM_SCHEMA.items() if name != "chunk"}


def api_target_config(base_url: str, api_key: SecretStr | str) -> Any:
    """The `target` section for this URL and key: config's normalized base_url and its `target_key`."""
    from ..config import TargetConfig, parse_section

    secret = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
    return parse_section(TargetConfig, {"type": "api", "base_url": base_url, "api_key": secret}, "target")


class PollPace:
    """When to poll a new bulk request first: after about as long as this send's last ones took.

    Polling at once finds a queued request still pending; at concurrency 8 one waits behind the
    others for about 300 ms, and fixed backoff from 50 ms spent 3-4 polls on it. The wait is the
    median of recent durations: while others are in flight, a poll a little late costs the
    server nothing, and a queue that empties is followed within a few requests.
    """

    RECENT = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=self.RECENT)

    def first_wait(self) -> float:
        with self._lock:
            recent = sorted(self._recent)
        if not recent:
            return POLL_FIRST_WAIT
        return min(POLL_MAX_WAIT, max(POLL_FIRST_WAIT, recent[len(recent) // 2]))

    def record(self, request: dict) -> None:
        """Learn from a final bulk request how long it took: the server's `created_at` to its
        `completed_at`. (Not from when a poll saw it final: that includes the wait itself, and
        the pace would only ever grow.)"""
        try:
            seconds = (_instant(request["completed_at"]) - _instant(request["created_at"])).total_seconds()
        except (KeyError, TypeError, ValueError):
            return  # a request without both times teaches nothing
        with self._lock:
            self._recent.append(max(seconds, 0.0))


def _instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass
class _Loaded:
    """One chunk's final bulk request and every per-row result of it."""

    chunk: int
    bulk_request_id: int
    status: str
    error_message: str | None
    preexisting: bool
    results: list[dict] = field(default_factory=list)


class HttpTarget:
    """Loads into EndClose (or `loader serve`) over HTTP."""

    def __init__(self, base_url: str, api_key: SecretStr | str, *, concurrency: int = 4,
                 timeout_seconds: float = 30.0, poll_timeout_seconds: float = 600.0,
                 transport: httpx.BaseTransport | None = None, retry: RetryPolicy | None = None):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        config = api_target_config(base_url, api_key)  # the same key and URL rules as pipeline.yaml
        self._api_key: SecretStr = config.api_key
        self.base_url: str = config.base_url
        self.target_key: str = config.target_key
        self.concurrency = concurrency
        self.timeout_seconds = timeout_seconds
        self.poll_timeout_seconds = poll_timeout_seconds
        self.retry = retry or RetryPolicy()
        self._transport = transport
        self._api: ApiClient | None = None
        self._prepared = False

    @classmethod
    def from_config(cls, target: Any) -> HttpTarget:
        """From a pipeline's `target` section (TargetConfig with type api)."""
        return cls(target.base_url, target.api_key, concurrency=target.concurrency,
                   timeout_seconds=target.timeout_seconds, poll_timeout_seconds=target.poll_timeout_seconds)

    def __repr__(self) -> str:
        return f"HttpTarget({self.base_url!r}, concurrency={self.concurrency})"

    def describe(self) -> dict:
        return {"type": "api", "base_url": self.base_url}

    @property
    def api(self) -> ApiClient:
        if self._api is None:
            self._api = ApiClient(self.base_url, self._api_key, concurrency=self.concurrency,
                                  timeout_seconds=self.timeout_seconds, transport=self._transport, retry=self.retry)
        return self._api

    # -- the protocol ------------------------------------------------------------------

    def prepare(self) -> None:
        """Check the key and the address (`GET /data_streams`) before anything is sent."""
        try:
            self.api.request("GET", self.api.url("/data_streams"), what="GET /data_streams")
        except OutOfRetries as exc:
            failure = RetryableTargetError(
                f"the API at {self.base_url} did not answer after {exc.attempts} attempts (last: {exc.last}): "
                "check target.base_url and the network, then run the same command again"
            )
        else:
            self._prepared = True
            return
        raise failure

    def send(self, chunks: Sequence[Chunk], *, on_conflict: str) -> SendResult:
        if not chunks:
            return SendResult(pl.DataFrame(schema=REQUEST_SCHEMA), pl.DataFrame(schema=ITEM_SCHEMA))
        if not self._prepared:
            self.prepare()
        abort = threading.Event()  # set on the first failure: the other workers stop early
        first_failure: list[BaseException] = []
        lock = threading.Lock()
        pace = PollPace()

        def load(chunk: Chunk) -> _Loaded:
            try:
                return self._load_chunk(chunk, on_conflict, abort, pace)
            except BaseException as exc:
                with lock:
                    if not abort.is_set():  # later failures are mostly the abort's doing
                        first_failure.append(exc)
                        abort.set()
                raise

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks)),
                                thread_name_prefix="loader-http") as pool:
            futures = [pool.submit(load, chunk) for chunk in chunks]
            wait(futures, return_when=FIRST_EXCEPTION)
            if abort.is_set():
                for future in futures:
                    future.cancel()
        # Leaving the pool waited for the workers still running: none outlives this call.
        if first_failure:
            raise first_failure[0]
        return _frames([future.result() for future in futures])

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    # -- cache sync ----------------------------------------------------------------------

    def held_ids(self, streams: Sequence[str]) -> pl.DataFrame:
        """The records of these streams that have an external_id (HELD_SCHEMA; bulk_request_id unknown)."""
        stream_keys, external_ids, record_ids = [], [], []
        for stream in streams:
            cursor = None
            while True:
                params = {"data_stream_key": stream, "limit": PAGE_SIZE}
                if cursor is not None:
                    params["cursor"] = cursor
                page = self.api.get_json(self.api.url("/records"), params=params,
                                         what=f"GET /records of data stream {stream}")
                for record in page.get("data") or []:
                    if record.get("external_id") is not None:
                        stream_keys.append(record.get("data_stream_key", stream))
                        external_ids.append(record["external_id"])
                        record_ids.append(record.get("id"))
                cursor = page.get("next_cursor")
                if not cursor:
                    break
        return pl.DataFrame({"data_stream_key": stream_keys, "external_id": external_ids,
                             "bulk_request_id": [None] * len(record_ids), "record_id": record_ids},
                            schema=HELD_SCHEMA)

    # -- reconcile ----------------------------------------------------------------------

    def records_for(self, streams: Sequence[str], date_min, date_max) -> pl.DataFrame:
        """The records of these streams dated within [date_min, date_max] (TARGET_RECORD_SCHEMA of
        loader.reconcile): `GET /records` per stream, every page, through the retry policy. The API
        has no date filter, so the range is applied here, page by page; oldest record first."""
        import json

        from ..reconcile import TARGET_RECORD_SCHEMA

        wire = {**TARGET_RECORD_SCHEMA, "date": pl.String}
        low, high = str(date_min), str(date_max)  # ISO dates compare as text
        pages: list[pl.DataFrame] = []
        for stream in streams:
            cursor = None
            while True:
                params: dict = {"data_stream_key": stream, "limit": PAGE_SIZE}
                if cursor is not None:
                    params["cursor"] = cursor
                page = self.api.get_json(self.api.url("/records"), params=params,
                                         what=f"GET /records of data stream {stream}")
                rows = [
                    {
                        "data_stream_key": record.get("data_stream_key", stream),
                        "external_id": record.get("external_id"),
                        "date": record.get("date"),
                        "amount": record.get("amount"),
                        "currency": record.get("currency"),
                        "direction": record.get("direction"),
                        "description": record.get("description"),
                        "metadata": json.dumps(record.get("metadata") or {}, separators=(",", ":"),
                                               ensure_ascii=False),
                        "record_id": record.get("id"),
                    }
                    for record in page.get("data") or []
                    if low <= str(record.get("date")) <= high
                ]
                if rows:
                    pages.append(pl.from_dicts(rows, schema=wire))
                cursor = page.get("next_cursor")
                if not cursor:
                    break
        if not pages:
            return pl.DataFrame(schema=TARGET_RECORD_SCHEMA)
        return (
            pl.concat(pages)
            .with_columns(pl.col("date").str.to_date("%Y-%m-%d"))
            .sort("record_id")
            .cast(TARGET_RECORD_SCHEMA)
        )

    # -- one chunk -------------------------------------------------------------------------

    def _load_chunk(self, chunk: Chunk, on_conflict: str, abort: threading.Event, pace: PollPace) -> _Loaded:
        if abort.is_set():
            raise _Aborted()
        context = {"chunk": chunk.number, "idempotency_key": chunk.idempotency_key}
        attempts: list[int] = []
        answer = self.api.parse(
            self.api.request(
                "POST", self.api.url("/records/bulk"), what=f"POST /records/bulk (chunk {chunk.number})",
                content=encode_body(chunk.rows, on_conflict=on_conflict),
                headers={"Content-Type": "application/json", "Idempotency-Key": chunk.idempotency_key},
                context=context, abort=abort, attempts=attempts,
            ),
            "POST /records/bulk",
        )
        bulk_request_id = _bulk_request_id(answer)
        url = self.api.resolve(answer.get("url") or self.api.url(f"/bulk_requests/{bulk_request_id}"))
        answered_final = answer.get("status") in FINAL_STATUSES
        request = self._wait_until_final(url, bulk_request_id, context, abort,
                                         first_wait=0.0 if answered_final else pace.first_wait())
        if not answered_final:
            pace.record(request)
        loaded = _Loaded(
            chunk=chunk.number,
            bulk_request_id=bulk_request_id,
            status=request["status"],
            error_message=request.get("error_message"),
            # A new request is answered `pending`. An answer further along, to this run's
            # first try, names a request made before this run; after a failed try (a dropped
            # connection) the request may be this run's own, so it counts as new.
            preexisting=len(attempts) == 1 and answer.get("status") not in (None, "pending"),
        )
        # The final poll asked for the first page of results; fetch the rest.
        page = request.get("results") or {}
        offset = 0
        while True:
            data = page.get("data") or []
            loaded.results.extend(data)
            offset += len(data)
            if not page.get("has_more") or not data:
                break
            if abort.is_set():
                raise _Aborted()
            page = self.api.get_json(url, params={"limit": PAGE_SIZE, "offset": offset}, context=context,
                                     abort=abort, what=f"results of bulk request {bulk_request_id}").get("results") or {}
        return loaded

    def _wait_until_final(self, url: str, bulk_request_id: int, context: dict, abort: threading.Event,
                          *, first_wait: float) -> dict:
        """Poll after `first_wait` seconds, then with backoff from 50 ms to 2 s, until final, within
        poll_timeout_seconds."""
        if first_wait and abort.wait(first_wait):
            raise _Aborted()
        polling = Retrying(
            retry=retry_if_result(lambda request: request.get("status") not in FINAL_STATUSES),
            wait=wait_exponential(multiplier=POLL_FIRST_WAIT, max=POLL_MAX_WAIT),
            # The first wait counts: poll_timeout_seconds bounds the whole wait for the request.
            stop=stop_after_delay(max(0.0, self.poll_timeout_seconds - first_wait)) | stop_when_event_set(abort),
            sleep=abort.wait,  # real time: the server needs it; an abort cuts it short
        )

        def poll() -> dict:
            return self.api.get_json(url, params={"limit": PAGE_SIZE, "offset": 0}, context=context, abort=abort,
                                     what=f"GET bulk request {bulk_request_id}")

        try:
            return polling(poll)
        except RetryError as exc:
            if abort.is_set():
                failure: Exception = _Aborted()
            else:
                last = exc.last_attempt.result() if not exc.last_attempt.failed else {}
                failure = RetryableTargetError(
                    f"bulk request {bulk_request_id} (chunk {context['chunk']}) was still "
                    f"{last.get('status', 'not final')} after {self.poll_timeout_seconds:g} s "
                    "(target.poll_timeout_seconds); run the same command again: it resumes this request "
                    "through its Idempotency-Key"
                )
        raise failure


class _Aborted(TargetError):
    """A worker stopped because another chunk of the same send failed."""

    def __init__(self) -> None:
        super().__init__("stopped: another bulk request of this batch failed")


def _bulk_request_id(answer: Any) -> int:
    try:
        return int(answer["id"])
    except (TypeError, KeyError, ValueError):
        raise TerminalTargetError("POST /records/bulk: the API answered without a bulk request id") from None


def _frames(loaded: list[_Loaded]) -> SendResult:
    """REQUEST_SCHEMA and ITEM_SCHEMA frames of the chunks' outcomes, built once at the end."""
    requests = pl.DataFrame(
        {
            "chunk": [c.chunk for c in loaded],
            "bulk_request_id": [c.bulk_request_id for c in loaded],
            "status": [c.status for c in loaded],
            "error_message": [c.error_message for c in loaded],
            "preexisting": [c.preexisting for c in loaded],
        },
        schema=REQUEST_SCHEMA,
    )
    chunk_numbers: list[int] = []
    results: list[dict] = []
    for c in loaded:
        chunk_numbers.extend([c.chunk] * len(c.results))
        results.extend(c.results)
    items = (
        pl.from_dicts(results, schema=_RESULT_SCHEMA)
        .with_columns(pl.Series("chunk", chunk_numbers, dtype=pl.Int64))
        .select(list(ITEM_SCHEMA))
        if results else pl.DataFrame(schema=ITEM_SCHEMA)
    )
    return SendResult(requests=requests, items=items)
