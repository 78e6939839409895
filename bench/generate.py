"""Generate N realistic bank-export rows as CSV: the benchmarks' input.

1% of rows invalid (bad dates, too many decimals, unknown currencies), 1% of
rows repeating an earlier row's id, several currencies, JSON metadata.

    python bench/generate.py 1000000 bench/data/rows_1m.csv [bench/data/rows_1m_first_half.csv]

The file is written in chunks of a million rows (rows `start..start+n` of the
same sequence), so ten million rows need no more memory than one million; the
optional second path gets the first half of the rows in the same pass.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import polars as pl

CURRENCIES = ["USD", "USD", "USD", "EUR", "GBP", "JPY", "BHD"]
EXPONENT = {"USD": 2, "EUR": 2, "GBP": 2, "JPY": 0, "BHD": 3}
MEMOS = ["Stripe payout", "AWS invoice", "Payroll run", "Customer wire", "Office rent", "Card refund"]


def _noise(salt: int) -> pl.Expr:
    """A deterministic pseudo-random non-negative integer per row (no numpy needed)."""
    return ((pl.col("i") + salt) * 2654435761 + salt * 40503) % 4294967291


def generate(n: int, *, id_prefix: str = "TXN", start: int = 0) -> pl.DataFrame:
    """Rows start..start+n-1 of the sequence (the same rows whatever the chunking, if start % 100 == 0)."""
    if start % 100:
        raise ValueError("start must be a multiple of 100: a repeated id repeats the row before it")
    frame = pl.DataFrame({"i": pl.int_range(start, start + n, eager=True, dtype=pl.Int64)}).with_columns(
        pl.lit(pl.Series(CURRENCIES)).gather(_noise(1) % len(CURRENCIES)).alias("currency"),
        (_noise(2) % 10_000_000 - 5_000_000).alias("minor"),
        (_noise(3) % 365).alias("day"),
        pl.lit(pl.Series(MEMOS)).gather(_noise(4) % len(MEMOS)).alias("memo"),
    ).with_columns(pl.col("currency").replace_strict(EXPONENT, return_dtype=pl.Int64).alias("exp"))
    ids = pl.format("{}-{}", pl.lit(id_prefix), pl.col("i").cast(pl.String).str.zfill(9))
    repeated = pl.col("i") % 100 == 57  # 1%: the id of the row before
    invalid = pl.col("i") % 100 == 13  # 1%: a bad value
    kind = pl.col("i") % 3
    amount = (
        pl.when(pl.col("exp") == 0)
        .then(pl.col("minor").cast(pl.String))
        .otherwise(
            pl.format(
                "{}{}.{}",
                pl.when(pl.col("minor") < 0).then(pl.lit("-")).otherwise(pl.lit("")),
                (pl.col("minor").abs() // (10 ** pl.col("exp"))).cast(pl.String),
                (pl.col("minor").abs() % (10 ** pl.col("exp"))).cast(pl.String).str.zfill(pl.col("exp")),
            )
        )
    )
    return frame.select(
        pl.when(invalid & (kind == 0))
        .then(pl.lit("2024-02-30"))
        .otherwise((pl.lit("2024-01-01").str.to_date() + pl.duration(days=pl.col("day"))).dt.strftime("%Y-%m-%d"))
        .alias("date"),
        pl.lit("bank_operating").alias("data_stream_key"),
        pl.when(invalid & (kind == 1)).then(pl.lit("12.3456")).otherwise(amount).alias("amount"),
        pl.when(invalid & (kind == 2)).then(pl.lit("XYZ")).otherwise(pl.col("currency")).alias("currency"),
        pl.col("memo").alias("description"),
        pl.when(repeated).then(ids.shift(1)).otherwise(ids).alias("external_id"),
        pl.concat_str(pl.lit('{"account":"OPS-'), (pl.col("i") % 7).cast(pl.String), pl.lit('","batch":'),
                      (pl.col("i") // 1000).cast(pl.String), pl.lit("}")).alias("metadata"),
    )


def bench_pipeline(name: str, source: Path, target: dict) -> str:
    """pipeline.yaml for a generated file: the mapping of its columns, state under state/."""
    import yaml

    return yaml.safe_dump({
        "version": 1,
        "name": name,
        "source": {"path": str(source)},
        "mapping": {
            "date": {"column": "date"},
            "data_stream_key": {"column": "data_stream_key"},
            "amount": {"column": "amount", "unit": "major"},
            "currency": {"column": "currency"},
            "description": {"column": "description"},
            "external_id": {"column": "external_id"},
            "metadata": {"column": "metadata"},
        },
        "dedupe": {"cache": "state/cache.duckdb"},
        "target": target,
        "report": {"dir": "reports", "formats": ["json", "parquet"]},
        "fail_on": {"failed_rows": 100_000_000},
    }, sort_keys=False)


def write_rows(n: int, out: Path, first_half: Path | None = None, *, chunk_rows: int = 1_000_000) -> None:
    """Write generate(n) to `out` chunk by chunk (and its first n // 2 rows to `first_half`).

    Files appear complete or not at all (written as *.partial, then renamed).
    """
    if chunk_rows % 100:
        raise ValueError("chunk_rows must be a multiple of 100")
    targets = [(out, n)] + ([(first_half, n // 2)] if first_half is not None else [])
    partials = [path.with_name(path.name + ".partial") for path, _ in targets]
    for path in partials:
        path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as files:
        handles = [files.enter_context(open(path, "wb")) for path in partials]
        for start in range(0, n, chunk_rows):
            chunk = generate(min(chunk_rows, n - start), start=start)
            for handle, (_, limit) in zip(handles, targets):
                if start < limit:
                    chunk.head(limit - start).write_csv(handle, include_header=start == 0)
    for partial, (path, _) in zip(partials, targets):
        os.replace(partial, path)


def write_first_half(full: Path, out: Path, rows: int) -> None:
    """The first `rows` rows of an existing CSV, streamed (the file is never held in memory)."""
    partial = out.with_name(out.name + ".partial")
    pl.scan_csv(full, infer_schema=False).head(rows).sink_csv(partial)
    os.replace(partial, out)


def main() -> None:
    n = int(sys.argv[1])
    out = Path(sys.argv[2])
    first_half = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    write_rows(n, out, first_half)
    print(f"wrote {n:,} rows to {out} ({out.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
