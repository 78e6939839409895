"""Property: for any input, every row is accounted for and the engine holds exactly the successful rows."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import duckdb
import polars as pl
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import pipeline_config, write_csv
from loader.run import run_pipeline

amounts = st.one_of(
    st.decimals(min_value=-10**9, max_value=10**9, places=2, allow_nan=False).map(str),
    st.decimals(min_value=-10**6, max_value=10**6, places=3, allow_nan=False).map(str),
    st.sampled_from(["", "abc", "1,000.00", "1e3", " 12.50 ", "-0", ".5"]),
)
rows = st.lists(
    st.tuples(
        st.sampled_from(["2024-01-31", "2024-02-29", "2023-02-29", "31/01/2024", ""]),
        st.one_of(st.just(""), st.text(alphabet="ABC123", min_size=1, max_size=3)),
        st.text(max_size=8),
        amounts,
        st.sampled_from(["USD", "JPY", "BHD", "EUR", "usd", "XXX", ""]),
        st.sampled_from(["DR", "CR", "", "??"]),
    ),
    max_size=40,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows)
def test_totals_add_up_and_target_holds_the_successful_rows(rows):
    folder = Path(tempfile.mkdtemp(prefix="loader-prop-"))
    try:
        write_csv(folder / "data" / "in.csv", [list(r) for r in rows])
        (folder / "pipeline.yaml").write_text(yaml.safe_dump(pipeline_config(target__chunk_size=7)))
        for attempt in range(2):  # the second run must load nothing new
            report = run_pipeline(folder / "pipeline.yaml").report
            totals = report.totals
            assert totals["total"] == len(rows) == totals["successful"] + totals["failed"] + totals["skipped"]
            out = report.rows()
            assert sorted(out["source_row"].to_list()) == list(range(len(rows)))
            by = pl.DataFrame(report.summary["by_stream"]) if report.summary["by_stream"] else None
            if by is not None:
                assert by["rows"].sum() == len(rows)
            if attempt == 1:
                assert totals["successful"] == 0
        with duckdb.connect(str(folder / ".loader" / "endclose.duckdb"), read_only=True) as con:
            held = con.sql("select external_id, amount, currency, date from records order by id").pl()
        first_run = pl.read_parquet(sorted((folder / "reports" / "test_pipeline").glob("*/rows.parquet"))[0])
        created = first_run.filter(pl.col("outcome") == "successful").sort("record_id")
        assert held.height == created.height
        assert held["amount"].to_list() == created["amount"].to_list()
        assert held["external_id"].to_list() == created["external_id"].to_list()
        assert held["currency"].to_list() == created["currency"].to_list()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
