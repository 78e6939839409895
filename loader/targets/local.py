"""The `local` target: the bulk API's semantics in a DuckDB file (loader.engine).

All chunks of a group are submitted in one engine call, applied set-based in
one transaction: many bulk requests per statement, as the real API would
process them one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import polars as pl

from ..chunk import Chunk
from ..engine import BulkSubmission, Engine
from .base import ITEM_SCHEMA, ChunkResult

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
    ).to_arrow()


class LocalTarget:
    """Loads into the local engine's database file."""

    def __init__(self, database: Path, environment: str = "default", streams: Sequence[dict] = (),
                 *, started_at: datetime | None = None, fail_jobs_after: int | None = None):
        self.database = Path(database)
        self.environment = environment
        self.streams = list(streams)
        self.target_key = f"local:{self.database}#{environment}"
        self.started_at = started_at
        # Fault injection, as `loader serve --fail-rate` has: each new job fails after N rows.
        self.fail_jobs_after = fail_jobs_after
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

    def send(self, chunks: Sequence[Chunk], *, on_conflict: str) -> list[ChunkResult]:
        if not chunks:
            return []
        submissions = [
            BulkSubmission(
                records=records_table(chunk.rows),
                on_conflict=on_conflict,
                idempotency_key=chunk.idempotency_key,
                source="loader",
            )
            for chunk in chunks
        ]
        if self.fail_jobs_after is None:
            summaries = self.engine.submit(self.environment, submissions, process=True)
        else:
            pending = self.engine.submit(self.environment, submissions, process=False)
            self.engine.process_pending([int(s["id"]) for s in pending], fail_after=self.fail_jobs_after)
            summaries = [self.engine.get_bulk_request(self.environment, int(s["id"]), limit=1) for s in pending]
        ids = [int(s["id"]) for s in summaries]
        items = self.engine.bulk_request_items(self.environment, ids)
        by_request = {key[0]: frame for key, frame in items.partition_by("bulk_request_id", as_dict=True).items()}
        results = []
        for chunk, summary in zip(chunks, summaries):
            request_id = int(summary["id"])
            frame = by_request.get(request_id)
            frame = (
                frame.select(list(ITEM_SCHEMA)).cast(ITEM_SCHEMA)
                if frame is not None
                else pl.DataFrame(schema=ITEM_SCHEMA)
            )
            created_at = summary.get("created_at")
            results.append(
                ChunkResult(
                    chunk=chunk,
                    bulk_request_id=request_id,
                    status=summary["status"],
                    items=frame,
                    error_message=summary.get("error_message"),
                    preexisting=bool(
                        self.started_at is not None and created_at is not None and _before(created_at, self.started_at)
                    ),
                )
            )
        return results

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def _before(created_at: object, started_at: datetime) -> bool:
    if isinstance(created_at, str):
        created_at = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    if isinstance(created_at, datetime):
        if created_at.tzinfo is None:
            return created_at < started_at.replace(tzinfo=None)
        return created_at < started_at
    return False
