"""Stable 128-bit hashes (md5, computed by DuckDB) for keys that outlive a process.

Polars' own hash may change between versions; the cache and the
Idempotency-Keys must not, so they use md5. A hash is kept as two unsigned
64-bit halves, which Arrow, Polars and DuckDB all handle natively.
"""

from __future__ import annotations

import hashlib
import threading

import duckdb
import polars as pl

from .views import registered

_local = threading.local()
_HALVES = (
    "select (h >> 64)::ubigint as hi, (h & 18446744073709551615::uhugeint)::ubigint as lo "
    "from (select md5_number(text) as h from _texts)"
)


def md5_halves(texts: pl.Series, *, names: tuple[str, str] = ("hi", "lo")) -> pl.DataFrame:
    """md5 of each text as two UInt64 columns, in order; null text gives nulls."""
    con = getattr(_local, "con", None)
    if con is None:
        con = _local.con = duckdb.connect()
    with registered(con, "_texts", texts.alias("text").to_frame().to_arrow()):
        halves = con.sql(_HALVES).pl()
    return halves.rename({"hi": names[0], "lo": names[1]})


def short_tag(text: str) -> str:
    """A short, non-reversible stand-in for a long or secret string (a target key)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
