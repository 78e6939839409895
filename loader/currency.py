"""ISO 4217 currency exponents, from the maintained `iso4217` package."""

from __future__ import annotations

from functools import cache

import polars as pl
from iso4217 import Currency

MAX_EXPONENT = 4  # the largest ISO 4217 exponent (CLF, UYW)


@cache
def exponents() -> dict[str, int]:
    """Currency code -> number of decimals; codes without one (gold, XXX) are left out."""
    return {c.code: c.exponent for c in Currency if c.exponent is not None}


@cache
def exponent_table() -> pl.DataFrame:
    """One row per currency: `currency`, `exponent`, `scale` (10**exponent), `frac_divisor`.

    `frac_divisor` turns a fraction padded to MAX_EXPONENT digits into minor units.
    """
    codes = sorted(exponents())
    exps = [exponents()[c] for c in codes]
    return pl.DataFrame(
        {
            "currency": codes,
            "exponent": exps,
            "scale": [10**e for e in exps],
            "frac_divisor": [10 ** (MAX_EXPONENT - e) for e in exps],
        },
        schema={"currency": pl.String, "exponent": pl.Int64, "scale": pl.Int64, "frac_divisor": pl.Int64},
    )


def exponent_of(code: str) -> int | None:
    """The exponent of a currency code (any case), or None when it has none or is unknown."""
    return exponents().get(code.upper())
