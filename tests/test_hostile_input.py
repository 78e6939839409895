"""Hostile input through `loader run` (a CLI subprocess): every case ends in a clear outcome.

Either every source row is in the report with an outcome and a reason (exit 0/1), or the
run stops before loading anything with an error that names the key to fix (exit 2). Never
a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import duckdb
import polars as pl
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HEADER, pipeline_config, run_cli

HEADER_LINE = (",".join(HEADER) + "\n").encode()
GOOD = b"2024-01-02,A1,coffee,12.50,USD,DR\n"


def write(tmp_path: Path, data: bytes, name: str = "in.csv", **overrides) -> Path:
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / name).write_bytes(data)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(**overrides), sort_keys=False))
    return path


def run(path: Path, *args: str, env: dict | None = None):
    result = run_cli("run", str(path), "--json", *args, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def loaded(path: Path, *args: str) -> tuple[dict, pl.DataFrame]:
    """Run to the end (exit 0/1); the summary and rows.parquet."""
    result = run(path, *args)
    assert result.returncode in (0, 1), result.stderr
    summary = json.loads(result.stdout)
    totals = summary["totals"]
    assert totals["total"] == totals["successful"] + totals["failed"] + totals["skipped"]
    directory = path.parent / "reports" / summary["pipeline"] / summary["run_id"]
    rows = pl.read_parquet(directory / "rows.parquet")
    assert rows.height == totals["total"]
    assert rows.filter(pl.col("outcome") == "failed")["reason"].null_count() == 0, "a failure without reason"
    return summary, rows


def refused(path: Path, *args: str, env: dict | None = None) -> str:
    """Exit 2, nothing loaded; the error text."""
    result = run(path, *args, env=env)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("error: "), result.stderr
    database = path.parent / ".loader" / "endclose.duckdb"
    if database.exists():  # the target may be prepared; nothing may be in it
        with duckdb.connect(str(database), read_only=True) as con:
            assert con.sql("select count(*) from records").fetchall()[0][0] == 0, "something was loaded"
    return result.stderr


def held(path: Path) -> pl.DataFrame:
    with duckdb.connect(str(path.parent / ".loader" / "endclose.duckdb"), read_only=True) as con:
        return con.sql("select external_id, amount, description from records order by id").pl()


# -- reading ----------------------------------------------------------------------------


def test_truncated_last_line_is_accounted_for_and_a_cut_row_fails_with_its_reason(tmp_path):
    # The file ends mid-row, without a newline: the last row lost its amount, currency, direction.
    path = write(tmp_path, HEADER_LINE + GOOD + b"2024-01-03,A2,cut off he")
    summary, rows = loaded(path)
    assert summary["totals"]["total"] == 2
    assert rows["source_row"].to_list() == [0, 1]
    cut = rows.row(1, named=True)
    assert (cut["external_id"], cut["outcome"], cut["reason_code"]) == ("A2", "failed", "invalid")
    assert "amount" in cut["reason"]
    assert held(path)["external_id"].to_list() == ["A1"]


def test_a_file_without_a_final_newline_loads_its_last_row(tmp_path):
    path = write(tmp_path, HEADER_LINE + GOOD + b"2024-01-03,A2,tea,3.10,USD,CR")
    summary, rows = loaded(path)
    assert summary["totals"]["successful"] == 2
    assert held(path)["amount"].to_list() == [1250, 310]


def test_latin1_bytes_in_a_utf8_file_stop_the_run_naming_the_encoding_key(tmp_path):
    # Guessing would load mangled names into a ledger: a demanding user wants to be told, with the fix.
    data = HEADER_LINE + GOOD + "2024-01-03,A2,caf\u00e9 cr\u00e8me,4.00,USD,DR\n".encode("latin1")
    error = refused(write(tmp_path, data))
    assert "source.csv.encoding" in error
    assert "latin1" in error and "utf8-lossy" in error


def test_latin1_file_declared_latin1_loads_the_characters_exactly(tmp_path):
    data = HEADER_LINE + "2024-01-03,A2,caf\u00e9 cr\u00e8me,4.00,USD,DR\n".encode("latin1")
    loaded(write(tmp_path, data, source__csv={"encoding": "latin1"}))
    assert held(tmp_path / "pipeline.yaml")["description"].to_list() == ["caf\u00e9 cr\u00e8me"]


def test_utf8_lossy_replaces_bad_bytes_and_keeps_every_row(tmp_path):
    data = HEADER_LINE + GOOD + "2024-01-03,A2,caf\u00e9,4.00,USD,DR\n".encode("latin1")
    summary, _ = loaded(write(tmp_path, data, source__csv={"encoding": "utf8-lossy"}))
    assert summary["totals"]["successful"] == 2
    assert held(tmp_path / "pipeline.yaml")["description"].to_list() == ["coffee", "caf\ufffd"]


def test_a_utf8_bom_does_not_stick_to_the_first_column_name(tmp_path):
    # `posted` is the first column and is mapped by that name: with the BOM glued on, it would not bind.
    summary, rows = loaded(write(tmp_path, b"\xef\xbb\xbf" + HEADER_LINE + GOOD))
    assert summary["totals"]["successful"] == 1
    assert rows["date"].cast(pl.String).to_list() == ["2024-01-02"]


def test_ragged_rows_are_all_accounted_for(tmp_path):
    data = (HEADER_LINE + GOOD
            + b"2024-01-03,A2,too many,1.00,USD,DR,extra,more\n"  # extra fields are ignored
            + b"2024-01-04,A3,too few\n"  # amount missing: fails, saying so
            + b"2024-01-05\n")
    summary, rows = loaded(write(tmp_path, data))
    assert summary["totals"]["total"] == 4
    assert rows["source_row"].to_list() == [0, 1, 2, 3]
    assert rows["outcome"].to_list() == ["successful", "successful", "failed", "failed"]
    assert all("amount" in reason for reason in rows["reason"][2:].to_list())


def test_a_quoted_newline_is_one_row_not_two(tmp_path):
    data = HEADER_LINE + b'2024-01-02,A1,"line one\nline two, with a comma",12.50,USD,DR\n' + GOOD.replace(b"A1", b"A2")
    summary, rows = loaded(write(tmp_path, data))
    assert summary["totals"] == {"total": 2, "successful": 2, "failed": 0, "skipped": 0}
    assert held(tmp_path / "pipeline.yaml")["description"].to_list() == ["line one\nline two, with a comma", "coffee"]


def test_an_unterminated_quote_stops_the_run_naming_the_file_and_the_csv_options(tmp_path):
    data = HEADER_LINE + GOOD + b'2024-01-03,A2,"never closed,1.00,USD,DR\n' + GOOD.replace(b"A1", b"A3")
    error = refused(write(tmp_path, data))
    assert "in.csv" in error and "source.csv" in error


def test_nul_bytes_in_fields_neither_crash_nor_lose_rows(tmp_path):
    data = HEADER_LINE + b"2024-01-02,A1,he\x00llo,12.50,USD,DR\n" + b"2024-01-02,A\x002,x,1.00,USD,DR\n"
    summary, rows = loaded(write(tmp_path, data))
    assert summary["totals"]["total"] == 2
    assert rows["source_row"].to_list() == [0, 1]
    # The NUL is data: loaded as is, never truncated at the NUL.
    assert sorted(held(tmp_path / "pipeline.yaml")["description"].to_list()) == ["he\x00llo", "x"]


def test_a_10_mb_field_fails_its_row_with_a_short_reason(tmp_path):
    huge = b"9" * (10 * 1024 * 1024)
    data = HEADER_LINE + GOOD + b"2024-01-03,A2,big," + huge + b".123,USD,DR\n"
    started = time.monotonic()
    summary, rows = loaded(write(tmp_path, data))
    assert time.monotonic() - started < 60
    assert summary["totals"] == {"total": 2, "successful": 1, "failed": 1, "skipped": 0}
    reason = rows.row(1, named=True)["reason"]
    assert reason.startswith("amount:") and len(reason) < 300, reason[:300]
    assert (tmp_path / "reports").stat().st_size < 10 * 1024 * 1024  # the report holds no copy of it
    html = next((tmp_path / "reports").rglob("report.html"))
    assert html.stat().st_size < 1024 * 1024


def test_a_header_only_file_is_zero_rows_and_exit_0(tmp_path):
    summary, rows = loaded(write(tmp_path, HEADER_LINE))
    assert summary["totals"] == {"total": 0, "successful": 0, "failed": 0, "skipped": 0}
    assert rows.height == 0


def test_an_empty_file_is_zero_rows_and_exit_0(tmp_path):
    summary, rows = loaded(write(tmp_path, b""))
    assert summary["totals"] == {"total": 0, "successful": 0, "failed": 0, "skipped": 0}
    assert summary["source"]["files"][0]["rows"] == 0
    assert rows.height == 0


def test_an_empty_file_first_in_a_glob_does_not_hide_the_others(tmp_path):
    path = write(tmp_path, b"", name="a.csv")
    (tmp_path / "data" / "b.csv").write_bytes(HEADER_LINE + GOOD)
    summary, _ = loaded(path)
    assert summary["totals"]["successful"] == 1


# -- config -----------------------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused_fast(tmp_path):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join(['*a%d' % (i - 1)] * 9)}]" for i in range(1, 10)]
    bomb = "\n".join(lines) + "\n"
    path = write(tmp_path, HEADER_LINE + GOOD)
    path.write_text(path.read_text() + bomb)
    started = time.monotonic()
    error = refused(path)
    assert time.monotonic() - started < 20
    assert "alias" in error


def test_an_unset_variable_is_refused_with_its_key_path(tmp_path):
    path = write(tmp_path, HEADER_LINE + GOOD, mapping__data_stream_key={"value": "${LOADER_TEST_NEVER_SET}"})
    error = refused(path)
    assert "mapping.data_stream_key.value" in error and "LOADER_TEST_NEVER_SET" in error
    assert "--var LOADER_TEST_NEVER_SET=" in error


def test_a_glob_that_matches_nothing_is_refused_naming_source_path(tmp_path):
    path = write(tmp_path, HEADER_LINE + GOOD, source__path="data/nothing-*.csv")
    assert "source.path" in refused(path)


# -- report safety ----------------------------------------------------------------------


def test_script_in_source_text_stays_text_in_report_html(tmp_path):
    script = "<script>alert(1)</script>"
    data = HEADER_LINE + f'2024-01-02,"{script}",{script},12.345,USD,DR\n'.encode()
    summary, _ = loaded(write(tmp_path, data))
    assert summary["totals"]["failed"] == 1  # shown among the failed rows
    html = next((tmp_path / "reports").rglob("report.html")).read_text()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_rows_csv_neutralises_formula_cells(tmp_path):
    ids = ["=HYPERLINK(\"http://x\")", "+SUM(A1)", "-2+3", "@cmd", "plain"]
    buffer = io.StringIO()
    csv.writer(buffer).writerows([["2024-01-02", i, "x", "1.00", "USD", "DR"] for i in ids])
    summary, _ = loaded(write(tmp_path, HEADER_LINE + buffer.getvalue().encode()))
    text = next((tmp_path / "reports").rglob("rows.csv")).read_text()
    cells = list(csv.DictReader(io.StringIO(text)))
    assert [c["external_id"] for c in cells] == ["'" + i for i in ids[:4]] + ["plain"]
    for row in cells:
        for value in row.values():
            assert not value or value[0] not in "=+@" and not (value[0] == "-" and not _number(value)), row


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# -- generated bytes --------------------------------------------------------------------

_CELL_CHARS = st.text(
    alphabet=st.one_of(st.characters(min_codepoint=32, max_codepoint=126),
                       st.sampled_from(["\x00", "\x01", "\x1b", "\x7f", "\t", "\r", "\n", ",", '"', "é"])),
    max_size=12,
)
_CELL = st.one_of(
    st.sampled_from(["2024-01-02", "12.50", "-3", "USD", "JPY", "DR", "CR", "", "A1", "A2"]),
    _CELL_CHARS,
)


@st.composite
def csv_bytes(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        cells = draw(st.lists(_CELL, min_size=0, max_size=9))
        out = []
        for cell in cells:
            if draw(st.booleans()) or any(c in cell for c in ',"\n\r'):
                out.append('"' + cell.replace('"', '""') + '"')  # quoted, as a writer would
            else:
                out.append(cell)
        lines.append(",".join(out))
    end = draw(st.sampled_from(["\n", "\r\n", ""]))
    return HEADER_LINE + "\n".join(lines).encode() + end.encode()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=csv_bytes())
def test_generated_csv_bytes_always_end_in_an_accounted_report(data):
    folder = Path(tempfile.mkdtemp(prefix="loader-hostile-"))
    try:
        path = write(folder, data)
        summary, rows = loaded(path)
        assert summary["totals"]["total"] == summary["source"]["files"][0]["rows"]
        assert rows["source_row"].to_list() == list(range(rows.height))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
