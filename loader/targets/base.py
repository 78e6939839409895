"""The one seam between the pipeline and a target: the `Target` protocol.

The pipeline hands a target a group of chunks and gets back, per chunk, the
bulk request that holds it and the per-row results. It never knows whether the
target is the local engine or the HTTP API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import polars as pl

from ..chunk import Chunk

ITEM_SCHEMA = {"index": pl.Int64, "status": pl.String, "record_id": pl.Int64, "error": pl.String}


@dataclass(frozen=True)
class ChunkResult:
    """What the target says about one chunk."""

    chunk: Chunk
    bulk_request_id: int
    status: str  # completed | failed | cancelled
    items: pl.DataFrame  # ITEM_SCHEMA: one row per processed record; unprocessed rows are absent
    error_message: str | None = None
    preexisting: bool = False  # the Idempotency-Key named a request made before this run


class Target(Protocol):
    """Where records go: `local` (the DuckDB engine) or `api` (EndClose over HTTP)."""

    target_key: str  # identifies the environment, for the dedupe cache; never holds a secret

    def describe(self) -> dict:
        """Type and address for reports; never a key."""
        ...

    def prepare(self) -> None:
        """Check the target can be used (and create the pipeline's streams) before loading."""
        ...

    def send(self, chunks: Sequence[Chunk], *, on_conflict: str) -> list[ChunkResult]:
        """Submit the chunks (idempotently) and wait until each is final."""
        ...

    def close(self) -> None: ...
