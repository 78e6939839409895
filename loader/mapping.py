"""Source columns -> the record contract, on whole frames; money converted exactly.

`map_batch` returns one row per source row with the record fields typed
(`date` a Date, `amount` integer minor units, ...) and, per field, an
`error_<field>` column holding what went wrong converting it (null when
nothing did). A value that cannot be converted is never guessed at: the field
is left null and the row fails validation with that error as its reason.

Amounts in major units are parsed as decimal text: `"-1234.5"` in USD is
-123450 minor units. More significant decimals than the currency has is an
error, never a rounding; trailing zeros (`"1200.00"` JPY) are exact and kept.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import duckdb
import polars as pl

from .currency import MAX_EXPONENT, exponent_table
from .errors import ConfigError
from .source import SOURCE_FILE, SOURCE_ROW

RECORD_FIELDS = (
    "date",
    "data_stream_key",
    "amount",
    "currency",
    "direction",
    "description",
    "external_id",
    "metadata",
)
DEFAULT_CURRENCY = "USD"  # the API's default when a record has no currency
MAX_INTEGER_DIGITS = 15  # keeps every amount well inside int64 minor units
_DECIMAL = r"^[+-]?(\d+\.?\d*|\.\d+)$"
_SHOWN_CHARS = 40  # how much of a bad value a reason quotes


def check_columns(mapping: Any, columns: Sequence[str]) -> None:
    """Fail before loading when the mapping names a column the source lacks."""
    available = set(columns)
    problems = []
    for name in RECORD_FIELDS:
        spec = getattr(mapping, name, None)
        if spec is None:
            continue
        wanted = []
        if getattr(spec, "column", None) is not None:
            wanted.append(("column", spec.column))
        for i, col in enumerate(getattr(spec, "columns", None) or []):
            wanted.append((f"columns.{i}", col))
        for key, col in wanted:
            if col not in available:
                shown = ", ".join(sorted(available - {SOURCE_FILE, SOURCE_ROW}))
                problems.append((f"mapping.{name}.{key}", f"no column {col!r} in the source (columns: {shown})"))
    if problems:
        raise ConfigError(problems)


def map_batch(frame: pl.DataFrame, mapping: Any) -> pl.DataFrame:
    """Map one batch of source rows onto the record contract (see module docstring)."""
    schema = frame.schema
    stage1 = frame.select(
        pl.col(SOURCE_FILE),
        pl.col(SOURCE_ROW),
        *_date(mapping.date, schema),
        _text_field(mapping.data_stream_key, schema).alias("data_stream_key"),
        _text_field(getattr(mapping, "currency", None), schema, fallback=DEFAULT_CURRENCY)
        .str.to_uppercase()
        .alias("currency"),
        _amount_text(mapping.amount, schema).alias("_amount_text"),
        *_direction(getattr(mapping, "direction", None), schema),
        _text_field(getattr(mapping, "description", None), schema).alias("description"),
        _text_field(getattr(mapping, "external_id", None), schema).alias("external_id"),
        _metadata(getattr(mapping, "metadata", None), schema).alias("metadata"),
    )
    unit = getattr(mapping.amount, "unit", "major")
    mapped = _convert_amount(stage1, minor_units=(unit == "minor"))
    return _check_metadata_json(mapped, getattr(mapping, "metadata", None))


# -- fields -------------------------------------------------------------------


def _raw(spec: Any, schema: Mapping[str, pl.DataType]) -> tuple[pl.Expr, pl.DataType]:
    if getattr(spec, "column", None) is not None:
        return pl.col(spec.column), schema[spec.column]
    value = getattr(spec, "value", None)
    if value is None:
        return pl.lit(None, dtype=pl.String), pl.String
    if isinstance(value, dt.date):
        return pl.lit(value, dtype=pl.Date), pl.Date
    return pl.lit(_constant_text(value), dtype=pl.String), pl.String


def _constant_text(value: Any) -> str:
    """A constant from the config as text; Decimals in plain notation (never 1E+2)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def _text(expr: pl.Expr) -> pl.Expr:
    """Trimmed text, with empty strings as null."""
    text = expr.cast(pl.String).str.strip_chars()
    return pl.when(text.str.len_bytes() == 0).then(None).otherwise(text)


def _text_field(spec: Any, schema: Mapping[str, pl.DataType], *, fallback: str | None = None) -> pl.Expr:
    if spec is None:
        return pl.lit(fallback, dtype=pl.String)
    expr, _ = _raw(spec, schema)
    text = _text(expr)
    default = getattr(spec, "default", None)
    if default is not None:
        text = text.fill_null(pl.lit(_constant_text(default)))
    if fallback is not None:
        text = text.fill_null(pl.lit(fallback))
    return text


def _shown(text: pl.Expr) -> pl.Expr:
    """A bad value quoted in a reason, cut short so a 10 MB field stays readable."""
    return pl.when(text.str.len_chars() > _SHOWN_CHARS).then(
        text.str.slice(0, _SHOWN_CHARS) + pl.lit("...")
    ).otherwise(text)


def _date(spec: Any, schema: Mapping[str, pl.DataType]) -> list[pl.Expr]:
    expr, dtype = _raw(spec, schema)
    default = getattr(spec, "default", None)
    if default is not None and dtype == pl.Date:
        expr = expr.fill_null(pl.lit(default, dtype=pl.Date))
    if dtype == pl.Date:
        return [expr.alias("date"), pl.lit(None, dtype=pl.String).alias("error_date")]
    if isinstance(dtype, pl.Datetime):
        return [expr.dt.date().alias("date"), pl.lit(None, dtype=pl.String).alias("error_date")]
    text = _text(expr)
    fmt = getattr(spec, "format", None)
    if fmt:
        parsed = text.str.strptime(pl.Date, fmt, strict=False, exact=True)
        expected = fmt
    else:
        # ISO 8601: a date, or the date part of a timestamp.
        date_part = pl.when(text.str.slice(10, 1).is_in(["T", " "])).then(text.str.slice(0, 10)).otherwise(text)
        parsed = date_part.str.strptime(pl.Date, "%Y-%m-%d", strict=False, exact=True)
        expected = "YYYY-MM-DD"
    error = (
        pl.when(text.is_not_null() & parsed.is_null())
        .then(pl.format("'{}' is not a date in format {}", _shown(text), pl.lit(expected)))
        .otherwise(None)
    )
    default = getattr(spec, "default", None)
    if default is not None:
        parsed = pl.when(text.is_null()).then(pl.lit(default, dtype=pl.Date)).otherwise(parsed)
    return [parsed.alias("date"), error.alias("error_date")]


def _amount_text(spec: Any, schema: Mapping[str, pl.DataType]) -> pl.Expr:
    expr, dtype = _raw(spec, schema)
    if dtype.is_float():
        # Shortest round-trip text of the float: 0.1 stays "0.1", 0.30000000000000004 fails.
        expr = expr.cast(pl.String)
    text = _text(expr)
    default = getattr(spec, "default", None)
    if default is not None:
        text = text.fill_null(pl.lit(_constant_text(default)))
    return text


def _convert_amount(frame: pl.DataFrame, *, minor_units: bool) -> pl.DataFrame:
    """Decimal text -> integer minor units, with the currency's exponent, no floats."""
    rates = exponent_table()
    if minor_units:
        rates = rates.with_columns(
            pl.lit(0, dtype=pl.Int64).alias("exponent"),
            pl.lit(1, dtype=pl.Int64).alias("scale"),
            pl.lit(10**MAX_EXPONENT, dtype=pl.Int64).alias("frac_divisor"),
        )
    text = pl.col("_amount_text")
    well_formed = text.str.contains(_DECIMAL)
    integer_digits = text.str.extract(r"^[+-]?(\d*)", 1).str.strip_chars_start("0")
    fraction = text.str.extract(r"\.(\d*)$", 1).fill_null("").str.strip_chars_end("0")
    too_long = integer_digits.str.len_chars() > MAX_INTEGER_DIGITS
    too_precise = fraction.str.len_chars() > pl.col("exponent")
    integer_value = pl.when(integer_digits.str.len_chars() == 0).then(0).otherwise(
        integer_digits.cast(pl.Int64, strict=False)
    )
    fraction_value = (fraction + pl.lit("0" * MAX_EXPONENT)).str.slice(0, MAX_EXPONENT).cast(
        pl.Int64, strict=False
    ) // pl.col("frac_divisor")
    magnitude = integer_value * pl.col("scale") + fraction_value
    signed = pl.when(text.str.starts_with("-")).then(-magnitude).otherwise(magnitude)
    unit_name = "minor units" if minor_units else "major units"
    error = (
        pl.when(text.is_null() | pl.col("error_currency").is_not_null())
        .then(None)
        .when(~well_formed)
        .then(pl.format("'{}' is not a decimal number in {}", _shown(text), pl.lit(unit_name)))
        .when(too_long)
        .then(pl.format("'{}' is out of range", _shown(text)))
        .when(too_precise & pl.lit(minor_units))
        .then(pl.format("'{}' is not a whole number of minor units", _shown(text)))
        .when(too_precise)
        .then(
            pl.format(
                "'{}' has more decimals than {} allows ({}); nothing is rounded",
                _shown(text),
                pl.col("currency"),
                pl.col("exponent"),
            )
        )
        .otherwise(None)
    )
    currency_error = (
        pl.when(pl.col("currency").is_not_null() & pl.col("exponent").is_null())
        .then(pl.format("'{}' is not an ISO 4217 currency", _shown(pl.col("currency"))))
        .otherwise(None)
    )
    joined = frame.join(rates, on="currency", how="left", maintain_order="left")
    joined = joined.with_columns(currency_error.alias("error_currency"))
    joined = joined.with_columns(
        error.alias("error_amount"),
    )
    return joined.with_columns(
        pl.when(pl.col("error_amount").is_null() & pl.col("error_currency").is_null() & text.is_not_null())
        .then(signed)
        .otherwise(None)
        .cast(pl.Int64)
        .alias("amount"),
    ).drop("_amount_text", "exponent", "scale", "frac_divisor")


def _direction(spec: Any, schema: Mapping[str, pl.DataType]) -> list[pl.Expr]:
    if spec is None:
        return [pl.lit(None, dtype=pl.String).alias("direction"), pl.lit(None, dtype=pl.String).alias("error_direction")]
    text = _text_field(spec, schema)
    table = getattr(spec, "map", None)
    if not table:
        return [text.str.to_lowercase().alias("direction"), pl.lit(None, dtype=pl.String).alias("error_direction")]
    lookup = {str(k): str(v) for k, v in table.items()}
    mapped = text.replace_strict(lookup, default=None, return_dtype=pl.String)
    error = (
        pl.when(text.is_not_null() & mapped.is_null())
        .then(pl.format("'{}' is not a key of mapping.direction.map", _shown(text)))
        .otherwise(None)
    )
    return [mapped.alias("direction"), error.alias("error_direction")]


def _metadata(spec: Any, schema: Mapping[str, pl.DataType]) -> pl.Expr:
    if spec is None:
        return pl.lit("{}", dtype=pl.String)
    columns = getattr(spec, "columns", None)
    if columns:
        return pl.struct([pl.col(c) for c in columns]).struct.json_encode()
    column = getattr(spec, "column", None)
    if column is not None:
        return _text(pl.col(column)).fill_null("{}")
    return pl.lit("{}", dtype=pl.String)


def _check_metadata_json(frame: pl.DataFrame, spec: Any) -> pl.DataFrame:
    """A metadata column must hold JSON objects; checked by DuckDB on the whole column."""
    if spec is None or getattr(spec, "column", None) is None:
        return frame.with_columns(pl.lit(None, dtype=pl.String).alias("error_metadata"))
    texts = frame.select(pl.col("metadata")).to_arrow()
    checked = duckdb.sql(
        "select case when not coalesce(try(json_valid(metadata)), false) then 'is not valid JSON' "
        "when json_type(metadata) <> 'OBJECT' then 'is not a JSON object' end as error_metadata from texts"
    ).pl()
    return frame.with_columns(checked.get_column("error_metadata"))
