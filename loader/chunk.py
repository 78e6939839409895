"""Cut the rows to send into bulk requests of at most 1000 records.

Each chunk's Idempotency-Key is derived from the target environment, the
`on_conflict` mode and the chunk's content: each row's key (data stream and
external_id, or for an id-less row a hash of its whole content), amount and
date, in order. Sending the same rows to the same environment again, after a
crash or a retry, names the same bulk request, which the target then returns
instead of creating a second one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

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


def _values(rows: pl.DataFrame, name: str) -> tuple[pa.Buffer, int]:
    """The value buffer of a fixed-width column without nulls, and its width in bytes."""
    array = rows.get_column(name).rechunk().to_arrow()
    if array.null_count:
        raise ValueError(f"column {name} must not hold nulls")
    width = array.type.bit_width // 8
    return array.buffers()[1][array.offset * width :], width


def idempotency_key(target_key: str, on_conflict: str, content_digests: bytes) -> str:
    digest = hashlib.sha256()
    for part in (_KEY_VERSION.encode(), target_key.encode(), on_conflict.encode(), content_digests):
        digest.update(part)
        digest.update(b"\x1f")
    return digest.hexdigest()[:40]


def plan_chunks(
    rows: pl.DataFrame, *, chunk_size: int, target_key: str, on_conflict: str, first_number: int = 0
) -> tuple[pl.DataFrame, list[Chunk]]:
    """Number `rows` into chunks, each with its Idempotency-Key.

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
    # A chunk's digest input is its slice of fixed-width columns: each row's key (which for an
    # id-less row is its full content), amount and date. No per-row text is built.
    buffers = [_values(rows, name) for name in ("key_hi", "key_lo", "amount", "date")]
    chunks = []
    for start in range(0, rows.height, chunk_size):
        length = min(chunk_size, rows.height - start)
        digest_input = b"".join(
            buffer[start * width : (start + length) * width].to_pybytes() for buffer, width in buffers
        )
        chunks.append(
            Chunk(
                number=first_number + start // chunk_size,
                idempotency_key=idempotency_key(target_key, on_conflict, digest_input),
                rows=numbered.slice(start, length),
            )
        )
    return numbered, chunks
