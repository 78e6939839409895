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
import threading
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import duckdb
import polars as pl

from .config import RECORD_FIELDS
from .currency import MAX_EXPONENT, exponent_table
from .errors import ConfigError
from .source import SOURCE_FILE, SOURCE_ROW
from .views import registered

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
    """Map one batch of source rows onto the record contract (see module docstring).

    Conversion runs on every row; the text of an error is built only for the
    rows that have one, since most rows have none.
    """
    schema = frame.schema
    unit = getattr(mapping.amount, "unit", "major")
    metadata_spec = getattr(mapping, "metadata", None)
    converted = (
        frame.lazy()
        .select(
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
            _metadata(metadata_spec, schema).alias("metadata"),
        )
        .join(_rates(minor_units=(unit == "minor")).lazy(), on="currency", how="left", maintain_order="left")
        .with_columns(_amount_parts())
        .with_columns(_amount_problem().alias("_amount_problem"))
        .with_columns(_minor_units().alias("amount"))
        # The batch is already in memory: Polars' streaming engine (its default here) cut it
        # into morsels and took 0.45 s more CPU a million rows (bench/backfill.py, 6% of a run).
        .collect(engine="in-memory")
    )
    converted = _check_metadata_json(converted, metadata_spec)
    return _with_error_texts(converted, minor_units=(unit == "minor"))


def _with_error_texts(converted: pl.DataFrame, *, minor_units: bool) -> pl.DataFrame:
    """Turn the problem markers into `error_<field>` texts, computed on the failing rows only."""
    problems = {
        "date": pl.col("_date_text").is_not_null() & pl.col("date").is_null(),
        "currency": pl.col("exponent").is_null(),
        "amount": pl.col("_amount_problem").is_not_null(),
        "direction": pl.col("_direction_text").is_not_null() & pl.col("direction").is_null(),
        "metadata": pl.col("_metadata_problem").is_not_null(),
    }
    failing = converted.select(pl.arg_where(pl.any_horizontal(*problems.values()))).to_series()
    texts = converted[failing].select(
        pl.when(problems["date"])
        .then(pl.format("'{}' is not a date in format {}", _shown(pl.col("_date_text")), pl.col("_date_format")))
        .alias("error_date"),
        pl.when(problems["currency"])
        .then(pl.format("'{}' is not an ISO 4217 currency", _shown(pl.col("currency"))))
        .alias("error_currency"),
        _amount_error_text(minor_units).alias("error_amount"),
        pl.when(problems["direction"])
        .then(pl.format("'{}' is not a key of mapping.direction.map", _shown(pl.col("_direction_text"))))
        .alias("error_direction"),
        pl.col("_metadata_problem").alias("error_metadata"),
    )
    nulls = pl.repeat(None, converted.height, dtype=pl.String, eager=True)
    errors = [nulls.alias(name).scatter(failing, texts[name]) for name in texts.columns]
    return converted.drop(
        "_date_text", "_date_format", "_amount_text", "_amount_problem", "_direction_text", "_metadata_problem",
        "exponent", "scale", "frac_divisor", "_integer_digits", "_fraction",
    ).with_columns(errors)


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
    """`date`, plus `_date_text`/`_date_format` to explain a failure (null text: nothing to explain)."""
    expr, dtype = _raw(spec, schema)
    default = getattr(spec, "default", None)
    no_text = pl.lit(None, dtype=pl.String)
    if dtype == pl.Date or isinstance(dtype, pl.Datetime):
        value = expr if dtype == pl.Date else expr.dt.date()
        if default is not None:
            value = value.fill_null(pl.lit(default, dtype=pl.Date))
        return [value.alias("date"), no_text.alias("_date_text"), no_text.alias("_date_format")]
    text = _text(expr)
    fmt = getattr(spec, "format", None)
    if fmt:
        parsed = text.str.strptime(pl.Date, fmt, strict=False, exact=True)
    else:
        # ISO 8601: a date, or the date part of a timestamp.
        date_part = pl.when(text.str.slice(10, 1).is_in(["T", " "])).then(text.str.slice(0, 10)).otherwise(text)
        parsed = date_part.str.strptime(pl.Date, "%Y-%m-%d", strict=False, exact=True)
    if default is not None:
        parsed = pl.when(text.is_null()).then(pl.lit(default, dtype=pl.Date)).otherwise(parsed)
    return [parsed.alias("date"), text.alias("_date_text"), pl.lit(fmt or "YYYY-MM-DD").alias("_date_format")]


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


def _rates(*, minor_units: bool) -> pl.DataFrame:
    rates = exponent_table()
    if minor_units:
        # Minor units are whole numbers whatever the currency: parse them with exponent 0.
        rates = rates.with_columns(
            pl.lit(0, dtype=pl.Int64).alias("exponent"),
            pl.lit(1, dtype=pl.Int64).alias("scale"),
            pl.lit(10**MAX_EXPONENT, dtype=pl.Int64).alias("frac_divisor"),
        )
    return rates


_TEXT = pl.col("_amount_text")
_INTEGER_DIGITS = pl.col("_integer_digits")
_FRACTION = pl.col("_fraction")


def _amount_parts() -> list[pl.Expr]:
    """The integer digits (no sign, no leading zeros) and significant fraction digits of the text."""
    parts = _TEXT.str.split_exact(".", 1)
    return [
        parts.struct.field("field_0").str.strip_chars_start("+-").str.strip_chars_start("0").alias("_integer_digits"),
        parts.struct.field("field_1").fill_null("").str.strip_chars_end("0").alias("_fraction"),
    ]


def _amount_problem() -> pl.Expr:
    """Why the amount text cannot be converted: not_decimal | out_of_range | too_precise, else null."""
    return (
        pl.when(_TEXT.is_null() | pl.col("exponent").is_null())
        .then(None)
        .when(~_TEXT.str.contains(_DECIMAL))
        .then(pl.lit("not_decimal"))
        .when(_INTEGER_DIGITS.str.len_chars() > MAX_INTEGER_DIGITS)
        .then(pl.lit("out_of_range"))
        .when(_FRACTION.str.len_chars() > pl.col("exponent"))
        .then(pl.lit("too_precise"))
        .otherwise(None)
    )


def _minor_units() -> pl.Expr:
    """Decimal text -> integer minor units with the currency's exponent; integer arithmetic only."""
    integer_value = pl.when(_INTEGER_DIGITS.str.len_chars() == 0).then(0).otherwise(
        _INTEGER_DIGITS.cast(pl.Int64, strict=False)
    )
    fraction_value = (_FRACTION + pl.lit("0" * MAX_EXPONENT)).str.slice(0, MAX_EXPONENT).cast(
        pl.Int64, strict=False
    ) // pl.col("frac_divisor")
    magnitude = integer_value * pl.col("scale") + fraction_value
    signed = pl.when(_TEXT.str.starts_with("-")).then(-magnitude).otherwise(magnitude)
    convertible = _TEXT.is_not_null() & pl.col("exponent").is_not_null() & pl.col("_amount_problem").is_null()
    return pl.when(convertible).then(signed).otherwise(None).cast(pl.Int64)


def _amount_error_text(minor_units: bool) -> pl.Expr:
    problem, shown = pl.col("_amount_problem"), _shown(_TEXT)
    unit_name = "minor units" if minor_units else "major units"
    too_precise = (
        pl.format("'{}' is not a whole number of minor units", shown)
        if minor_units
        else pl.format("'{}' has more decimals than {} allows ({}); nothing is rounded", shown,
                       pl.col("currency"), pl.col("exponent"))
    )
    return (
        pl.when(problem == "not_decimal")
        .then(pl.format("'{}' is not a decimal number in {}", shown, pl.lit(unit_name)))
        .when(problem == "out_of_range")
        .then(pl.format("'{}' is out of range", shown))
        .when(problem == "too_precise")
        .then(too_precise)
    )


def _direction(spec: Any, schema: Mapping[str, pl.DataType]) -> list[pl.Expr]:
    """`direction`, plus `_direction_text` when a map is used (to explain a key it lacks)."""
    no_text = pl.lit(None, dtype=pl.String).alias("_direction_text")
    if spec is None:
        return [pl.lit(None, dtype=pl.String).alias("direction"), no_text]
    text = _text_field(spec, schema)
    table = getattr(spec, "map", None)
    if not table:
        return [text.str.to_lowercase().alias("direction"), no_text]
    lookup = {str(k): str(v) for k, v in table.items()}
    mapped = text.replace_strict(lookup, default=None, return_dtype=pl.String)
    return [mapped.alias("direction"), text.alias("_direction_text")]


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
        return frame.with_columns(pl.lit(None, dtype=pl.String).alias("_metadata_problem"))
    con = _json_checker()
    with registered(con, "_texts", frame.select(pl.col("metadata")).to_arrow()):
        # json_type() is not called: on invalid JSON it can fail the whole query.
        checked = con.sql(
            "select case when not json_valid(metadata) then 'is not valid JSON' "
            "when left(ltrim(metadata), 1) <> '{' then 'is not a JSON object' end as _metadata_problem from _texts"
        ).pl()
    return frame.with_columns(checked.get_column("_metadata_problem"))


_checkers = threading.local()


def _json_checker() -> duckdb.DuckDBPyConnection:
    # One connection per thread: a DuckDB connection is not to be used by two threads at once,
    # and batches are mapped on the run's reading thread.
    con = getattr(_checkers, "con", None)
    if con is None:
        con = _checkers.con = duckdb.connect()
    return con
