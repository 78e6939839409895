"""`loader cache sync`: fill the local cache with the ids the target already holds.

After records were loaded by other means (another machine, a script, the
EndClose UI), a first run would send them again and the target would skip or
refuse them. Syncing first records their keys in `loaded_ids`, computed
exactly as dedupe computes them, so that run reports them `already_loaded`
and sends nothing for them. Only records with an `external_id` are synced: an
id-less row is known by its place among identical rows of a source, which the
target cannot tell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from .cache import CONFIRMED_COLUMNS, Cache
from .dedupe import KEY, id_key_text
from .hashing import md5_halves
from .statedb import open_state

HELD_SCHEMA = {"data_stream_key": pl.String, "external_id": pl.String, "bulk_request_id": pl.Int64,
               "record_id": pl.Int64}


def pipeline_streams(pipeline: Any) -> list[str]:
    """The data streams a pipeline loads: the mapping's constant, `target.streams`, and, when the
    stream comes from a column, the values that column maps to in the source."""
    from .mapping import check_columns, map_batch
    from .source import Source, SourceSpec

    spec = pipeline.mapping.data_stream_key
    streams = {stream.key for stream in pipeline.target.streams or []}
    if spec.value is not None:
        streams.add(spec.value)
    if spec.column is not None:
        # Mapped as a run maps it (defaults, transform.sql included); only the stream key is kept.
        with Source(SourceSpec.from_pipeline(pipeline)) as source:
            check_columns(pipeline.mapping, source.columns)
            for batch in source.batches():
                keys = map_batch(batch, pipeline.mapping).get_column("data_stream_key").drop_nulls().unique()
                streams.update(keys.to_list())
    return sorted(streams)


def sync_cache(pipeline: Any) -> dict:
    """Add the target's ids for the pipeline's streams to the cache; returns {added, seen}.

    `seen`: records with an external_id the target holds in those streams;
    `added`: those the cache did not know yet.
    """
    from .run import make_target

    streams = pipeline_streams(pipeline)
    target = make_target(pipeline)
    try:
        held = target.held_ids(streams).cast(HELD_SCHEMA)  # type: ignore[attr-defined]
    finally:
        target.close()
    keys = md5_halves(held.select(id_key_text(target.target_key)).to_series(), names=tuple(KEY))
    confirmed = pl.concat([keys, held.select("bulk_request_id", "record_id")], how="horizontal")
    state = open_state(Path(pipeline.dedupe.cache))
    try:
        cache = Cache(state)
        is_known, _ = cache.loaded_mask(confirmed)
        new = confirmed.filter(~is_known).unique(KEY, keep="first", maintain_order=True)
        if new.height:
            target_id = cache.target_id(target.target_key)
            state.execute("begin")
            cache.record_confirmed(target_id, new.select(CONFIRMED_COLUMNS).to_arrow())
            state.execute("commit")
    finally:
        state.close()
    return {"added": new.height, "seen": held.height}
