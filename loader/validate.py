"""The record contract as one pandera schema (polars backend), and its failures as reasons.

`split_valid` validates a mapped batch lazily (every failing row and every
failed rule is collected), merges those failures with the conversion errors of
`mapping.py`, and returns the valid rows and the invalid ones, each invalid row
with a `reason` naming every field at fault and its rule:
`amount: '12.345' has more decimals than USD allows (2); date: is required`.

pandera is imported on first use: it is slow to import and a config error
should not pay for it.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any

import polars as pl

from .mapping import RECORD_FIELDS

ISO_CURRENCY = r"^[A-Z]{3}$"
DIRECTIONS = ("credit", "debit")


@dataclass(frozen=True)
class Rules:
    """The pipeline's `validation:` options, on top of the contract."""

    max_abs_amount: int | None = None
    min_date: dt.date | None = None
    max_date: dt.date | None = None
    required: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, validation: Any) -> "Rules":
        if validation is None:
            return cls()
        date_range = getattr(validation, "date_range", None)
        return cls(
            max_abs_amount=getattr(validation, "max_abs_amount", None),
            min_date=getattr(date_range, "min", None) if date_range is not None else None,
            max_date=getattr(date_range, "max", None) if date_range is not None else None,
            required=tuple(getattr(validation, "required", None) or ()),
        )


# The record contract's columns and their types (mapping.py produces them).
_RECORD_DTYPES = {"date": pl.Date, "data_stream_key": pl.String, "amount": pl.Int64, "currency": pl.String,
                  "direction": pl.String, "description": pl.String, "external_id": pl.String,
                  "metadata": pl.String}


@cache
def record_schema(rules: Rules = Rules()) -> Any:
    """The pandera schema of a mapped record, with the pipeline's extra rules."""
    import pandera.polars as pa

    def column(name: str, *checks: Any, required: bool = False) -> Any:
        nullable = not (required or name in rules.required)
        return pa.Column(_RECORD_DTYPES[name], checks=list(checks), nullable=nullable)

    amount_checks = []
    if rules.max_abs_amount is not None:
        limit = rules.max_abs_amount
        amount_checks.append(
            pa.Check(lambda data: data.lazyframe.select(pl.col(data.key).abs() <= limit),
                     name="max_abs_amount", error=f"absolute value above validation.max_abs_amount ({limit})")
        )
    date_checks = []
    if rules.min_date is not None:
        date_checks.append(pa.Check.ge(rules.min_date, error=f"before validation.date_range.min ({rules.min_date})"))
    if rules.max_date is not None:
        date_checks.append(pa.Check.le(rules.max_date, error=f"after validation.date_range.max ({rules.max_date})"))
    return pa.DataFrameSchema(
        {
            "date": column("date", *date_checks, required=True),
            "data_stream_key": column(
                "data_stream_key", pa.Check.str_length(1, 255, error="must be 1 to 255 characters"), required=True
            ),
            "amount": column("amount", *amount_checks, required=True),
            "currency": column(
                "currency", pa.Check.str_matches(ISO_CURRENCY, error="must be 3 letters (ISO 4217)"), required=True
            ),
            "direction": column("direction", pa.Check.isin(DIRECTIONS, error="must be credit or debit")),
            "description": column("description"),
            "external_id": column("external_id", pa.Check.str_length(1, 255, error="must be 1 to 255 characters")),
            "metadata": column("metadata", required=True),
        },
        strict=False,
        name="record",
    )


def warm_up(rules: Rules = Rules()) -> None:
    """Import pandera, build the schema and run it once, on a thread of its own.

    That costs about 0.3 s, once per process; a run starts it before reading
    its first batch, so the first validation does not wait for it.
    """
    def work() -> None:
        _schema_failures(pl.DataFrame(schema=_RECORD_DTYPES), rules)

    threading.Thread(target=work, name="loader-warm-up", daemon=True).start()


def split_valid(mapped: pl.DataFrame, rules: Rules = Rules()) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(valid rows, invalid rows with `reason`), both in input order."""
    failures = _schema_failures(mapped, rules)
    conversion = _conversion_failures(mapped)
    if failures.height == 0 and conversion.height == 0:
        return _drop_errors(mapped), mapped.head(0).pipe(_drop_errors).with_columns(
            pl.lit(None, dtype=pl.String).alias("reason")
        )
    # A field that failed to convert is null; its conversion error is the reason, not "is required".
    # An unknown currency leaves the amount unconverted: one reason is enough.
    covered = pl.concat(
        [conversion, conversion.filter(pl.col("field") == "currency").with_columns(pl.lit("amount").alias("field"))]
    )
    merged = (
        pl.concat([conversion, failures.join(covered, on=["row", "field"], how="anti")])
        .with_columns(pl.col("field").replace_strict(_FIELD_ORDER, return_dtype=pl.Int32).alias("order"))
        .sort("row", "order", "message")
        .group_by("row", maintain_order=True)
        .agg((pl.col("field") + pl.lit(": ") + pl.col("message")).str.join("; ").alias("reason"))
    )
    # A mask keeps both sides in input order without joining or sorting the wide frame.
    failing = pl.int_range(pl.len(), dtype=pl.UInt32).is_in(merged.get_column("row").implode())
    mask = mapped.select(failing).to_series()
    invalid = mapped.filter(mask).with_columns(merged.get_column("reason"))
    return _drop_errors(mapped.filter(~mask)), _drop_errors(invalid)


_FIELD_ORDER = {name: i for i, name in enumerate(RECORD_FIELDS)}


def _schema_failures(mapped: pl.DataFrame, rules: Rules) -> pl.DataFrame:
    from pandera.errors import SchemaErrors

    try:
        record_schema(rules).validate(mapped, lazy=True)
    except SchemaErrors as exc:
        cases = exc.failure_cases
        if cases.filter(pl.col("index").is_null()).height:
            # A schema-level failure (a wrong dtype) is a bug in mapping, not bad data.
            raise
        value = pl.col("failure_case").cast(pl.String)
        shown = pl.when(value.str.len_chars() > 40).then(value.str.slice(0, 40) + pl.lit("...")).otherwise(value)
        return cases.select(
            pl.col("index").cast(pl.UInt32).alias("row"),
            pl.col("column").alias("field"),
            pl.when(pl.col("check") == "not_nullable")
            .then(pl.lit("is required"))
            .otherwise(pl.format("'{}' {}", shown, pl.col("check")))
            .alias("message"),
        )
    return pl.DataFrame(schema={"row": pl.UInt32, "field": pl.String, "message": pl.String})


def _conversion_failures(mapped: pl.DataFrame) -> pl.DataFrame:
    error_columns = [c for c in mapped.columns if c.startswith("error_")]
    if not error_columns:
        return pl.DataFrame(schema={"row": pl.UInt32, "field": pl.String, "message": pl.String})
    # Few rows fail to convert: keep those before unpivoting, not every row times every field.
    return (
        mapped.select(error_columns)
        .with_row_index("row")
        .filter(pl.any_horizontal(pl.col(error_columns).is_not_null()))
        .unpivot(index="row", on=error_columns, variable_name="field", value_name="message")
        .drop_nulls("message")
        .with_columns(pl.col("field").str.strip_prefix("error_"))
    )


def _drop_errors(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop([c for c in frame.columns if c.startswith("error_")])
