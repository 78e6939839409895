"""Cut the rows to send into bulk requests of at most 1000 records.

Each chunk's Idempotency-Key is derived from the target environment, the
`on_conflict` mode and the chunk's content (the content hash of each of its
rows, in order): sending the same rows to the same environment again, after a
crash or a retry, names the same bulk request, which the target then returns
instead of creating a second one.
"""

from __future__ import annotations

import hashlib
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


def idempotency_key(target_key: str, on_conflict: str, content_digests: str) -> str:
    digest = hashlib.sha256()
    for part in (_KEY_VERSION, target_key, on_conflict, content_digests):
        digest.update(part.encode())
        digest.update(b"\x1f")
    return digest.hexdigest()[:40]


def plan_chunks(
    rows: pl.DataFrame, *, chunk_size: int, target_key: str, on_conflict: str, first_number: int = 0
) -> tuple[pl.DataFrame, list[Chunk]]:
    """Number `rows` (which carry content_hi/content_lo) into chunks.

    Returns the rows with `chunk` (its number) and `index` (its position in the
    chunk's records) columns, and the chunks, in send order. Each chunk's rows
    are a zero-copy slice.
    """
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_SIZE}, not {chunk_size}")
    position = pl.int_range(pl.len(), dtype=pl.Int64)
    numbered = rows.with_columns(
        (position // chunk_size + first_number).alias("chunk"), (position % chunk_size).alias("index")
    )
    if rows.height == 0:
        return numbered, []
    digests = numbered.group_by("chunk", maintain_order=True).agg(
        pl.format("{}.{}", "content_hi", "content_lo").str.join(",")
    )
    chunks = [
        Chunk(
            number=number,
            idempotency_key=idempotency_key(target_key, on_conflict, joined),
            rows=numbered.slice((number - first_number) * chunk_size, chunk_size),
        )
        for number, joined in digests.iter_rows()
    ]
    return numbered, chunks
