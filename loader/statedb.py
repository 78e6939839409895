"""Open the local state file (cache, run history) that sits next to a pipeline.

The file is a DuckDB database; DuckDB's own file lock keeps a second writer
out, and its error is turned into a `LockedError` that says what to do.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from .errors import LockedError, SourceError

MEMORY_LIMIT = "64MB"


def open_state(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open (creating when missing, unless read-only) the state database at `path`."""
    path = Path(path)
    if read_only and not path.exists():
        raise SourceError(f"{path} does not exist: no run has used this cache yet")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Bounded: DuckDB would otherwise keep every block it read (a 50M-id cache is 0.9 GB) cached
        # up to 80% of RAM; the file's blocks stay in the OS page cache anyway.
        return duckdb.connect(str(path), read_only=read_only, config={"memory_limit": MEMORY_LIMIT})
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise LockedError(
                f"{path} is in use by another loader process; wait for that run to finish "
                "(or give this pipeline its own dedupe.cache) and run again"
            ) from None
        raise SourceError(f"cannot open {path}: {exc}") from None
