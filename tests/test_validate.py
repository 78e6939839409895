"""The pandera record schema, and how its failures become reasons."""

from __future__ import annotations

import datetime as dt

import polars as pl

from loader.config import MappingConfig, parse_section
from loader.mapping import map_batch
from loader.source import frame_batches
from loader.validate import Rules, split_valid

MAPPING = {
    "date": {"column": "d"},
    "data_stream_key": {"column": "s"},
    "amount": {"column": "amt", "unit": "minor"},
    "currency": {"column": "ccy"},
    "direction": {"column": "dir"},
    "external_id": {"column": "id"},
}


def split(rows: dict, rules: Rules = Rules(), **overrides):
    mapping = parse_section(MappingConfig, {**MAPPING, **overrides}, "mapping")
    return split_valid(map_batch(next(frame_batches(pl.DataFrame(rows))), mapping), rules)


def rows(n: int, **columns) -> dict:
    base = {"d": ["2024-01-02"] * n, "s": ["ops"] * n, "amt": ["100"] * n, "ccy": ["USD"] * n,
            "dir": ["debit"] * n, "id": [f"id{i}" for i in range(n)]}
    base.update(columns)
    return base


def test_value_checks_really_run_on_the_data():
    valid, invalid = split(rows(3, dir=["debit", "sideways", None]))
    assert valid["external_id"].to_list() == ["id0", "id2"]
    assert invalid["reason"].to_list() == ["direction: 'sideways' must be credit or debit"]


def test_every_failing_field_of_a_row_is_named_in_contract_order():
    valid, invalid = split(rows(2, d=["2024-01-02", "nope"], s=["ops", None], amt=["1", "1.5"], dir=["debit", "up"]))
    assert valid.height == 1
    reason = invalid["reason"][0]
    assert reason.startswith("date: 'nope' is not a date")
    assert "data_stream_key: is required" in reason
    assert "amount: '1.5' is not a whole number of minor units" in reason
    assert reason.index("date:") < reason.index("data_stream_key:") < reason.index("amount:") < reason.index("direction:")
    assert "amount: is required" not in reason  # the conversion error stands for the null


def test_pipeline_rules_on_top_of_the_contract():
    rules = Rules(max_abs_amount=500, min_date=dt.date(2024, 1, 1), max_date=dt.date(2024, 12, 31),
                  required=("external_id",))
    valid, invalid = split(
        rows(4, amt=["500", "-501", "1", "1"], d=["2024-01-02", "2024-01-02", "2023-12-31", "2024-06-01"],
             id=["a", "b", "c", None]),
        rules,
    )
    assert valid["external_id"].to_list() == ["a"]
    reasons = invalid["reason"].to_list()
    assert "amount: '-501' absolute value above validation.max_abs_amount (500)" in reasons[0]
    assert "date: '2023-12-31' before validation.date_range.min (2024-01-01)" in reasons[1]
    assert reasons[2] == "external_id: is required"


def test_invalid_rows_keep_their_source_position_and_mapped_fields():
    valid, invalid = split(rows(3, ccy=["USD", "JPYY", "JPY"]))
    assert invalid.select("source_row", "external_id").rows() == [(1, "id1")]
    assert valid.height + invalid.height == 3
    assert not any(c.startswith("error_") for c in valid.columns + invalid.columns)
