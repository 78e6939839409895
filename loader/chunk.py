"""Cut the rows to send into bulk requests of at most 1000 records.

Each chunk's Idempotency-Key is derived from the target environment, the
`on_conflict` mode and the chunk's content (the `row_hash` of each of its rows,
in order): sending the same rows to the same environment again, after a crash
or a retry, names the same bulk request, which the target then returns instead
of creating a second one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import polars as pl

MAX_CHUNK_SIZE = 1000
_KEY_VERSION = "loader-idempotency-v1"


@dataclass(frozen=True)
class Chunk:
    """One bulk request to be: its rows in `records` order (row i has index i)."""

    number: int  # position in the run's send order, from 0
    idempotency_key: str
    rows: pl.DataFrame

    def __len__(self) -> int:
        return self.rows.height


def idempotency_key(target_key: str, on_conflict: str, row_hashes: str) -> str:
    digest = hashlib.sha256()
    for part in (_KEY_VERSION, target_key, on_conflict, row_hashes):
        digest.update(part.encode())
        digest.update(b"\x1f")
    return digest.hexdigest()[:40]


def make_chunks(
    rows: pl.DataFrame, *, chunk_size: int, target_key: str, on_conflict: str, first_number: int = 0
) -> Iterator[Chunk]:
    """Split `rows` (which carry `row_hash`) into chunks, in order."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_SIZE}, not {chunk_size}")
    if rows.height == 0:
        return
    numbered = rows.with_columns((pl.int_range(pl.len(), dtype=pl.Int64) // chunk_size).alias("_chunk"))
    digests = numbered.group_by("_chunk", maintain_order=True).agg(pl.col("row_hash").str.join(""))
    for chunk_index, joined in digests.iter_rows():
        start = chunk_index * chunk_size
        yield Chunk(
            number=first_number + chunk_index,
            idempotency_key=idempotency_key(target_key, on_conflict, joined),
            rows=rows.slice(start, chunk_size),
        )
