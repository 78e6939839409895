"""Mapping source columns onto the record contract, and exact money."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loader.config import MappingConfig, parse_section
from loader.errors import ConfigError
from loader.mapping import check_columns, map_batch
from loader.source import frame_batches


def mapping(**overrides):
    base = {
        "date": {"column": "d"},
        "data_stream_key": {"value": "ops"},
        "amount": {"column": "amt", "unit": "major"},
        "currency": {"column": "ccy", "default": "USD"},
    }
    base.update(overrides)
    return parse_section(MappingConfig, base, "mapping")


def mapped(rows: dict, **overrides) -> pl.DataFrame:
    frame = next(frame_batches(pl.DataFrame(rows)))
    return map_batch(frame, mapping(**overrides))


@pytest.mark.parametrize(
    ("text", "currency", "minor"),
    [
        ("12.34", "USD", 1234),
        ("-12.5", "USD", -1250),
        ("+0.01", "USD", 1),
        (".5", "EUR", 50),
        ("1234", "JPY", 1234),
        ("1200.00", "JPY", 1200),  # trailing zeros are exact: kept, not an error
        ("1.234", "BHD", 1234),
        ("0.001", "BHD", 1),
        ("999999999999999.99", "USD", 99999999999999999),
        ("12.3400", "usd", 1234),
    ],
)
def test_major_units_convert_exactly(text, currency, minor):
    out = mapped({"d": ["2024-01-02"], "amt": [text], "ccy": [currency]})
    assert out["amount"].to_list() == [minor]
    assert out["error_amount"].to_list() == [None]


@pytest.mark.parametrize(
    ("text", "currency", "fragment"),
    [
        ("12.345", "USD", "more decimals than USD allows (2)"),
        ("1.5", "JPY", "more decimals than JPY allows (0)"),
        ("1.2345", "BHD", "more decimals than BHD allows (3)"),
        ("1,234.56", "USD", "is not a decimal number"),
        ("1e5", "USD", "is not a decimal number"),
        ("NaN", "USD", "is not a decimal number"),
        ("$12", "USD", "is not a decimal number"),
        ("1234567890123456", "USD", "out of range"),
    ],
)
def test_bad_amounts_fail_and_are_never_rounded(text, currency, fragment):
    out = mapped({"d": ["2024-01-02"], "amt": [text], "ccy": [currency]})
    assert out["amount"].to_list() == [None]
    assert fragment in out["error_amount"][0]


def test_unknown_currency_fails_on_currency_not_amount():
    out = mapped({"d": ["2024-01-02"], "amt": ["1.00"], "ccy": ["XYZ"]})
    assert out["error_currency"][0] == "'XYZ' is not an ISO 4217 currency"
    assert out["error_amount"][0] is None
    assert out["amount"][0] is None


def test_minor_units_take_integers_as_they_are():
    out = mapped({"d": ["2024-01-02"] * 3, "amt": ["1234", "-7", "1.5"], "ccy": ["JPY", "USD", "USD"]},
                 amount={"column": "amt", "unit": "minor"})
    assert out["amount"].to_list() == [1234, -7, None]
    assert "not a whole number of minor units" in out["error_amount"][2]


def test_native_numeric_amounts():
    out = mapped({"d": ["2024-01-02"] * 3, "amt": [0.1, 12.25, 0.30000000000000004], "ccy": ["USD"] * 3})
    assert out["amount"].to_list() == [10, 1225, None]


@given(
    units=st.integers(min_value=-(10**14), max_value=10**14),
    currency=st.sampled_from(["USD", "JPY", "BHD", "EUR", "KWD", "CLF"]),
)
def test_decimal_text_round_trips_to_minor_units(units, currency):
    from loader.currency import exponent_of

    exp = exponent_of(currency)
    sign = "-" if units < 0 else ""
    digits = str(abs(units)).rjust(exp + 1, "0")
    text = sign + (digits[:-exp] + "." + digits[-exp:] if exp else digits)
    out = mapped({"d": ["2024-01-02"], "amt": [text], "ccy": [currency]})
    assert out["amount"].to_list() == [units]


def test_dates_with_format_and_iso_default():
    out = mapped({"d": ["2024-02-29", "2023-02-29", "2024-03-01T10:00:00Z", "03/01/2024", None],
                  "amt": ["1"] * 5, "ccy": ["USD"] * 5})
    assert out["date"].to_list() == [dt.date(2024, 2, 29), None, dt.date(2024, 3, 1), None, None]
    errors = out["error_date"].to_list()
    assert errors[0] is None and errors[4] is None
    assert "'2023-02-29' is not a date in format YYYY-MM-DD" == errors[1]
    assert "not a date" in errors[3]
    us = mapped({"d": ["02/29/2024", "2024-02-29"], "amt": ["1"] * 2, "ccy": ["USD"] * 2},
                date={"column": "d", "format": "%m/%d/%Y"})
    assert us["date"].to_list() == [dt.date(2024, 2, 29), None]


def test_direction_map_defaults_and_constants():
    out = mapped(
        {"d": ["2024-01-02"] * 3, "amt": ["1"] * 3, "ccy": [None, "", "eur"], "dc": ["DR", "CR", "X"]},
        direction={"column": "dc", "map": {"DR": "debit", "CR": "credit"}},
    )
    assert out["direction"].to_list() == ["debit", "credit", None]
    assert out["error_direction"].to_list()[2] == "'X' is not a key of mapping.direction.map"
    assert out["currency"].to_list() == ["USD", "USD", "EUR"]
    assert out["data_stream_key"].to_list() == ["ops"] * 3


def test_metadata_from_columns_and_from_a_json_column():
    rows = {"d": ["2024-01-02"] * 3, "amt": ["1"] * 3, "ccy": ["USD"] * 3,
            "acct": ["A", "B", None], "raw": ['{"k": [1, 2]}', "[1]", "{bad"]}
    from_columns = mapped(rows, metadata={"columns": ["acct"]})
    assert from_columns["metadata"].to_list() == ['{"acct":"A"}', '{"acct":"B"}', '{"acct":null}']
    from_json = mapped(rows, metadata={"column": "raw"})
    assert from_json["metadata"][0] == '{"k": [1, 2]}'
    assert from_json["error_metadata"].to_list() == [None, "is not a JSON object", "is not valid JSON"]


def test_a_missing_column_is_a_config_error_with_its_key_path():
    with pytest.raises(ConfigError) as info:
        check_columns(mapping(description={"column": "memo"}), ["d", "amt", "ccy"])
    assert info.value.problems[0][0] == "mapping.description.column"
    assert "no column 'memo'" in info.value.problems[0][1]
    assert info.value.exit_code == 2
