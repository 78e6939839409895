"""The `api` target: the retry policy's decisions, then end to end against a real `loader serve`."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise

import duckdb
import httpx
import polars as pl
import pytest
import yaml
from conftest import SAMPLE_ROWS, pipeline_config, run_cli, summary_of, write_csv
from pydantic import SecretStr
from serve_fixture import running_server

from loader.chunk import plan_chunks
from loader.config import TargetConfig, load_pipeline, parse_section
from loader.engine import BulkSubmission, Engine
from loader.engine.normalize import normalize_json_records
from loader.errors import AuthenticationError, RetryableTargetError, TerminalTargetError
from loader.run import Run, run_pipeline, settings_from_pipeline
from loader.source import Source, SourceSpec
from loader.targets.http import POLL_FIRST_WAIT, POLL_MAX_WAIT, HttpTarget, PollPace
from loader.targets.http_client import ApiClient
from loader.targets.http_retry import RetryPolicy, retry_after_seconds

SECRET = "sk-test-5e3c7a9d1f"


class Sleeps(list):
    """An injected sleep: records each wait instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client_answering(*answers, sleeps: Sleeps | None = None, attempts: int = 4) -> tuple[ApiClient, list]:
    """An ApiClient whose server answers `answers` in turn (a Response, or an exception to raise)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    policy = RetryPolicy(attempts=attempts, sleep=sleeps if sleeps is not None else Sleeps())
    client = ApiClient("http://api.test/v1", SecretStr(SECRET), transport=httpx.MockTransport(handler), retry=policy)
    return client, seen


# -- the retry policy's decisions (no server needed) ------------------------------------------


def test_429_waits_as_long_as_retry_after_says_then_resends_the_same_request():
    sleeps = Sleeps()
    client, seen = client_answering(
        httpx.Response(429, headers={"Retry-After": "3"}), httpx.Response(202, json={"id": 1}), sleeps=sleeps
    )
    response = client.request("POST", client.url("/records/bulk"), what="POST", content=b'{"records":[]}',
                              headers={"Idempotency-Key": "k1"})
    assert response.status_code == 202
    assert sleeps == [3.0]
    assert [r.headers["Idempotency-Key"] for r in seen] == ["k1", "k1"]
    assert seen[0].content == seen[1].content


def test_retries_are_logged_with_chunk_and_idempotency_key_but_never_the_key(caplog):
    client, _ = client_answering(httpx.Response(503), httpx.Response(202, json={"id": 1}))
    with caplog.at_level("INFO", logger="loader"):
        client.request("POST", client.url("/records/bulk"), what="POST /records/bulk (chunk 7)", content=b"{}",
                       context={"chunk": 7, "idempotency_key": "abc123"})
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "retry"]
    assert (record.chunk, record.idempotency_key, record.attempt) == (7, "abc123", 1)
    assert "503" in record.getMessage() and "abc123" in record.getMessage()
    assert SECRET not in caplog.text


@pytest.mark.parametrize("failure", [
    httpx.Response(503), httpx.Response(500), httpx.Response(502),
    httpx.RemoteProtocolError("Server disconnected without sending a response."),
    httpx.ConnectError("connection refused"), httpx.ReadTimeout("timed out"),
])
def test_transient_failures_are_retried_with_growing_waits(failure):
    sleeps = Sleeps()
    client, seen = client_answering(failure, failure, httpx.Response(200, json=[]), sleeps=sleeps)
    assert client.request("GET", client.url("/data_streams"), what="GET").status_code == 200
    assert len(seen) == 3 and len(sleeps) == 2
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 0.75  # doubling, plus jitter


def test_out_of_retries_says_to_run_again_and_never_shows_the_key():
    client, seen = client_answering(httpx.Response(503), attempts=3)
    with pytest.raises(RetryableTargetError) as info:
        client.request("GET", client.url("/data_streams"), what="GET /data_streams")
    assert len(seen) == 3
    message = str(info.value)
    assert "out of retries after 3 attempts" in message and "503" in message
    assert "run the same command again" in message
    assert SECRET not in message and info.value.__context__ is None and info.value.__cause__ is None


@pytest.mark.parametrize("status, error", [(401, AuthenticationError), (400, TerminalTargetError),
                                           (422, TerminalTargetError), (404, TerminalTargetError)])
def test_refusals_are_not_retried(status, error):
    sleeps = Sleeps()
    client, seen = client_answering(httpx.Response(status, json={"message": f"records: bad ({SECRET})"}),
                                    sleeps=sleeps)
    with pytest.raises(error) as info:
        client.request("POST", client.url("/records/bulk"), what="POST /records/bulk", content=b"{}")
    assert len(seen) == 1 and sleeps == []
    assert SECRET not in str(info.value)
    if status == 401:
        assert "target.api_key" in str(info.value) and "ENDCLOSE_API_KEY" in str(info.value)
    else:
        assert "records: bad" in str(info.value)  # the API's own message


def test_the_key_travels_only_as_the_header():
    client, seen = client_answering(httpx.Response(200, json=[]))
    client.request("GET", client.url("/data_streams"), what="GET")
    assert seen[0].headers["X-API-KEY"] == SECRET
    assert SECRET not in str(seen[0].url)
    target = HttpTarget("http://api.test/v1/", SecretStr(SECRET))
    assert SECRET not in repr(target) and SECRET not in str(target.describe()) and SECRET not in target.target_key
    assert SECRET not in repr(client)
    assert target.describe() == {"type": "api", "base_url": "http://api.test/v1"}


def test_target_key_is_the_pipelines():
    config = parse_section(TargetConfig, {"type": "api", "base_url": "https://x.test/v1", "api_key": SECRET},
                           "target")
    assert HttpTarget("https://x.test/v1", SecretStr(SECRET)).target_key == config.target_key


def test_an_unreachable_api_says_what_to_check():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    target = HttpTarget("http://api.test/v1", SECRET, retry=RetryPolicy(attempts=2, sleep=Sleeps()),
                        transport=httpx.MockTransport(refuse))
    with pytest.raises(RetryableTargetError) as info:
        target.prepare()
    assert str(info.value) == (
        "the API at http://api.test/v1 did not answer after 2 attempts (last: ConnectError: connection refused): "
        "check target.base_url and the network, then run the same command again")
    assert info.value.exit_code == 3


def test_answers_pointing_at_another_server_are_refused():
    client, _ = client_answering(httpx.Response(200))
    assert client.resolve("/v1/bulk_requests/7") == "http://api.test/v1/bulk_requests/7"
    with pytest.raises(TerminalTargetError, match="another server"):
        client.resolve("https://elsewhere.test/v1/bulk_requests/7")


def test_retry_after_reads_seconds_and_dates():
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("Mon, 01 Jan 2024 12:00:05 GMT", now=now) == 5.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def _bulk_api(post_status: str, rows: int) -> tuple[httpx.MockTransport, list[tuple[float, str]]]:
    """An API whose bulk request is answered `post_status` and is completed when polled."""
    seen: list[tuple[float, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((time.monotonic(), f"{request.method} {request.url.path}"))
        if request.method == "POST":
            return httpx.Response(202, json={"id": 7, "status": post_status, "total_items": rows,
                                             "url": "/v1/bulk_requests/7"})
        offset = int(request.url.params.get("offset", 0))
        data = [{"index": i, "status": "successful", "record_id": 100 + i}
                for i in range(offset, min(rows, offset + int(request.url.params["limit"])))]
        return httpx.Response(200, json={"id": 7, "status": "completed", "total_items": rows, "results": {
            "data": data, "has_more": offset + len(data) < rows, "offset": offset}})

    return httpx.MockTransport(handler), seen


def _send_one_request(transport: httpx.MockTransport, rows: int):
    target = HttpTarget("http://api.test/v1", SECRET, transport=transport)
    target._prepared = True  # no GET /data_streams first: the transport answers bulk requests only
    try:
        return target.send(chunks_for(target, mapped_rows(rows, "W"), 1000), on_conflict="skip")
    finally:
        target.close()


def test_a_request_answered_pending_is_first_polled_after_a_wait_not_at_once():
    transport, seen = _bulk_api("pending", rows=3)
    result = _send_one_request(transport, 3)
    assert [what for _, what in seen] == ["POST /v1/records/bulk", "GET /v1/bulk_requests/7"]
    assert seen[1][0] - seen[0][0] >= POLL_FIRST_WAIT
    assert result.items["record_id"].to_list() == [100, 101, 102]
    assert not result.requests["preexisting"].any()


def test_a_request_answered_completed_is_read_without_polling():
    """An Idempotency-Key replay of a finished request: its result pages are all that is read."""
    transport, seen = _bulk_api("completed", rows=250)
    result = _send_one_request(transport, 250)
    assert [what for _, what in seen] == ["POST /v1/records/bulk"] + ["GET /v1/bulk_requests/7"] * 2
    assert result.items["index"].to_list() == list(range(250))
    assert result.requests["preexisting"].all()


def test_the_first_wait_counts_within_poll_timeout_seconds():
    polls = []

    def pending(request: httpx.Request) -> httpx.Response:
        polls.append(request.url.path)
        return httpx.Response(200, json={"id": 7, "status": "pending", "total_items": 1})

    target = HttpTarget("http://api.test/v1", SECRET, poll_timeout_seconds=0.3, transport=httpx.MockTransport(pending))
    with pytest.raises(RetryableTargetError, match="poll_timeout_seconds"):
        # A pace of 0.5 s (requests were slow) is longer than the whole timeout: one poll, then give up.
        target._wait_until_final("http://api.test/v1/bulk_requests/7", 7, {"chunk": 0}, threading.Event(),
                                 first_wait=0.5)
    target.close()
    assert polls == ["/v1/bulk_requests/7"]


def test_the_first_poll_waits_about_as_long_as_recent_requests_took():
    def took(milliseconds: int) -> dict:
        """A final bulk request as the API shows it, `milliseconds` from creation to completion."""
        created = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
        completed = created + timedelta(milliseconds=milliseconds)
        return {"status": "completed", "created_at": created.isoformat(),
                "completed_at": completed.isoformat().replace("+00:00", "Z")}

    pace = PollPace()
    assert pace.first_wait() == POLL_FIRST_WAIT  # nothing seen yet
    for milliseconds in (300, 320, 280, 350, 310, 290, 900, 330):
        pace.record(took(milliseconds))
    assert pace.first_wait() == pytest.approx(0.32)  # the median: a slow request does not set the pace
    pace.record({"status": "completed", "completed_at": None})  # no times: nothing learnt
    assert pace.first_wait() == pytest.approx(0.32)
    for _ in range(PollPace.RECENT):
        pace.record(took(10))  # the queue emptied: only recent requests count, and never below the floor
    assert pace.first_wait() == POLL_FIRST_WAIT
    for _ in range(PollPace.RECENT):
        pace.record(took(60_000))
    assert pace.first_wait() == POLL_MAX_WAIT


# -- end to end against a real `loader serve` ------------------------------------------------

KEY = "test-key"
ROWS = [*SAMPLE_ROWS, ["2024-01-09", "T7", "Card", "-12.30", "usd", "CR"]]
# A second file sent later by a pipeline with its own cache: T1..T3 are in the target already.
LATER = [["2024-01-02", f"T{n}", "Again", "1.00", "USD", "DR"] for n in (1, 2, 3)] + [
    ["2024-02-01", "T8", "New", "5.00", "USD", "CR"]]
RECORD_COLUMNS = "data_stream_key, external_id, date, amount, currency, direction, description, metadata::varchar"


def serving(folder, **kwargs):
    """`loader serve` on `folder`/serve.duckdb (the folder is created)."""
    folder.mkdir(parents=True, exist_ok=True)
    return running_server(folder, **kwargs)


def same_port(server) -> tuple[str, ...]:
    """Arguments restarting a server where it was (the last --port wins over the fixture's 0)."""
    return ("--port", str(httpx.URL(server.url).port))


def api_target(server, **extra) -> dict:
    return {"type": "api", "base_url": server.url, "api_key": "${ENDCLOSE_API_KEY}", "chunk_size": 3,
            "concurrency": 4, **extra}


def write_pipeline(folder, rows, *, name="a.csv", **overrides):
    write_csv(folder / "data" / name, rows)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(**overrides), sort_keys=False))
    return path


def create_stream(server, key="ops"):
    """POST /data_streams, through the client's retries (the server may be injecting faults)."""
    client = ApiClient(server.url, SecretStr(KEY), retry=fast_retries())
    try:
        answer = client.request("POST", client.url("/data_streams"), what="POST /data_streams",
                                content=json.dumps({"key": key, "name": key.title(), "type": "api"}).encode(),
                                headers={"Content-Type": "application/json"})
    finally:
        client.close()
    assert answer.status_code == 201, answer.text


def fast_retries(sleeps: Sleeps | None = None) -> RetryPolicy:
    """Many attempts, no real waiting: the server's faults are random, the test's time is not."""
    return RetryPolicy(attempts=40, sleep=sleeps if sleeps is not None else Sleeps())


def run_with(target, path):
    """`loader run` in process, with a target built by the test (its retry policy)."""
    pipeline = load_pipeline(path, {"ENDCLOSE_API_KEY": KEY})
    with Source(SourceSpec.from_pipeline(pipeline)) as source:
        return Run(settings_from_pipeline(pipeline), target).execute(source.batches(), lambda: {"files": []})


def reasons(report) -> dict:
    return {(r["outcome"], r["reason_code"]): r["rows"] for r in report.summary["reasons"]}


def held_records(database) -> pl.DataFrame:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.sql(f"select {RECORD_COLUMNS} from records order by all").pl()


def bulk_request_count(database) -> int:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.sql("select count(*) from bulk_requests").fetchall()[0][0]


def mapped_rows(rows: int, prefix: str, stream: str = "ops") -> pl.DataFrame:
    """Rows as the pipeline hands them to a target: mapped, valid, keyed."""
    frame = pl.DataFrame({"n": pl.int_range(0, rows, eager=True)}).select(
        date=pl.lit(date(2024, 1, 1)) + pl.duration(days=pl.col("n") % 28),
        data_stream_key=pl.lit(stream),
        amount=pl.col("n") * 100 + 1,
        currency=pl.lit("USD"),
        direction=pl.lit("credit"),
        description=pl.format("row {}", pl.col("n")),
        external_id=pl.format(f"{prefix}-{{}}", pl.col("n")),
        metadata=pl.lit("{}"),
    )
    return frame.with_columns(key_hi=pl.col("external_id").hash(seed=1), key_lo=pl.col("external_id").hash(seed=2))


def chunks_for(target, rows: pl.DataFrame, chunk_size: int):
    return plan_chunks(rows, chunk_size=chunk_size, target_key=target.target_key, on_conflict="skip")[1]


def created_at(database, bulk_request_ids) -> list[float]:
    """The server's creation times of these bulk requests, in seconds, sorted."""
    with duckdb.connect(str(database), read_only=True) as con:
        stamps = con.execute("select epoch(created_at) from bulk_requests where list_contains(?, id) order by 1",
                             [bulk_request_ids]).fetchall()
    return [stamp for (stamp,) in stamps]


@pytest.mark.parametrize("on_conflict", ["skip", "error"])
def test_api_and_local_give_the_same_reports_and_the_same_records(tmp_path, on_conflict):
    local_dir, api_dir = tmp_path / "local", tmp_path / "api"
    local_first = run_pipeline(write_pipeline(local_dir, ROWS)).report
    local_later = run_pipeline(write_pipeline(local_dir, LATER, name="b.csv", target__on_conflict=on_conflict,
                                              source={"path": "data/b.csv"},
                                              dedupe={"cache": "other-cache.duckdb"})).report
    with serving(api_dir / "server") as server:
        create_stream(server)
        first = run_pipeline(write_pipeline(api_dir, ROWS, target=api_target(server)),
                             vars={"ENDCLOSE_API_KEY": KEY}).report
        later = run_pipeline(write_pipeline(api_dir, LATER, name="b.csv", source={"path": "data/b.csv"},
                                            target=api_target(server, on_conflict=on_conflict),
                                            dedupe={"cache": "other-cache.duckdb"}),
                             vars={"ENDCLOSE_API_KEY": KEY}).report
    for api_report, local_report in ((first, local_first), (later, local_later)):
        assert api_report.totals == local_report.totals
        assert reasons(api_report) == reasons(local_report)
        assert api_report.summary["by_stream"] == local_report.summary["by_stream"]
        api_rows = api_report.rows().sort("source_file", "source_row")
        local_rows = local_report.rows().sort("source_file", "source_row")
        assert api_rows.select("source_row", "outcome", "reason_code").equals(
            local_rows.select("source_row", "outcome", "reason_code"))
        assert api_rows.filter(pl.col("outcome") == "successful")["record_id"].null_count() == 0
    expected = {"skip": ("skipped", "exists_in_target"), "error": ("failed", "conflict")}[on_conflict]
    assert reasons(later)[expected] == 3
    assert first.summary["target"] == {"type": "api", "base_url": server.url}
    assert held_records(server.database).equals(held_records(local_dir / ".loader" / "endclose.duckdb"))


def test_a_resubmitted_chunk_returns_the_existing_request(tmp_path):
    with serving(tmp_path) as server:
        create_stream(server)
        target = HttpTarget(server.url, KEY, concurrency=2)
        chunks = chunks_for(target, mapped_rows(10, "R"), 4)
        first = target.send(chunks, on_conflict="skip")
        assert first.requests["status"].to_list() == ["completed"] * 3
        assert not first.requests["preexisting"].any()  # created by this run
        target.close()

        again = HttpTarget(server.url, KEY, concurrency=2)
        again.prepare()
        second = again.send(chunks, on_conflict="skip")
        again.close()
        assert second.requests["bulk_request_id"].to_list() == first.requests["bulk_request_id"].to_list()
        assert second.requests["preexisting"].all()
        assert second.items.equals(first.items)  # the same records, not new ones
    assert bulk_request_count(server.database) == 3
    assert held_records(server.database).height == 10


def test_results_of_more_than_200_rows_are_paged(tmp_path):
    with serving(tmp_path) as server:
        create_stream(server)
        target = HttpTarget(server.url, KEY)
        result = target.send(chunks_for(target, mapped_rows(1000, "P"), 1000), on_conflict="skip")
        target.close()
    assert result.items["index"].to_list() == list(range(1000))
    assert result.items["status"].unique().to_list() == ["successful"]
    assert result.items["record_id"].n_unique() == 1000


def test_a_refused_bulk_request_is_terminal_and_carries_the_apis_message(tmp_path):
    with serving(tmp_path) as server:
        create_stream(server)
        target = HttpTarget(server.url, KEY, concurrency=2)
        with pytest.raises(TerminalTargetError) as info:
            target.send(chunks_for(target, mapped_rows(6, "X"), 2), on_conflict="sometimes")
        target.close()
    assert "POST /records/bulk (chunk" in str(info.value) and "(400)" in str(info.value)
    assert "on_conflict" in str(info.value)  # the API's own words
    assert bulk_request_count(server.database) == 0


def test_requests_overlap_with_concurrency(tmp_path):
    """Server-side creation times: in flight together, the 4 requests are created together."""
    sent = {}
    with serving(tmp_path, extra_args=("--latency", "200")) as server:
        create_stream(server)
        for concurrency in (1, 4):
            target = HttpTarget(server.url, KEY, concurrency=concurrency)
            result = target.send(chunks_for(target, mapped_rows(12, f"C{concurrency}"), 3), on_conflict="skip")
            target.close()
            sent[concurrency] = result.requests["bulk_request_id"].to_list()
    stamps = {concurrency: created_at(server.database, ids) for concurrency, ids in sent.items()}
    # One at a time, each request waits for the answers to the previous one (200 ms each).
    assert min(b - a for a, b in pairwise(stamps[1])) >= 0.2
    # Four at a time, all four are created within one latency.
    assert stamps[4][-1] - stamps[4][0] < 0.2


def test_throttling_and_server_errors_are_survived_with_nothing_lost_or_doubled(tmp_path):
    with serving(tmp_path / "server",
                        extra_args=("--throttle-rate", "0.3", "--fail-rate", "0.2", "--seed", "7")) as server:
        create_stream(server)
        sleeps = Sleeps()
        rows = [[f"2024-01-{n % 28 + 1:02d}", f"F{n}", "x", f"{n}.00", "USD", "DR"] for n in range(30)]
        path = write_pipeline(tmp_path, rows, target=api_target(server))
        target = HttpTarget(server.url, KEY, concurrency=4, retry=fast_retries(sleeps))
        result = run_with(target, path)
    assert result.exit_code == 0, result.summary.get("error")
    assert reasons(result.report) == {("successful", "created"): 30}
    assert 1.0 in sleeps  # a 429's Retry-After: 1 was honoured
    assert len(sleeps) >= 5  # and the 503s were retried
    assert held_records(server.database)["external_id"].sort().to_list() == sorted(f"F{n}" for n in range(30))
    assert bulk_request_count(server.database) == 10  # one per chunk, whatever the retries


def test_dropped_connections_are_retried_into_the_existing_request(tmp_path):
    rows = [[f"2024-01-{n % 28 + 1:02d}", f"D{n}", "x", f"{n}.00", "USD", "DR"] for n in range(24)]
    with serving(tmp_path / "server", extra_args=("--drop-rate", "0.5", "--seed", "3")) as server:
        create_stream(server)
        path = write_pipeline(tmp_path, rows, target=api_target(server))
        result = run_with(HttpTarget(server.url, KEY, retry=fast_retries()), path)
    assert result.exit_code == 0, result.summary.get("error")
    assert reasons(result.report) == {("successful", "created"): 24}
    assert held_records(server.database).height == 24
    assert bulk_request_count(server.database) == 8


def test_an_answer_never_heard_is_found_by_the_next_run(tmp_path):
    rows = [[f"2024-01-{n % 28 + 1:02d}", f"D{n}", "x", f"{n}.00", "USD", "DR"] for n in range(12)]
    with serving(tmp_path / "server", extra_args=("--drop-rate", "1")) as server:
        create_stream(server)
        path = write_pipeline(tmp_path, rows, target=api_target(server))
        aborted = run_with(HttpTarget(server.url, KEY, concurrency=1, retry=fast_retries()), path)
    assert aborted.exit_code == 3
    assert "out of retries" in aborted.summary["error"] and "run the same command again" in aborted.summary["error"]
    assert reasons(aborted.report) == {("failed", "unprocessed"): 12}
    committed = bulk_request_count(server.database)
    assert committed == 1  # the first chunk, committed once however often it was resent

    # The same server (database and address: the address is part of the target's identity), healed.
    with serving(tmp_path / "server", extra_args=same_port(server)) as server:
        result = run_pipeline(path, vars={"ENDCLOSE_API_KEY": KEY})
    assert result.exit_code == 0
    assert sum(reasons(result.report).values()) == 12
    # the journal sent the unanswered chunk again first, so the source pass finds it already loaded
    assert set(reasons(result.report)) <= {("successful", "created"), ("skipped", "already_loaded")}
    assert held_records(server.database).height == 12  # nothing doubled
    assert bulk_request_count(server.database) == 4


def test_a_job_failing_midway_leaves_unprocessed_rows_that_the_next_run_completes(tmp_path):
    rows = [[f"2024-01-{n % 28 + 1:02d}", f"J{n}", "x", f"{n}.00", "USD", "DR"] for n in range(8)]
    with serving(tmp_path / "server", extra_args=("--job-fail-rate", "1")) as server:
        create_stream(server)
        path = write_pipeline(tmp_path, rows, target=api_target(server, chunk_size=4))
        first = run_pipeline(path, vars={"ENDCLOSE_API_KEY": KEY}).report
    # Each job of 4 rows fails after half of them.
    assert reasons(first) == {("successful", "created"): 4, ("failed", "unprocessed"): 4}
    assert first.failed()["reason"].str.contains("ended failed").all()

    with serving(tmp_path / "server", extra_args=same_port(server)) as server:  # healed
        second = run_pipeline(path, vars={"ENDCLOSE_API_KEY": KEY}).report
    assert reasons(second) == {("skipped", "already_loaded"): 4, ("successful", "created"): 4}
    assert held_records(server.database)["external_id"].sort().to_list() == sorted(f"J{n}" for n in range(8))


def test_a_wrong_key_exits_3_with_a_clear_message_and_never_shows_the_key(tmp_path):
    wrong = "wrong-key-7f3a9c2e51"
    with serving(tmp_path / "server") as server:
        path = write_pipeline(tmp_path, ROWS, target=api_target(server))
        result = run_cli("run", str(path), env={**os.environ, "ENDCLOSE_API_KEY": wrong})
    assert result.returncode == 3, result.stderr
    assert "the API refused target.api_key (401)" in result.stderr
    assert "ENDCLOSE_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr
    assert wrong not in result.stdout and wrong not in result.stderr
    # Nothing was loaded; whatever the run wrote (the run history, any report) holds no key.
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "server" not in p.parts]
    assert any(p.name == "cache.duckdb" for p in written)
    for file in written:
        assert wrong.encode() not in file.read_bytes(), file


def test_a_poll_that_never_ends_within_poll_timeout_exits_3(tmp_path):
    # A backlog the server's single worker applies first (queued requests go ten at a time, 6 ms
    # each here): our request stays pending for seconds.
    database = tmp_path / "server" / "serve.duckdb"
    backlog = [{"date": "2024-01-01", "data_stream_key": "ops", "amount": 1, "external_id": f"B{n}"}
               for n in range(1000)]
    with Engine.open(database) as engine:
        engine.ensure_environment("default")
        engine.ensure_streams("default", [{"key": "ops", "name": "Ops"}])
        table = normalize_json_records(json.dumps(backlog))
        engine.submit("default", [BulkSubmission(records=table, idempotency_key=f"backlog-{n}") for n in range(1000)],
                      process=False)
    with serving(tmp_path / "server") as server:
        path = write_pipeline(tmp_path, ROWS[:3], target=api_target(server, poll_timeout_seconds=0.3))
        result = run_cli("run", str(path), "--json", env={**os.environ, "ENDCLOSE_API_KEY": KEY})
    assert result.returncode == 3, result.stderr
    assert "target.poll_timeout_seconds" in result.stderr and "run the same command again" in result.stderr
    assert summary_of(result)["reasons"] == [{"outcome": "failed", "reason_code": "unprocessed", "rows": 3}]
