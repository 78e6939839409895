"""ISO 4217 currencies the engine accepts, with their exponents (decimal places)."""

from __future__ import annotations

from functools import cache

import pyarrow as pa
from iso4217 import Currency

#: The name the currency table is registered under on every engine connection.
CURRENCIES_VIEW = "_currencies"


@cache
def currency_exponents() -> dict[str, int]:
    """Code -> exponent; codes without an exponent (gold, XDR, XXX, ...) are not money here."""
    return {currency.code: currency.exponent for currency in Currency if currency.exponent is not None}


def currency_table() -> pa.Table:
    """The accepted currencies as a small Arrow table (code, exponent) to join against."""
    exponents = currency_exponents()
    return pa.table(
        {
            "code": pa.array(list(exponents), pa.string()),
            "exponent": pa.array(list(exponents.values()), pa.int32()),
        }
    )
