"""The one seam between the pipeline and a target: the `Target` protocol.

The pipeline hands a target the chunks of a batch and gets back, as two
frames, the bulk request that holds each chunk and the per-row results. It
never knows whether the target is the local engine or the HTTP API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import polars as pl

from ..chunk import Chunk

REQUEST_SCHEMA = {
    "chunk": pl.Int64,  # Chunk.number
    "bulk_request_id": pl.Int64,
    "status": pl.String,  # completed | failed | cancelled
    "error_message": pl.String,
    "preexisting": pl.Boolean,  # the Idempotency-Key named a request made before this run
}
ITEM_SCHEMA = {
    "chunk": pl.Int64,
    "index": pl.Int64,  # position in the chunk's records
    "status": pl.String,  # successful | failed | skipped; unprocessed rows have no item
    "record_id": pl.Int64,
    "error": pl.String,
}


@dataclass(frozen=True)
class SendResult:
    """What the target says about a group of chunks: REQUEST_SCHEMA and ITEM_SCHEMA frames."""

    requests: pl.DataFrame
    items: pl.DataFrame


class Target(Protocol):
    """Where records go: `local` (the DuckDB engine) or `api` (EndClose over HTTP)."""

    target_key: str  # identifies the environment, for the dedupe cache; never holds a secret

    def describe(self) -> dict:
        """Type and address for reports; never a key."""
        ...

    def prepare(self) -> None:
        """Check the target can be used (and create the pipeline's streams) before loading."""
        ...

    def send(self, chunks: Sequence[Chunk], *, on_conflict: str) -> SendResult:
        """Submit the chunks (idempotently) and wait until each is final."""
        ...

    def close(self) -> None: ...
