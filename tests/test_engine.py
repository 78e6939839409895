"""The local engine: bulk-records semantics of endclose-api.md on real DuckDB files."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loader.engine
from loader.engine import RECORD_COLUMNS, BulkSubmission, Engine, normalize_json_records
from loader.engine.schema import RECORD_KEY_SQL
from loader.errors import BadRequest, Conflict, LockedError, NotFound, TerminalTargetError, Unprocessable

ENV = "test"


# -- helpers -------------------------------------------------------------------------------


def record(**fields) -> dict:
    """A valid record of stream `bank`, with `fields` replacing or adding fields."""
    return {"date": "2024-01-31", "data_stream_key": "bank", "amount": 1234, **fields}


def records_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=RECORD_COLUMNS)


def submission(records: list[dict], **options) -> BulkSubmission:
    return BulkSubmission(records_table(records), **options)


def submit_one(engine: Engine, records: list[dict], environment: str = ENV, **options) -> dict:
    [summary] = engine.submit(environment, [submission(records, **options)])
    return summary


def results(engine: Engine, bulk_request_id: int, environment: str = ENV) -> list[dict]:
    return engine.get_bulk_request(environment, bulk_request_id, limit=200)["results"]["data"]


def count(engine: Engine, table: str) -> int:
    with engine._transaction() as con:
        [(n,)] = con.execute(f"SELECT count(*) FROM {table}").fetchall()
    return n


@pytest.fixture
def engine(tmp_path):
    with Engine.open(tmp_path / "endclose.duckdb") as engine:
        engine.ensure_streams(ENV, [{"key": "bank", "name": "Bank"}, {"key": "card", "name": "Card"}])
        yield engine


# -- the package -----------------------------------------------------------------------------


def test_all_names_the_public_interface():
    assert sorted(loader.engine.__all__) == sorted(
        ["Engine", "BulkSubmission", "RECORD_COLUMNS", "normalize_json_records"]
    )
    for name in loader.engine.__all__:
        assert getattr(loader.engine, name) is not None


def test_public_tables_have_the_documented_columns(engine):
    expected = {
        "environments": ["name", "created_at"],
        "data_streams": ["id", "environment", "key", "name", "type", "description", "created_at"],
        "records": [
            "id", "environment", "data_stream_key", "date", "amount", "currency", "direction",
            "description", "external_id", "metadata", "bulk_request_id", "created_at",
        ],
        "bulk_requests": [
            "id", "environment", "status", "source", "on_conflict", "idempotency_key", "total_items",
            "processed_items", "successful_items", "failed_items", "skipped_items", "created_at",
            "started_at", "completed_at", "error_message", "parent_bulk_request_id",
        ],
        "bulk_request_items": ["bulk_request_id", "index", "status", "record_id", "error"],
    }
    with engine._transaction() as con:
        for table, columns in expected.items():
            actual = [row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()]
            # extra columns may only be added at the end
            assert actual[: len(columns)] == columns, table
        types = dict((row[0], row[1]) for row in con.execute("DESCRIBE records").fetchall())
    assert types["date"] == "DATE" and types["amount"] == "BIGINT" and types["metadata"] == "JSON"


def test_reopening_keeps_data_and_ids(tmp_path):
    path = tmp_path / "db" / "endclose.duckdb"  # the folder is created too
    with Engine.open(path) as engine:
        engine.create_stream(ENV, "bank", "Bank")
        first = submit_one(engine, [record()])
    with Engine.open(path) as engine:
        second = submit_one(engine, [record()])
        assert second["id"] == first["id"] + 1
        assert len(engine.list_records(ENV, data_stream_key="bank")["data"]) == 2


def test_reads_do_not_wait_for_a_write_in_progress(engine):
    """A poll or a result page reads a snapshot while the worker's transaction is open."""
    first = engine.get_bulk_request(ENV, submit_one(engine, [record(external_id="a")])["id"])
    writing, written = threading.Event(), threading.Event()

    def write() -> None:
        with engine._transaction() as con:
            con.execute("UPDATE bulk_requests SET source = 'changing'")
            writing.set()
            written.wait(30)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert writing.wait(30)
        with concurrent.futures.ThreadPoolExecutor(2) as readers:
            # Each on a thread that never read before: its cursor is made while the write is open.
            reads = [readers.submit(engine.get_bulk_request, ENV, first["id"]) for _ in range(2)]
            done, _ = concurrent.futures.wait(reads, timeout=30)
            assert done == set(reads), "a read waited for the open write"
            assert {read.result()["status"] for read in reads} == {"completed"}
            assert {read.result()["source"] for read in reads} == {first["source"]}  # not the uncommitted one
    finally:
        written.set()
        writer.join()
    assert engine.get_bulk_request(ENV, first["id"])["source"] == "changing"


def test_closing_waits_for_the_reads_running_and_refuses_later_ones(tmp_path):
    engine = Engine.open(tmp_path / "endclose.duckdb")
    engine.ensure_streams(ENV, [{"key": "bank", "name": "Bank"}])
    [summary] = engine.submit(ENV, [submission([record(external_id="a")])])
    reading, read_done = threading.Event(), threading.Event()
    seen = []

    def read() -> None:
        with engine._snapshot() as con:
            reading.set()
            read_done.wait(30)
            seen.append(con.execute("SELECT count(*) FROM records").fetchall())

    reader = threading.Thread(target=read)
    reader.start()
    assert reading.wait(30)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        closing = pool.submit(engine.close)
        # Closing under a read would fail it (or the close, mid-query): the close waits for it.
        assert concurrent.futures.wait([closing], timeout=0.5).not_done == {closing}
        read_done.set()
        reader.join()
        closing.result(timeout=30)  # closed without an error
    assert seen == [[(1,)]]
    with pytest.raises(TerminalTargetError, match="closed"):
        engine.get_bulk_request(ENV, summary["id"])


def _row_groups(path: Path) -> int:
    with Engine.open(path, read_only=True) as engine, engine._snapshot() as con:
        [(groups,)] = con.execute(
            "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('records') WHERE column_id = 0"
        ).fetchall()
    return groups


def _numbered_requests(first: int, rows: int) -> list[BulkSubmission]:
    """1000-row requests of distinct external ids first, first+1, ..."""
    table = pa.table({
        "date": pa.repeat("2024-01-31", rows), "data_stream_key": pa.repeat("bank", rows),
        "amount": pa.array(range(first, first + rows), pa.int64()),
        "external_id": pa.array([f"id-{n}" for n in range(first, first + rows)]),
    })
    return [BulkSubmission(table.slice(offset, 1000)) for offset in range(0, rows, 1000)]


def test_small_appends_are_merged_into_few_row_groups_on_close(tmp_path):
    path = tmp_path / "endclose.duckdb"
    for run in range(12):
        with Engine.open(path) as engine:
            engine.ensure_streams(ENV, [{"key": "bank", "name": "Bank"}])
            engine.submit(ENV, _numbered_requests(run * 1000, 1000))
    assert _row_groups(path) <= 2  # not one per append


def test_a_large_append_keeps_its_row_groups_and_every_row(tmp_path):
    path = tmp_path / "endclose.duckdb"
    with Engine.open(path) as engine:
        engine.ensure_streams(ENV, [{"key": "bank", "name": "Bank"}])
        engine.submit(ENV, _numbered_requests(0, 10_000))
    assert _row_groups(path) == 1
    with Engine.open(path) as engine:
        engine.submit(ENV, _numbered_requests(10_000, 130_000))
    # 10,000 + 122,880 + 7,120 rows: the close does not rewrite them into two row groups.
    assert _row_groups(path) == 3
    with Engine.open(path, read_only=True) as engine, engine._snapshot() as con:
        assert con.execute("SELECT count(DISTINCT external_id), sum(amount) FROM records").fetchall() == [
            (140_000, sum(range(140_000)))
        ]


def test_running_out_of_memory_says_so_and_which_setting_to_raise(tmp_path, monkeypatch):
    monkeypatch.setenv("LOADER_ENGINE_MEMORY_LIMIT", "4MB")
    with Engine.open(tmp_path / "endclose.duckdb") as engine:
        engine.ensure_streams(ENV, [{"key": "bank", "name": "Bank"}])
        with pytest.raises(TerminalTargetError) as raised:
            engine.submit(ENV, _numbered_requests(0, 50_000))
        message = str(raised.value)
        assert "Out of Memory" in message and "LOADER_ENGINE_MEMORY_LIMIT" in message
        assert "transaction is aborted" not in message
        assert count(engine, "records") == 0 and count(engine, "bulk_requests") == 0


def test_read_only_engine_reads_but_does_not_write(tmp_path):
    path = tmp_path / "endclose.duckdb"
    with Engine.open(path) as engine:
        engine.create_stream(ENV, "bank", "Bank")
        submit_one(engine, [record(currency="jpy")])
    with Engine.open(path, read_only=True) as engine:
        [row] = engine.list_records(ENV, data_stream_key="bank")["data"]
        assert row["decimal_places"] == 0
        with pytest.raises(TerminalTargetError):
            submit_one(engine, [record()])
    with pytest.raises(TerminalTargetError, match="no such local database"):
        Engine.open(tmp_path / "missing.duckdb", read_only=True)


def test_a_second_process_gets_locked_error(tmp_path):
    path = tmp_path / "held.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from loader.engine import Engine\n"
            "engine = Engine.open(sys.argv[1]); print('ready', flush=True); sys.stdin.readline()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(LockedError) as caught:
            Engine.open(path)
        message = str(caught.value)
        assert str(path.resolve()) in message
        assert "another loader process" in message
    finally:
        holder.stdin.close()  # the holder's readline returns: it exits
        assert holder.wait(timeout=60) == 0


# -- data streams and environments -------------------------------------------------------------


def test_create_stream_refuses_a_taken_key_or_empty_fields(engine):
    stream = engine.create_stream(ENV, "payouts", "Payouts", description="Stripe payouts")
    assert stream["key"] == "payouts" and stream["type"] == "api" and stream["description"] == "Stripe payouts"
    assert engine.get_stream(ENV, "payouts")["id"] == stream["id"]
    for key, name in [("payouts", "Again"), ("", "Empty key"), ("x", ""), (None, "No key")]:
        with pytest.raises(Unprocessable) as caught:
            engine.create_stream(ENV, key, name)
        assert caught.value.status_code == 422
    with pytest.raises(NotFound):
        engine.get_stream(ENV, "unknown")


def test_ensure_streams_creates_only_the_missing_ones(engine):
    created = engine.ensure_streams(ENV, [{"key": "bank", "name": "Bank"}, {"key": "ledger", "name": "Ledger"}])
    assert created == ["ledger"]
    assert [s["key"] for s in engine.list_streams(ENV)] == ["bank", "card", "ledger"]
    assert engine.ensure_streams(ENV, [{"key": "ledger", "name": "Ledger"}]) == []


def test_environments_are_isolated(engine):
    engine.ensure_environment("other")
    engine.create_stream("other", "bank", "Other bank")  # the same key in another environment
    assert [s["key"] for s in engine.list_streams("other")] == ["bank"]
    ours = submit_one(engine, [record(external_id="x1")], idempotency_key="same-key")
    theirs = submit_one(engine, [record(external_id="x1"), record(data_stream_key="card")], "other",
                        idempotency_key="same-key")
    # same idempotency key and external_id, other environment: a new request, no conflict
    assert theirs["id"] != ours["id"]
    assert theirs["successful_items"] == 1
    assert results(engine, theirs["id"], "other")[1]["error"] == (
        "data_stream_key: no data stream 'card' in this environment"
    )
    assert [r["id"] for r in engine.list_records(ENV, external_id="x1")["data"]] == [
        results(engine, ours["id"])[0]["record_id"]
    ]
    with pytest.raises(NotFound):
        engine.get_bulk_request("other", ours["id"])
    assert engine.list_bulk_requests(ENV)["data"][0]["id"] == ours["id"]
    assert engine.bulk_request_items("other", [ours["id"]]).height == 0


def test_stream_health_counts_records_and_requests(engine):
    submit_one(engine, [record(), record(data_stream_key="card")])
    engine.submit(ENV, [submission([record()])], process=False)
    health = engine.stream_health(ENV, "bank")
    assert health["records_count"] == 1
    assert health["bulk_requests"] == {
        "pending": 1, "processing": 0, "completed": 1, "failed": 0, "cancelled": 0, "stuck": 0,
    }
    assert health["last_ingestion_at"].endswith("Z")
    assert engine.stream_health(ENV, "card")["bulk_requests"]["pending"] == 0
    with engine._transaction() as con:  # a request processing for a day is stuck
        con.execute("UPDATE bulk_requests SET status = 'processing', started_at = now()::TIMESTAMP - INTERVAL 1 DAY "
                    "WHERE status = 'pending'")
    assert engine.stream_health(ENV, "bank")["bulk_requests"]["stuck"] == 1
    assert engine.stream_health(ENV, "bank")["bulk_requests"]["processing"] == 0
    with pytest.raises(NotFound):
        engine.stream_health(ENV, "nope")


# -- row rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"date": None}, "date: is required"),
        ({"date": "2024-1-31"}, "date: must be YYYY-MM-DD, not '2024-1-31'"),
        ({"date": "31/01/2024"}, "date: must be YYYY-MM-DD, not '31/01/2024'"),
        ({"date": "2024-01-31T00:00:00"}, "date: must be YYYY-MM-DD"),
        ({"date": "2023-02-29"}, "date: 2023-02-29 is not a real calendar date"),
        ({"date": "2024-13-01"}, "date: 2024-13-01 is not a real calendar date"),
        ({"date": "0000-01-01"}, "date: 0000-01-01 is not a real calendar date"),
        ({"data_stream_key": None}, "data_stream_key: is required"),
        ({"data_stream_key": "nope"}, "data_stream_key: no data stream 'nope' in this environment"),
        ({"amount": None}, "amount: is required"),
        ({"currency": "US"}, "currency: must be a 3-letter ISO 4217 code, not 'US'"),
        ({"currency": "US1"}, "currency: must be a 3-letter ISO 4217 code"),
        ({"currency": "ABC"}, "currency: ABC is not a known ISO 4217 currency"),
        ({"currency": "xau"}, "currency: XAU is not a known ISO 4217 currency"),  # gold: exponent None
        ({"direction": "CREDIT"}, "direction: must be credit or debit, not 'CREDIT'"),
        ({"direction": "sideways"}, "direction: must be credit or debit"),
        ({"metadata": "[1, 2]"}, "metadata: must be a JSON object"),
        ({"metadata": "{not json"}, "metadata: must be a JSON object"),
        ({"input_error": "amount: must be an integer, not a float"}, "amount: must be an integer, not a float"),
    ],
)
def test_row_rule_fails_the_row_with_an_error_naming_field_and_rule(engine, fields, error):
    summary = submit_one(engine, [record(), record(**fields), record()])
    assert (summary["successful_items"], summary["failed_items"]) == (2, 1)
    [first, bad, last] = results(engine, summary["id"])
    assert bad["status"] == "failed" and "record_id" not in bad
    assert bad["error"].startswith(error)
    assert first["status"] == last["status"] == "successful"


def test_an_input_error_wins_over_other_problems(engine):
    summary = submit_one(engine, [record(date=None, amount=None, input_error="record: must be a JSON object")])
    assert results(engine, summary["id"])[0]["error"] == "record: must be a JSON object"


def test_valid_rows_are_stored_as_the_api_returns_them(engine):
    summary = submit_one(
        engine,
        [
            record(amount=-5, currency="jpy", direction="debit", description="fee", external_id="e1",
                   metadata='{"batch": 7, "tags": ["a"]}'),
            record(amount=1000, currency="BHD"),
            record(currency=None, metadata=None),
        ],
    )
    assert summary["successful_items"] == 3
    rows = engine.list_records(ENV, bulk_request_id=summary["id"])["data"]
    by_currency = {row["currency"]: row for row in rows}
    assert by_currency["JPY"] == {
        "id": results(engine, summary["id"])[0]["record_id"], "data_stream_key": "bank", "date": "2024-01-31",
        "amount": -5, "currency": "JPY", "decimal_places": 0, "direction": "debit", "description": "fee",
        "external_id": "e1", "metadata": {"batch": 7, "tags": ["a"]},
    }
    assert by_currency["BHD"]["decimal_places"] == 3
    assert by_currency["USD"]["decimal_places"] == 2 and by_currency["USD"]["metadata"] == {}
    assert by_currency["USD"]["direction"] is None


# -- conflicts ------------------------------------------------------------------------------------


def test_existing_external_id_is_skipped_or_failed_by_on_conflict(engine):
    submit_one(engine, [record(external_id="t1", amount=1)])
    skipped = submit_one(engine, [record(external_id="t1", amount=2), record(external_id="t2")])
    assert (skipped["successful_items"], skipped["skipped_items"], skipped["failed_items"]) == (1, 1, 0)
    assert results(engine, skipped["id"])[0] == {"index": 0, "status": "skipped"}
    failed = submit_one(engine, [record(external_id="t1", amount=3)], on_conflict="error")
    assert failed["failed_items"] == 1
    assert results(engine, failed["id"])[0]["error"] == "external_id 't1' already exists in data stream 'bank'"
    [kept] = engine.list_records(ENV, external_id="t1")["data"]
    assert kept["amount"] == 1


def test_records_written_before_the_key_table_still_conflict(tmp_path):
    # A file from before `_record_keys`: its records have no keys until the next open builds them.
    path = tmp_path / "endclose.duckdb"
    with Engine.open(path) as engine:
        engine.ensure_streams(ENV, [{"key": "bank", "name": "Bank"}])
        submit_one(engine, [record(external_id="t1", amount=1), record(external_id="t2"), record()])
        with engine._transaction() as con:
            con.execute("DELETE FROM _record_keys")
    with Engine.open(path) as engine:
        assert count(engine, "_record_keys") == 2  # the two records with an external_id
        again = submit_one(engine, [record(external_id="t1", amount=9), record(external_id="t3")])
        assert (again["successful_items"], again["skipped_items"]) == (1, 1)


def test_records_a_user_inserts_with_another_client_still_conflict(tmp_path):
    path = tmp_path / "endclose.duckdb"
    with Engine.open(path) as engine:
        engine.ensure_streams(ENV, [{"key": "bank", "name": "Bank"}])
        submit_one(engine, [record(external_id="t1")])
    with duckdb.connect(str(path)) as con:  # the public table, written by hand
        con.execute("INSERT INTO records SELECT id + 100, environment, data_stream_key, date, amount, currency, "
                    "direction, description, 'by-hand', metadata, bulk_request_id, created_at FROM records")
    with Engine.open(path) as engine:
        summary = submit_one(engine, [record(external_id="by-hand"), record(external_id="t1"), record(external_id="t9")])
        assert (summary["successful_items"], summary["skipped_items"]) == (1, 2)


def test_a_shared_key_hash_is_a_candidate_never_a_conflict(engine):
    # Make t1's stored key hash also the hash of t2's key, as an md5 collision would.
    first = submit_one(engine, [record(external_id="t1")])
    with engine._transaction() as con:
        [(t1_key, t1_id)] = con.execute("SELECT key_hi, record_id FROM _record_keys").fetchall()
        key_sql = RECORD_KEY_SQL.format(environment="?", data_stream_key="'bank'", external_id="'t2'")
        [(t2_key,)] = con.execute(f"SELECT {key_sql}", [ENV]).fetchall()
        con.execute("INSERT INTO _record_keys VALUES (?, ?)", [t2_key, t1_id])
    assert t1_key != t2_key and first["successful_items"] == 1
    summary = submit_one(engine, [record(external_id="t2"), record(external_id="t1")])
    assert (summary["successful_items"], summary["skipped_items"]) == (1, 1)
    assert [r["status"] for r in results(engine, summary["id"])] == ["successful", "skipped"]

def test_keys_sharing_one_hash_are_told_apart_by_their_strings(engine, monkeypatch):
    # Every key hashes alike, as if md5 collided for all of them: rows are then only candidates,
    # and the strings decide, both within the request and against stored records.
    from loader.engine import bulk

    monkeypatch.setattr(bulk, "_OUTCOME", bulk._OUTCOME.replace(bulk._RECORD_KEY, "42::UBIGINT"))
    submit_one(engine, [record(external_id="held")])
    summary = submit_one(engine, [record(external_id="a"), record(external_id="b"), record(external_id="a"),
                                  record(external_id="held"), record(external_id="c", data_stream_key="card")])
    assert [r["status"] for r in results(engine, summary["id"])] == [
        "successful", "successful", "skipped", "skipped", "successful"]
    assert summary["successful_items"] == 3


def test_same_external_id_in_another_stream_does_not_conflict(engine):
    summary = submit_one(engine, [record(external_id="t1"), record(external_id="t1", data_stream_key="card")])
    assert summary["successful_items"] == 2


def test_within_a_request_the_first_valid_row_wins(engine):
    summary = submit_one(
        engine,
        [
            record(external_id="d", date="2024-02-30"),  # invalid: claims nothing
            record(external_id="d", amount=2),  # the first valid one wins
            record(external_id="d", amount=3),
            record(),  # no external_id: never conflicts
            record(),
        ],
        on_conflict="error",
    )
    statuses = [r["status"] for r in results(engine, summary["id"])]
    assert statuses == ["failed", "successful", "failed", "successful", "successful"]
    assert results(engine, summary["id"])[2]["error"] == "external_id 'd' already exists in data stream 'bank'"
    assert [r["amount"] for r in engine.list_records(ENV, external_id="d")["data"]] == [2]
    assert summary["total_items"] == summary["successful_items"] + summary["failed_items"] + summary["skipped_items"]


def test_across_requests_of_one_call_earlier_requests_win(engine):
    summaries = engine.submit(
        ENV,
        [
            submission([record(external_id="a", amount=1)]),
            submission([record(external_id="a", amount=2), record(external_id="b", amount=2)]),
            submission([record(external_id="b", amount=3)], on_conflict="error"),
        ],
    )
    assert [(s["successful_items"], s["skipped_items"], s["failed_items"]) for s in summaries] == [
        (1, 0, 0), (1, 1, 0), (0, 0, 1),
    ]
    assert [r["amount"] for r in engine.list_records(ENV, data_stream_key="bank")["data"]] == [2, 1]


# -- requests as a whole --------------------------------------------------------------------------


def test_summary_shape_and_counters_add_up(engine):
    summary = submit_one(engine, [record(external_id="x"), record(external_id="x"), record(date="bad")])
    assert summary == {
        "id": summary["id"], "status": "completed", "total_items": 3, "processed_items": 3,
        "successful_items": 1, "failed_items": 1, "skipped_items": 1, "url": f"/v1/bulk_requests/{summary['id']}",
    }
    full = engine.get_bulk_request(ENV, summary["id"])
    assert full["progress"] == 100 and full["source"] == "api" and full["on_conflict"] == "skip"
    assert full["started_at"] is not None and full["completed_at"] is not None
    assert count(engine, "bulk_request_items") == 3


def test_idempotency_key_answers_the_existing_request_and_creates_nothing(engine):
    first = submit_one(engine, [record(external_id="i1")], idempotency_key="chunk-1")
    before = (count(engine, "bulk_requests"), count(engine, "records"), count(engine, "bulk_request_items"))
    again = submit_one(engine, [record(external_id="i2"), record()], idempotency_key="chunk-1")
    assert again == first
    assert (count(engine, "bulk_requests"), count(engine, "records"), count(engine, "bulk_request_items")) == before
    assert engine.existing_idempotency_keys(ENV, ["chunk-2", "chunk-1"]) == ["chunk-1"]
    assert engine.existing_idempotency_keys("other", ["chunk-1"]) == []


def test_idempotency_key_repeated_within_one_call(engine):
    summaries = engine.submit(
        ENV,
        [submission([record()], idempotency_key="k"), submission([record(), record()], idempotency_key="k")],
    )
    assert summaries[0] == summaries[1]
    assert summaries[0]["total_items"] == 1
    assert count(engine, "bulk_requests") == 1


@pytest.mark.parametrize("rows", [0, 1001])
def test_request_size_out_of_range_is_422_and_creates_nothing(engine, rows):
    with pytest.raises(Unprocessable) as caught:
        engine.submit(ENV, [submission([record()]), submission([record()] * rows)])
    assert caught.value.status_code == 422
    assert count(engine, "bulk_requests") == 0 and count(engine, "records") == 0


def test_request_of_1000_records_is_accepted(engine):
    assert submit_one(engine, [record()] * 1000)["successful_items"] == 1000


def test_unknown_on_conflict_is_400_and_creates_nothing(engine):
    with pytest.raises(BadRequest) as caught:
        engine.submit(ENV, [submission([record()]), submission([record()], on_conflict="overwrite")])
    assert caught.value.status_code == 400
    assert count(engine, "bulk_requests") == 0


def test_submit_accepts_tables_with_fewer_or_wider_columns(engine):
    table = pa.table({"date": ["2024-01-01"], "data_stream_key": ["bank"], "amount": pa.array([5], pa.int32()),
                      "source_row": [17]})
    polars_like = pl.DataFrame([record(external_id="p1", currency="eur")]).to_arrow()  # large_string columns
    summaries = engine.submit(ENV, [BulkSubmission(table, source="loader"), BulkSubmission(polars_like)])
    assert [s["successful_items"] for s in summaries] == [1, 1]
    assert engine.get_bulk_request(ENV, summaries[0]["id"])["source"] == "loader"
    assert engine.list_records(ENV, external_id="p1")["data"][0]["currency"] == "EUR"
    with pytest.raises(BadRequest):
        engine.submit(ENV, [BulkSubmission(pa.table({"amount": [1.5]}))])


# -- pending requests and the worker -----------------------------------------------------------------


def test_pending_requests_are_processed_in_committed_slices(engine):
    [summary] = engine.submit(ENV, [submission([record(external_id=str(n)) for n in range(5)])], process=False)
    assert summary["status"] == "pending" and summary["processed_items"] == 0
    assert results(engine, summary["id"]) == []
    seen = []

    def poll(bulk_request_id, applied):
        # called between slices, outside the worker's transaction: what a poller sees
        request = engine.get_bulk_request(ENV, bulk_request_id)
        seen.append((applied, request["status"], request["processed_items"], request["progress"]))

    assert engine.process_pending(slice_rows=2, on_slice=poll) == [summary["id"]]
    assert seen == [(2, "processing", 2, 40), (2, "processing", 4, 80), (1, "completed", 5, 100)]
    assert [r["index"] for r in results(engine, summary["id"])] == [0, 1, 2, 3, 4]
    assert count(engine, "_bulk_request_inputs") == 0  # a completed request keeps no inputs
    assert engine.process_pending() == []


def test_process_pending_takes_oldest_first_or_the_given_ids(engine):
    summaries = engine.submit(ENV, [submission([record(external_id="same")]) for _ in range(3)], process=False)
    ids = [s["id"] for s in summaries]
    assert engine.process_pending([ids[2], 999]) == [ids[2]]
    assert engine.process_pending() == ids[:2]
    statuses = [engine.get_bulk_request(ENV, i)["results"]["data"][0]["status"] for i in ids]
    # the request processed first wins the external_id
    assert statuses == ["skipped", "skipped", "successful"]


def test_requests_processed_together_keep_their_order_and_resume_where_they_stopped(engine):
    same = engine.submit(ENV, [submission([record(external_id="same")]) for _ in range(3)], process=False)
    ids = [s["id"] for s in same]
    assert engine.process_together([ids[2], ids[0], 999, ids[1]]) == [ids[2], ids[0], ids[1]]
    statuses = [results(engine, i)[0]["status"] for i in ids]
    assert statuses == ["skipped", "skipped", "successful"]  # the first of the given order wins

    [halfway] = engine.submit(ENV, [submission([record(external_id=f"h{n}") for n in range(5)])], process=False)

    class Stop(Exception):
        pass

    def stop(bulk_request_id, applied):
        raise Stop  # the worker stopped after the first committed slice

    with pytest.raises(Stop):
        engine.process_pending([halfway["id"]], slice_rows=2, on_slice=stop)
    assert engine.get_bulk_request(ENV, halfway["id"])["processed_items"] == 2
    [lost] = engine.submit(ENV, [submission([record(external_id="lost")])], process=False)
    with engine._transaction() as con:
        con.execute("DELETE FROM _bulk_request_inputs WHERE bulk_request_id = ?", [lost["id"]])
    applied = []
    engine.process_together([halfway["id"], lost["id"]], on_slice=lambda i, n: applied.append((i, n)))
    assert applied == [(halfway["id"], 3)]
    finished = engine.get_bulk_request(ENV, halfway["id"])
    assert (finished["status"], finished["successful_items"]) == ("completed", 5)
    assert [r["index"] for r in results(engine, halfway["id"])] == [0, 1, 2, 3, 4]
    failed = engine.get_bulk_request(ENV, lost["id"])
    assert failed["status"] == "failed" and "no stored input" in failed["error_message"]
    assert count(engine, "_bulk_request_inputs") == 0


def test_a_request_left_processing_is_resumed_only_when_named(engine):
    [summary] = engine.submit(ENV, [submission([record()] * 3)], process=False)
    with engine._transaction() as con:  # a worker that died after starting it
        con.execute("UPDATE bulk_requests SET status = 'processing' WHERE id = ?", [summary["id"]])
    assert engine.process_pending() == []
    assert engine.process_pending([summary["id"]]) == [summary["id"]]
    assert engine.get_bulk_request(ENV, summary["id"])["status"] == "completed"


def test_fail_after_leaves_later_rows_unprocessed(engine):
    [summary] = engine.submit(ENV, [submission([record(amount=n) for n in range(5)])], process=False)
    engine.process_pending(slice_rows=2, fail_after=3)
    request = engine.get_bulk_request(ENV, summary["id"])
    assert request["status"] == "failed" and "fail_after=3" in request["error_message"]
    assert request["processed_items"] == 3 and request["successful_items"] == 3
    assert request["completed_at"] is not None
    assert [r["index"] for r in request["results"]["data"]] == [0, 1, 2]
    assert sorted(r["amount"] for r in engine.list_records(ENV, data_stream_key="bank")["data"]) == [0, 1, 2]


def test_fail_after_beyond_the_rows_completes(engine):
    [summary] = engine.submit(ENV, [submission([record()] * 3)], process=False)
    engine.process_pending(fail_after=3)
    assert engine.get_bulk_request(ENV, summary["id"])["status"] == "completed"


def test_cancel_a_pending_request(engine):
    [summary] = engine.submit(ENV, [submission([record()])], process=False)
    cancelled = engine.cancel(ENV, summary["id"])
    assert cancelled["status"] == "cancelled" and cancelled["completed_at"] is not None
    assert engine.process_pending() == []
    assert count(engine, "records") == 0
    with pytest.raises(Conflict) as caught:
        engine.cancel(ENV, summary["id"])
    assert caught.value.status_code == 409


def test_cancel_a_completed_request_is_409_and_unknown_is_404(engine):
    summary = submit_one(engine, [record()])
    with pytest.raises(Conflict):
        engine.cancel(ENV, summary["id"])
    with pytest.raises(NotFound):
        engine.cancel(ENV, 12345)


def test_cancel_while_processing_stops_before_the_next_slice(engine):
    [summary] = engine.submit(ENV, [submission([record()] * 5)], process=False)
    engine.process_pending(slice_rows=2, on_slice=lambda bulk_request_id, _: engine.cancel(ENV, bulk_request_id))
    request = engine.get_bulk_request(ENV, summary["id"])
    assert request["status"] == "cancelled"
    assert request["processed_items"] == 2 and len(request["results"]["data"]) == 2


def test_retry_reruns_failed_skipped_and_unprocessed_rows(engine):
    submit_one(engine, [record(external_id="old")])
    rows = [
        record(amount=0),  # successful
        record(external_id="old", amount=1),  # skipped
        record(date="nope", amount=2),  # failed
        record(amount=3),  # unprocessed
        record(amount=4),  # unprocessed
    ]
    [parent] = engine.submit(ENV, [submission(rows)], process=False)
    engine.process_pending(fail_after=3)
    retried = engine.retry(ENV, parent["id"])
    assert retried["status"] == "pending" and retried["source"] == "retry"
    assert retried["parent_bulk_request_id"] == parent["id"]
    assert retried["total_items"] == 4 and retried["on_conflict"] == "skip"
    engine.process_pending()
    done = engine.get_bulk_request(ENV, retried["id"])
    # indexes are the parent's, so results map back to the original rows
    assert [(r["index"], r["status"]) for r in done["results"]["data"]] == [
        (1, "skipped"), (2, "failed"), (3, "successful"), (4, "successful"),
    ]
    assert sorted(r["amount"] for r in engine.list_records(ENV, data_stream_key="bank")["data"]) == [0, 3, 4, 1234]
    with pytest.raises(Conflict):
        engine.retry(ENV, retried["id"])  # completed


def test_retry_of_a_cancelled_pending_request_reruns_everything(engine):
    [parent] = engine.submit(ENV, [submission([record(), record()])], process=False)
    engine.cancel(ENV, parent["id"])
    retried = engine.retry(ENV, parent["id"], process=True)
    assert retried["status"] == "completed" and retried["successful_items"] == 2
    with pytest.raises(NotFound):
        engine.retry(ENV, 999)


# -- reads ------------------------------------------------------------------------------------------


def test_get_bulk_request_pages_results(engine):
    summary = submit_one(engine, [record(amount=n) for n in range(5)])
    first = engine.get_bulk_request(ENV, summary["id"], limit=2)
    assert [r["index"] for r in first["results"]["data"]] == [0, 1] and first["results"]["has_more"] is True
    last = engine.get_bulk_request(ENV, summary["id"], limit=2, offset=4)
    assert [r["index"] for r in last["results"]["data"]] == [4] and last["results"]["has_more"] is False
    assert last["results"]["offset"] == 4
    for limit in (0, 201):
        with pytest.raises(Unprocessable):
            engine.get_bulk_request(ENV, summary["id"], limit=limit)
    with pytest.raises(NotFound):
        engine.get_bulk_request(ENV, summary["id"] + 100)


def test_bulk_request_items_frame(engine):
    a = submit_one(engine, [record(), record(date="x")])
    b = submit_one(engine, [record()])
    items = engine.bulk_request_items(ENV, [b["id"], a["id"]])
    assert items.columns == ["bulk_request_id", "index", "status", "record_id", "error"]
    assert items.select("bulk_request_id", "index").rows() == [(a["id"], 0), (a["id"], 1), (b["id"], 0)]
    assert items["status"].to_list() == ["successful", "failed", "successful"]
    assert items["record_id"].null_count() == 1


def test_list_records_pages_newest_first_and_needs_a_filter(engine):
    submit_one(engine, [record(amount=n) for n in range(5)])
    submit_one(engine, [record(data_stream_key="card")])
    amounts, cursor = [], None
    pages = 0
    while True:
        page = engine.list_records(ENV, data_stream_key="bank", limit=2, cursor=cursor)
        pages += 1
        amounts += [r["amount"] for r in page["data"]]
        assert page["limit"] == 2
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and amounts == [4, 3, 2, 1, 0]
    with pytest.raises(Unprocessable) as caught:
        engine.list_records(ENV)
    assert caught.value.status_code == 422
    with pytest.raises(Unprocessable):
        engine.list_records(ENV, data_stream_key="bank", cursor="not-a-cursor")
    with pytest.raises(Unprocessable):
        engine.list_records(ENV, data_stream_key="bank", limit=500)


def test_list_bulk_requests_filters_and_pages(engine):
    ids = [submit_one(engine, [record()])["id"] for _ in range(3)]
    card = submit_one(engine, [record(data_stream_key="card")], source="loader")["id"]
    [pending] = engine.submit(ENV, [submission([record()])], process=False)
    listed, cursor = [], None
    while True:
        page = engine.list_bulk_requests(ENV, limit=2, cursor=cursor)
        listed += [r["id"] for r in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert listed == [pending["id"], card, *reversed(ids)]
    assert [r["id"] for r in engine.list_bulk_requests(ENV, data_stream_key="card")["data"]] == [card]
    assert [r["id"] for r in engine.list_bulk_requests(ENV, status="pending")["data"]] == [pending["id"]]
    assert [r["id"] for r in engine.list_bulk_requests(ENV, source="loader")["data"]] == [card]
    created = engine.get_bulk_request(ENV, card)["created_at"]
    assert [r["id"] for r in engine.list_bulk_requests(ENV, created_after=created)["data"]] == [pending["id"]]
    with pytest.raises(Unprocessable, match="created_after is out of range"):
        engine.list_bulk_requests(ENV, created_after="0001-01-01T00:00:00+05:00")
    assert pending["id"] not in [r["id"] for r in engine.list_bulk_requests(ENV, created_before=created)["data"]]
    with pytest.raises(Unprocessable):
        engine.list_bulk_requests(ENV, status="done")


# -- normalize_json_records ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("element", "error"),
    [
        ({"date": "2024-01-01", "data_stream_key": "bank", "amount": 1.5}, "amount: must be an integer, not a float"),
        ({"date": "2024-01-01", "data_stream_key": "bank", "amount": 100.0}, "amount: must be an integer, not a float"),
        ({"date": "2024-01-01", "data_stream_key": "bank", "amount": True}, "amount: must be an integer, not a boolean"),
        ({"date": "2024-01-01", "data_stream_key": "bank", "amount": "12"}, "amount: must be an integer, not a string"),
        ({"date": "2024-01-01", "data_stream_key": "bank", "amount": 2**64 - 1}, "amount: 18446744073709551615 is out"),
        ({"date": "2024-01-01", "data_stream_key": "bank"}, "amount: is required"),
        ({"data_stream_key": "bank", "amount": 1}, "date: is required"),
        ({"date": 20240101, "data_stream_key": "bank", "amount": 1}, "date: must be a string, not an integer"),
        ({"date": "2024-01-01", "amount": 1}, "data_stream_key: is required"),
        ({"date": "2024-01-01", "data_stream_key": "bank", "amount": 1, "currency": 840},
         "currency: must be a string, not an integer"),
        ({"date": "2024-01-01", "data_stream_key": "bank", "amount": 1, "external_id": 7},
         "external_id: must be a string, not an integer"),
        ({"date": "2024-01-01", "data_stream_key": "bank", "amount": 1, "metadata": [1]},
         "metadata: must be a JSON object, not an array"),
        ({"date": "2024-01-01", "data_stream_key": "bank", "amount": 1, "metadata": "{}"},
         "metadata: must be a JSON object, not a string"),
        ("a string", "record: must be a JSON object, not a string"),
        (None, "record: must be a JSON object, not null"),
        ([1], "record: must be a JSON object, not an array"),
    ],
)
def test_normalize_turns_wrong_json_types_into_input_errors(element, error):
    table = normalize_json_records(json.dumps([{"date": "2024-01-01", "data_stream_key": "bank", "amount": 1}, element]))
    assert table.schema.equals(RECORD_COLUMNS)
    assert table.column("input_error").to_pylist()[0] is None
    assert table.column("input_error").to_pylist()[1].startswith(error)


def test_normalize_keeps_values_and_order():
    body = json.dumps(
        [
            {"date": "2024-01-01", "data_stream_key": "bank", "amount": -7, "currency": "eur", "direction": "debit",
             "description": "caf\u00e9 \"quoted\"", "external_id": "e1", "metadata": {"a": [1, {"b": None}]},
             "unknown_field": True},
            {"date": "2024-01-02", "data_stream_key": "card", "amount": 9007199254740993, "metadata": None},
        ]
    ).encode()
    first, second = normalize_json_records(body).to_pylist()
    assert first == {
        "date": "2024-01-01", "data_stream_key": "bank", "amount": -7, "currency": "eur", "direction": "debit",
        "description": 'caf\u00e9 "quoted"', "external_id": "e1", "metadata": first["metadata"], "input_error": None,
    }
    assert json.loads(first["metadata"]) == {"a": [1, {"b": None}]}
    assert second["amount"] == 9007199254740993 and second["metadata"] is None and second["input_error"] is None
    assert normalize_json_records("[]").num_rows == 0


@pytest.mark.parametrize("body", ['{"records": []}', "[1,", "", "null", "42"])
def test_normalize_refuses_what_is_not_a_json_array(body):
    with pytest.raises(Unprocessable):
        normalize_json_records(body)


def test_normalized_input_errors_fail_their_rows(engine):
    table = normalize_json_records(json.dumps([record(), record(amount=1.5), record(external_id=3)]))
    [summary] = engine.submit(ENV, [BulkSubmission(table)])
    assert [r.get("error") for r in results(engine, summary["id"])] == [
        None, "amount: must be an integer, not a float", "external_id: must be a string, not an integer",
    ]


# -- one call of N requests == N calls ------------------------------------------------------------------

# Weighted towards valid rows and few external ids, so that rows of
# different requests often claim the same (stream, external_id).
_records = st.fixed_dictionaries(
    {
        "date": st.sampled_from(["2024-01-31", "2024-01-31", "2024-01-31", "2024-02-30", None]),
        "data_stream_key": st.sampled_from(["bank", "bank", "bank", "card", "nope"]),
        "amount": st.sampled_from([1, 20, -300, 4000, None]),
        "external_id": st.sampled_from([None, "a", "b", "b"]),
        "currency": st.sampled_from([None, None, "usd", "JPY", "ABC"]),
    }
)
_submissions = st.lists(
    st.tuples(
        st.lists(_records, min_size=1, max_size=6),
        st.sampled_from(["skip", "error"]),
        st.sampled_from([None, None, "k1", "k2"]),
    ),
    min_size=1,
    max_size=6,
)
_existing = st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True)


def _snapshot(engine: Engine) -> dict:
    with engine._transaction() as con:
        return {
            table: con.execute(f"SELECT {columns} FROM {table} ORDER BY ALL").fetchall()
            for table, columns in {
                "bulk_requests": "id, status, on_conflict, idempotency_key, total_items, processed_items, "
                "successful_items, failed_items, skipped_items",
                "bulk_request_items": 'bulk_request_id, "index", status, record_id, error',
                "records": "id, data_stream_key, external_id, amount, currency, bulk_request_id",
            }.items()
        }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=_submissions, existing=_existing)
def test_one_submit_of_n_requests_equals_n_submits_one_by_one(requests, existing):
    subs = [submission(rows, on_conflict=on_conflict, idempotency_key=key) for rows, on_conflict, key in requests]
    with tempfile.TemporaryDirectory() as folder:
        snapshots, answers = [], []
        for mode in ("together", "one_by_one", "pending", "queued_together"):
            with Engine.open(Path(folder) / f"{mode}.duckdb") as engine:
                engine.ensure_streams(ENV, [{"key": "bank", "name": "Bank"}, {"key": "card", "name": "Card"}])
                if existing:
                    engine.submit(ENV, [submission([record(external_id=e) for e in existing])])
                if mode == "together":
                    answer = engine.submit(ENV, subs)
                elif mode == "one_by_one":
                    answer = [engine.submit(ENV, [s])[0] for s in subs]
                else:
                    pending = engine.submit(ENV, subs, process=False)
                    if mode == "pending":
                        engine.process_pending(slice_rows=2)
                    else:  # the server's worker, for requests queued while it was busy
                        engine.process_together([s["id"] for s in pending])
                    answer = [engine.get_bulk_request(ENV, s["id"]) for s in pending]
                    answer = [{k: s[k] for k in pending[0]} for s in answer]
                snapshots.append(_snapshot(engine))
                answers.append(answer)
    assert answers[0] == answers[1] == answers[2] == answers[3]
    assert snapshots[0] == snapshots[1]
    # the worker's slices hand out record ids differently; everything else is the same
    ids_free = [{**s, "records": [r[1:] for r in s["records"]],
                 "bulk_request_items": [(*i[:3], i[3] is not None, i[4]) for i in s["bulk_request_items"]]}
                for s in snapshots]
    assert ids_free[0] == ids_free[2] == ids_free[3]
    for summary in answers[0]:
        assert summary["total_items"] == (
            summary["successful_items"] + summary["failed_items"] + summary["skipped_items"]
        )
