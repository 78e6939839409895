"""Keys, within-source duplicates across batches, and chunk Idempotency-Keys."""

from __future__ import annotations

import datetime as dt

import polars as pl

from loader.chunk import plan_chunks
from loader.dedupe import KEY, SourceDeduper, _key_in


def valid_rows(ids: list[str | None], *, file: str = "a.csv", start: int = 0, amount: int = 100) -> pl.DataFrame:
    n = len(ids)
    return pl.DataFrame(
        {
            "source_file": [file] * n,
            "source_row": list(range(start, start + n)),
            "date": [dt.date(2024, 1, 2)] * n,
            "data_stream_key": ["ops"] * n,
            "currency": ["USD"] * n,
            "direction": [None] * n,
            "description": ["x"] * n,
            "external_id": ids,
            "metadata": ["{}"] * n,
            "amount": [amount] * n,
        },
        schema_overrides={"direction": pl.String, "external_id": pl.String},
    )


def test_duplicates_within_and_across_batches_name_the_first_row(tmp_path):
    deduper = SourceDeduper("local:x#default", scratch_dir=tmp_path)
    first = deduper.split(valid_rows(["A", "B", "A"]))
    assert first.unique["external_id"].to_list() == ["A", "B"]
    assert first.duplicates["reason"].to_list() == ["same data_stream_key and external_id as a.csv row 0"]
    second = deduper.split(valid_rows(["B", "C"], file="b.csv"))
    assert second.unique["external_id"].to_list() == ["C"]
    assert second.duplicates["reason"].to_list() == ["same data_stream_key and external_id as a.csv row 1"]
    deduper.close()


def test_identical_idless_rows_are_distinct_and_numbered_across_batches(tmp_path):
    deduper = SourceDeduper("local:x#default", scratch_dir=tmp_path)
    a = deduper.split(valid_rows([None, None]))
    b = deduper.split(valid_rows([None], start=2))
    deduper.close()
    keys = pl.concat([a.unique.select(KEY), b.unique.select(KEY)])
    assert a.duplicates.height == 0 and b.duplicates.height == 0
    assert keys.unique().height == 3
    # the same source in a new run gets the same keys, in the same order
    again = SourceDeduper("local:x#default", scratch_dir=tmp_path)
    keys_again = pl.concat([again.split(valid_rows([None, None])).unique.select(KEY),
                            again.split(valid_rows([None], start=2)).unique.select(KEY)])
    again.close()
    assert keys_again.equals(keys)


def test_keys_depend_on_the_target_environment(tmp_path):
    rows = valid_rows(["A", None])
    prod = SourceDeduper("api:https://x#prod", scratch_dir=tmp_path).split(rows).unique.select(KEY)
    sandbox = SourceDeduper("api:https://x#sandbox", scratch_dir=tmp_path).split(rows).unique.select(KEY)
    assert prod.join(sandbox, on=KEY, how="inner").height == 0


def test_idempotency_keys_follow_content_environment_and_on_conflict(tmp_path):
    def keys(rows, target="local:x#default", on_conflict="skip", size=2):
        unique = SourceDeduper(target, scratch_dir=tmp_path).split(rows).unique
        planned, chunks = plan_chunks(unique, chunk_size=size, target_key=target, on_conflict=on_conflict)
        assert planned["index"].to_list() == [i % size for i in range(unique.height)]
        return [c.idempotency_key for c in chunks]

    base = keys(valid_rows(["A", "B", "C"]))
    assert len(base) == 2 and len(set(base)) == 2
    assert keys(valid_rows(["A", "B", "C"])) == base
    assert keys(valid_rows(["A", "B", "C"], amount=101)) != base
    assert keys(valid_rows(["A", "B", "C"]), on_conflict="error") != base
    assert keys(valid_rows(["A", "B", "C"]), target="local:y#default") != base


def test_scratch_tables_moved_to_a_file_keep_every_key_seen(tmp_path, monkeypatch):
    monkeypatch.setattr("loader.dedupe.MOVE_TO_FILE_ROWS", 3)
    deduper = SourceDeduper("local:x#default", scratch_dir=tmp_path)
    first = deduper.split(valid_rows(["A", "B", None]))
    assert not deduper.in_file  # 2 ids and 1 content count held
    second = deduper.split(valid_rows(["C", "A", None], file="b.csv"))
    assert deduper.in_file
    [folder] = tmp_path.glob("loader-run-*")
    assert (folder / "scratch.duckdb").is_file()
    third = deduper.split(valid_rows(["B", "C", "D", None], file="c.csv"))
    deduper.close()
    assert not folder.exists()
    assert second.duplicates["reason"].to_list() == ["same data_stream_key and external_id as a.csv row 0"]
    assert third.unique["external_id"].to_list() == ["D", None]
    assert third.duplicates["reason"].to_list() == [
        "same data_stream_key and external_id as a.csv row 1",
        "same data_stream_key and external_id as b.csv row 0",
    ]
    # The id-less rows are the first, second and third of their kind, as without the move.
    idless = [part.unique.filter(pl.col("external_id").is_null()).select(KEY) for part in (first, second, third)]
    (tmp_path / "other").mkdir()
    memory_only = SourceDeduper("local:x#default", scratch_dir=tmp_path / "other")
    expected = [memory_only.split(valid_rows([None], start=n)).unique.select(KEY) for n in range(3)]
    memory_only.close()
    assert pl.concat(idless).equals(pl.concat(expected))


def test_a_key_is_found_by_both_halves_not_by_its_upper_half_alone():
    frame = pl.DataFrame({"key_hi": [1, 1, 2, 3], "key_lo": [10, 11, 20, 30]}, schema={k: pl.UInt64 for k in KEY})
    keys = pl.DataFrame({"key_hi": [1, 3], "key_lo": [10, 31]}, schema={k: pl.UInt64 for k in KEY})
    assert _key_in(frame, keys).to_list() == [True, False, False, False]
