"""Bulk request bodies as bytes, built on whole frames; and `--payloads DIR`.

`encode_body` is the one place a chunk becomes the JSON the API receives: the
HTTP target sends exactly these bytes, and `--payloads` writes exactly these
bytes. Optional fields that are null are left out of a record; `metadata` is
embedded as the JSON object text it already is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from .chunk import Chunk

_OPTIONAL = ("direction", "description", "external_id")


def _member(column: str, value: pl.Expr) -> pl.Expr:
    """`"column":<json of value>`, or null when the value is null."""
    encoded = pl.struct(value.alias(column)).struct.json_encode()
    member = encoded.str.strip_prefix("{").str.strip_suffix("}")
    return pl.when(value.is_null()).then(None).otherwise(member)


def record_json(rows: pl.DataFrame) -> pl.Series:
    """One JSON object per row, in the API's record shape."""
    members = [
        _member("date", pl.col("date").dt.strftime("%Y-%m-%d")),
        _member("data_stream_key", pl.col("data_stream_key")),
        _member("amount", pl.col("amount").cast(pl.Int64)),
        _member("currency", pl.col("currency")),
        *[_member(name, pl.col(name)) for name in _OPTIONAL],
        pl.lit('"metadata":') + pl.col("metadata").fill_null("{}"),
    ]
    return rows.select(
        (pl.lit("{") + pl.concat_str(members, separator=",", ignore_nulls=True) + pl.lit("}")).alias("record")
    ).to_series()


def encode_body(rows: pl.DataFrame, *, on_conflict: str) -> bytes:
    """The bytes of one `POST /records/bulk` body."""
    records = ",".join(record_json(rows).to_list())
    return ('{"records":[' + records + '],"on_conflict":' + json.dumps(on_conflict) + "}").encode()


class PayloadWriter:
    """Writes each bulk request body to `DIR/<n>.json`, its key to `DIR/<n>.idempotency-key`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def write(self, chunks: Sequence[Chunk], *, on_conflict: str) -> None:
        for chunk in chunks:
            stem = self.directory / f"{chunk.number + 1:06d}"
            stem.with_suffix(".json").write_bytes(encode_body(chunk.rows, on_conflict=on_conflict))
            stem.with_suffix(".idempotency-key").write_text(chunk.idempotency_key + "\n")
