"""The `local` target: the bulk API's semantics in a DuckDB file (loader.engine).

All chunks of a group are submitted in one engine call, applied set-based in
one transaction: many bulk requests per statement, as the real API would
process them one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from ..chunk import Chunk
from ..engine import BulkSubmission, Engine
from ..errors import RetryableTargetError
from .base import ITEM_SCHEMA, REQUEST_SCHEMA, SendResult

RECORD_FIELDS = ("date", "data_stream_key", "amount", "currency", "direction", "description", "external_id", "metadata")


def records_table(rows: pl.DataFrame):
    """The engine's normalized record table for a chunk's rows."""
    return rows.select(
        pl.col("date").dt.strftime("%Y-%m-%d").alias("date"),
        pl.col("data_stream_key"),
        pl.col("amount").cast(pl.Int64),
        pl.col("currency"),
        pl.col("direction"),
        pl.col("description"),
        pl.col("external_id"),
        pl.col("metadata"),
        pl.lit(None, dtype=pl.String).alias("input_error"),
    ).to_arrow(compat_level=pl.CompatLevel.newest())  # string views: no copy; DuckDB reads them


class LocalTarget:
    """Loads into the local engine's database file."""

    def __init__(self, database: Path, environment: str = "default", streams: Sequence[dict] = (),
                 *, fail_jobs_after: int | None = None, lose_answers: bool = False):
        self.database = Path(database)
        self.environment = environment
        self.streams = list(streams)
        self.target_key = f"local:{self.database}#{environment}"
        # Fault injection, as `loader serve --fail-rate` has: each new job fails after N rows.
        self.fail_jobs_after = fail_jobs_after
        # Fault injection, as `loader serve --drop-rate 1`: the engine commits, the answer is lost.
        self.lose_answers = lose_answers
        self._engine: Engine | None = None

    def describe(self) -> dict:
        return {"type": "local", "database": str(self.database), "environment": self.environment}

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self.database.parent.mkdir(parents=True, exist_ok=True)
            self._engine = Engine.open(self.database)
        return self._engine

    def prepare(self) -> None:
        self.engine.ensure_environment(self.environment)
        if self.streams:
            self.engine.ensure_streams(self.environment, self.streams)

    def send(self, chunks: Sequence[Chunk], *, on_conflict: str) -> SendResult:
        if not chunks:
            return SendResult(pl.DataFrame(schema=REQUEST_SCHEMA), pl.DataFrame(schema=ITEM_SCHEMA))
        # The chunks are consecutive slices of one batch: convert once, then slice (zero-copy).
        table = records_table(pl.concat([chunk.rows for chunk in chunks], rechunk=False))
        offsets = [0]
        for chunk in chunks:
            offsets.append(offsets[-1] + len(chunk))
        submissions = [
            BulkSubmission(
                records=table.slice(offsets[i], len(chunk)),
                on_conflict=on_conflict,
                idempotency_key=chunk.idempotency_key,
                source="loader",
            )
            for i, chunk in enumerate(chunks)
        ]
        keys = [chunk.idempotency_key for chunk in chunks]
        preexisting = set(self.engine.existing_idempotency_keys(self.environment, keys))
        if self.fail_jobs_after is None:
            summaries = self.engine.submit(self.environment, submissions, process=True)
        else:
            pending = self.engine.submit(self.environment, submissions, process=False)
            self.engine.process_pending([int(s["id"]) for s in pending], fail_after=self.fail_jobs_after)
            summaries = [self.engine.get_bulk_request(self.environment, int(s["id"]), limit=1) for s in pending]
        if self.lose_answers:
            raise RetryableTargetError("the local engine's answer was lost after it committed (injected fault)")
        requests = pl.DataFrame(
            {
                "chunk": [chunk.number for chunk in chunks],
                "bulk_request_id": [int(s["id"]) for s in summaries],
                "status": [s["status"] for s in summaries],
                "error_message": [s.get("error_message") for s in summaries],
                "preexisting": [key in preexisting for key in keys],
            },
            schema=REQUEST_SCHEMA,
        )
        items = (
            self.engine.bulk_request_items(self.environment, requests["bulk_request_id"].to_list())
            .join(requests.select("bulk_request_id", "chunk"), on="bulk_request_id")
            .select(list(ITEM_SCHEMA))
            .cast(ITEM_SCHEMA)
        )
        return SendResult(requests=requests, items=items)

    def held_ids(self, streams: Sequence[str]) -> pl.DataFrame:
        """The records of these streams that have an external_id: data_stream_key, external_id,
        bulk_request_id, record_id. Reads the database without creating it."""
        if self._engine is None and not self.database.exists():
            return pl.DataFrame(schema={"data_stream_key": pl.String, "external_id": pl.String,
                                        "bulk_request_id": pl.Int64, "record_id": pl.Int64})
        return self.engine.external_ids(self.environment, list(streams))

    def records_for(self, streams: Sequence[str], date_min, date_max) -> pl.DataFrame:
        """The records of these streams dated within [date_min, date_max] (TARGET_RECORD_SCHEMA of
        loader.reconcile), in one read; oldest first. Reads the database without creating it."""
        from ..reconcile import TARGET_RECORD_SCHEMA

        if self._engine is None and not self.database.exists():
            return pl.DataFrame(schema=TARGET_RECORD_SCHEMA)
        frame = self.engine.records_frame(self.environment, list(streams), date_min, date_max)
        return frame.select(list(TARGET_RECORD_SCHEMA)).cast(TARGET_RECORD_SCHEMA)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
