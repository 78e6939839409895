"""The Python API that notebooks and schedulers call."""

from __future__ import annotations

import types

import polars as pl
import pytest

import loader

MAPPING = {
    "date": {"column": "d"},
    "data_stream_key": {"value": "ops"},
    "amount": {"column": "amt", "unit": "major"},
    "currency": {"column": "ccy"},
    "external_id": {"column": "id"},
}
TARGET = {"type": "local", "database": ".loader/endclose.duckdb", "streams": [{"key": "ops", "name": "Ops"}]}


def frame() -> pl.DataFrame:
    return pl.DataFrame({"d": ["2024-01-02", "2024-01-03", "bad"], "amt": ["1.50", "2", "3"],
                         "ccy": ["USD", "JPY", "USD"], "id": ["a", "b", "c"]})


def test_all_is_honest():
    assert set(loader.__all__) == set(loader._EXPORTS)
    for name in loader.__all__:
        assert hasattr(loader, name), name
    public = {n for n in dir(loader) if not n.startswith("_") and not isinstance(getattr(loader, n), types.ModuleType)}
    assert public <= set(loader.__all__)


def test_load_a_dataframe_and_read_the_report(tmp_path):
    report = loader.load(frame(), mapping=MAPPING, target=TARGET, name="nb", base_dir=tmp_path,
                         fail_on={"failed_rows": 5})
    assert report.totals == {"total": 3, "successful": 2, "failed": 1, "skipped": 0}
    assert report.failed()["reason"].to_list() == ["date: 'bad' is not a date in format YYYY-MM-DD"]
    assert report.directory.parent == tmp_path / "reports" / "nb"
    assert "successful" in report._repr_html_()
    with pytest.raises(loader.TooManyFailures) as info:
        report.raise_for_failures(0)
    assert info.value.exit_code == 1
    report.raise_for_failures(1)
    again = loader.load(frame(), mapping=MAPPING, target=TARGET, name="nb", base_dir=tmp_path)
    assert again.skipped()["reason_code"].to_list() == ["already_loaded", "already_loaded"]


def test_config_errors_name_the_section_key(tmp_path):
    with pytest.raises(loader.ConfigError) as info:
        loader.load(frame(), mapping={**MAPPING, "amount": {"column": "amt"}}, target=TARGET, base_dir=tmp_path)
    assert ("mapping.amount.unit", "field required") in info.value.problems


def test_run_and_validate_a_pipeline_file(make_pipeline):
    path = make_pipeline({"a.csv": [["2024-01-02", "T1", "x", "1.00", "USD", "DR"]]})
    assert loader.validate(path) == {"rows": 1, "valid": 1, "invalid": 0, "reasons": []}
    report = loader.run(path)
    assert report.totals["successful"] == 1
    assert isinstance(loader.load_pipeline(path), loader.Pipeline)
