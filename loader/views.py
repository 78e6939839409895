"""Values into DuckDB's SQL text: Arrow data as a named view for the length of a `with` block,
and text as a quoted literal (where DuckDB takes no parameter, as in ATTACH or SET)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import duckdb


@contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, data: Any) -> Iterator[None]:
    """Register `data` (Arrow, Polars or a record batch reader) as `name` inside the block.

    When the block fails inside a transaction, the transaction is aborted and unregistering fails
    too ("Current transaction is aborted"); the block's own error is the one raised, since it says
    what went wrong (a DuckDB out-of-memory error, say).
    """
    con.register(name, data)
    try:
        yield
    except BaseException:
        with suppress(duckdb.Error):
            con.unregister(name)
        raise
    con.unregister(name)


def sql_text(text: str) -> str:
    """`text` as the inside of a single-quoted SQL string literal."""
    return text.replace("'", "''")
