"""pipeline.yaml -> Pipeline: defaults, key-path errors, interpolation, YAML safety."""

from __future__ import annotations

import copy
import hashlib
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from loader.config import (
    RECORD_FIELDS,
    MappingConfig,
    Pipeline,
    SourceConfig,
    TargetConfig,
    load_pipeline,
    parse_pipeline,
    parse_section,
    parse_var_assignments,
)
from loader.errors import ConfigError

SECRET = "sk_live_TOPSECRET_0123456789"

MINIMAL: dict[str, Any] = {
    "version": 1,
    "name": "chase_operating",
    "source": {"path": "data/*.csv"},
    "mapping": {
        "date": {"column": "posted_at"},
        "data_stream_key": {"value": "chase_operating"},
        "amount": {"column": "amount", "unit": "major"},
    },
}

FULL_YAML = """\
version: 1
name: chase_operating_backfill
source:
  path: data/chase/*.csv
  format: csv
  csv: {separator: ";", has_header: false, encoding: latin1, quote_char: "'", skip_rows: 2,
        null_values: ["", NA]}
transform:
  sql: "select * from source where status = 'settled'"
mapping:
  date: {column: posted_at, format: "%m/%d/%Y"}
  data_stream_key: {value: chase_operating}
  amount: {column: amount, unit: major}
  currency: {column: ccy, default: USD}
  direction: {column: dr_cr, map: {DR: debit, CR: credit}}
  description: {column: memo}
  external_id: {column: txn_id}
  metadata: {columns: [account, category]}
validation:
  max_abs_amount: 100000000
  date_range: {min: "2020-01-01", max: "2030-12-31"}
  required: [external_id, direction]
dedupe:
  cache: state/cache.duckdb
  within_source: fail
target:
  type: local
  database: state/endclose.duckdb
  environment: sandbox
  streams:
    - {key: chase_operating, name: Chase operating account, description: main account}
  on_conflict: error
  chunk_size: 500
  concurrency: 2
  timeout_seconds: 5
  poll_timeout_seconds: 60
report:
  dir: out/reports
  formats: [parquet, csv]
fail_on:
  failed_rows: 10
"""


def config(**sections: Any) -> dict[str, Any]:
    """MINIMAL with top-level sections replaced (None removes one)."""
    result = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def with_mapping(**fields: Any) -> dict[str, Any]:
    mapping = copy.deepcopy(MINIMAL["mapping"])
    for key, value in fields.items():
        if value is None:
            mapping.pop(key)
        else:
            mapping[key] = value
    return config(mapping=mapping)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with data files the configs can match."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.csv").write_text("a\n1\n")
    (tmp_path / "data" / "a.csv").write_text("a\n1\n")
    return tmp_path


def write(folder: Path, content: dict[str, Any] | str, name: str = "pipeline.yaml") -> Path:
    path = folder / name
    text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
    path.write_text(text)
    return path


def config_error(folder: Path, content: dict[str, Any] | str, **kwargs: Any) -> ConfigError:
    path = write(folder, content)
    with pytest.raises(ConfigError) as excinfo:
        load_pipeline(path, **kwargs)
    assert excinfo.value.exit_code == 2
    return excinfo.value


# --------------------------------------------------------------------------
# good configs
# --------------------------------------------------------------------------


def test_minimal_config_gets_the_defaults(project: Path) -> None:
    pipeline = load_pipeline(write(project, MINIMAL))

    assert pipeline.version == 1
    assert pipeline.name == "chase_operating"
    assert pipeline.path == project.resolve() / "pipeline.yaml"
    assert pipeline.base_dir == project.resolve()
    source = pipeline.source
    assert source.path == project.resolve() / "data" / "*.csv"
    assert source.files == [project.resolve() / "data" / "a.csv", project.resolve() / "data" / "b.csv"]
    assert source.query is None
    assert source.format == "csv"
    assert source.csv is not None
    assert (source.csv.separator, source.csv.has_header, source.csv.encoding) == (",", True, "utf8")
    assert (source.csv.quote_char, source.csv.skip_rows, source.csv.null_values) == ('"', 0, [])
    assert pipeline.transform is None
    assert pipeline.mapping.amount.unit == "major"
    assert pipeline.mapping.date.format is None
    assert pipeline.mapping.currency is None and pipeline.mapping.metadata is None
    assert pipeline.validation.max_abs_amount is None
    assert pipeline.validation.date_range is None
    assert pipeline.validation.required == []
    assert pipeline.dedupe.cache == project.resolve() / ".loader" / "cache.duckdb"
    assert pipeline.dedupe.within_source == "first"
    target = pipeline.target
    assert target.type == "local"
    assert target.database == project.resolve() / ".loader" / "endclose.duckdb"
    assert target.environment == "default"
    assert target.streams == []
    assert target.base_url is None and target.api_key is None
    assert (target.on_conflict, target.chunk_size, target.concurrency) == ("skip", 1000, 4)
    assert (target.timeout_seconds, target.poll_timeout_seconds) == (30.0, 600.0)
    assert pipeline.report.dir == project.resolve() / "reports"
    assert pipeline.report.formats == ["json", "parquet", "html"]
    assert pipeline.fail_on.failed_rows == 0


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "data" / "chase").mkdir(parents=True)
    (tmp_path / "data" / "chase" / "jan.csv").write_text("x\n")
    pipeline = load_pipeline(write(tmp_path, FULL_YAML))
    base = tmp_path.resolve()

    assert pipeline.source.files == [base / "data" / "chase" / "jan.csv"]
    csv = pipeline.source.csv
    assert csv is not None
    assert (csv.separator, csv.has_header, csv.encoding, csv.quote_char) == (";", False, "latin1", "'")
    assert (csv.skip_rows, csv.null_values) == (2, ["", "NA"])
    assert pipeline.transform is not None and "status = 'settled'" in pipeline.transform.sql
    mapping = pipeline.mapping
    assert mapping.date.column == "posted_at" and mapping.date.format == "%m/%d/%Y"
    assert mapping.data_stream_key.value == "chase_operating"
    assert mapping.currency is not None and mapping.currency.default == "USD"
    assert mapping.direction is not None and mapping.direction.map == {"DR": "debit", "CR": "credit"}
    assert mapping.description is not None and mapping.description.column == "memo"
    assert mapping.external_id is not None and mapping.external_id.column == "txn_id"
    assert mapping.metadata is not None and mapping.metadata.columns == ["account", "category"]
    validation = pipeline.validation
    assert validation.max_abs_amount == 100_000_000
    assert validation.date_range is not None
    assert str(validation.date_range.min) == "2020-01-01" and str(validation.date_range.max) == "2030-12-31"
    assert validation.required == ["external_id", "direction"]
    assert pipeline.dedupe.cache == base / "state" / "cache.duckdb"
    assert pipeline.dedupe.within_source == "fail"
    target = pipeline.target
    assert target.database == base / "state" / "endclose.duckdb"
    assert target.environment == "sandbox"
    assert [(s.key, s.name, s.description) for s in target.streams] == [
        ("chase_operating", "Chase operating account", "main account")
    ]
    assert (target.on_conflict, target.chunk_size, target.concurrency) == ("error", 500, 2)
    assert (target.timeout_seconds, target.poll_timeout_seconds) == (5.0, 60.0)
    assert pipeline.report.dir == base / "out" / "reports"
    assert pipeline.report.formats == ["json", "parquet", "csv"]  # json is always written
    assert pipeline.fail_on.failed_rows == 10


def test_api_target(project: Path) -> None:
    target = {"type": "api", "base_url": "https://api.endclose.com/v1/", "api_key": SECRET}
    pipeline = load_pipeline(write(project, config(target=target)))

    assert pipeline.target.base_url == "https://api.endclose.com/v1"  # trailing slash stripped
    assert pipeline.target.api_key is not None
    assert pipeline.target.api_key.get_secret_value() == SECRET
    assert pipeline.target.database is None and pipeline.target.environment is None
    assert pipeline.describe_target() == {"type": "api", "base_url": "https://api.endclose.com/v1"}


def test_describe_local_target(project: Path) -> None:
    pipeline = load_pipeline(write(project, MINIMAL))
    assert pipeline.describe_target() == {
        "type": "local",
        "database": str(project.resolve() / ".loader" / "endclose.duckdb"),
        "environment": "default",
    }


def test_constants_and_defaults_in_mapping(project: Path) -> None:
    pipeline = load_pipeline(
        write(
            project,
            with_mapping(
                date={"value": "2024-03-01"},
                amount={"column": "cents", "unit": "minor", "default": 0},
                currency={"default": "eur"},
                direction={"column": "sign", "map": {1: "credit", -1: "debit"}},
                metadata={"column": "raw_json"},
            ),
        )
    )
    mapping = pipeline.mapping
    assert str(mapping.date.value) == "2024-03-01"
    assert mapping.amount.default == Decimal(0)
    assert mapping.currency is not None and mapping.currency.default == "EUR"
    # YAML reads 1 and -1 as numbers; they are compared with the column as text
    assert mapping.direction is not None and mapping.direction.map == {"1": "credit", "-1": "debit"}
    assert mapping.metadata is not None and mapping.metadata.column == "raw_json"


def test_yaml_aliases_and_merge_keys_of_normal_size_are_fine(project: Path) -> None:
    text = """\
version: 1
name: aliases
source: {path: data/a.csv}
mapping:
  date: &text {column: posted_at}
  data_stream_key: {value: s}
  amount: {<<: *text, unit: minor}
  description: *text
"""
    mapping = load_pipeline(write(project, text)).mapping
    assert mapping.amount.column == "posted_at" and mapping.amount.unit == "minor"
    assert mapping.description is not None and mapping.description.column == "posted_at"


# --------------------------------------------------------------------------
# paths and formats
# --------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_yaml_folder_not_the_cwd(
    project: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    sections = config(
        dedupe={"cache": "state/c.duckdb"},
        target={"database": "../db/e.duckdb"},
        report={"dir": "out"},
    )
    pipeline = load_pipeline(write(project, sections))

    base = project.resolve()
    assert pipeline.source.files[0].parent == base / "data"
    assert pipeline.dedupe.cache == base / "state" / "c.duckdb"
    assert pipeline.target.database == base.parent / "db" / "e.duckdb"
    assert pipeline.report.dir == base / "out"


def test_glob_matches_files_only_sorted_and_recursively(tmp_path: Path) -> None:
    for relative in ["in/2024/02.csv", "in/2024/01.csv", "in/2023/12.csv", "in/notes.txt"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("a\n")
    (tmp_path / "in" / "dir.csv").mkdir()  # a folder named like a match
    pipeline = load_pipeline(write(tmp_path, config(source={"path": "in/**/*.csv"})))

    base = tmp_path.resolve()
    assert pipeline.source.files == [base / "in/2023/12.csv", base / "in/2024/01.csv", base / "in/2024/02.csv"]


def test_glob_matching_nothing(project: Path) -> None:
    error = config_error(project, config(source={"path": "data/*.parquet"}))
    assert error.problems == [
        ("source.path", f"no file matches {project.resolve() / 'data' / '*.parquet'}")
    ]


def test_missing_plain_file(project: Path) -> None:
    error = config_error(project, config(source={"path": "data/missing.csv"}))
    assert [path for path, _ in error.problems] == ["source.path"]
    assert error.problems[0][1].startswith("no file matches")


def test_source_path_that_is_a_folder(project: Path) -> None:
    error = config_error(project, config(source={"path": "data"}))
    assert error.problems[0][0] == "source.path"
    assert "is a folder; use a glob" in error.problems[0][1]


@pytest.mark.parametrize(
    ("file_name", "expected_format", "separator"),
    [
        ("x.csv", "csv", ","),
        ("x.CSV", "csv", ","),
        ("x.tsv", "csv", "\t"),
        ("x.csv.gz", "csv", ","),
        ("x.parquet", "parquet", None),
        ("x.pq", "parquet", None),
        ("x.ndjson", "ndjson", None),
        ("x.jsonl", "ndjson", None),
        ("x.json", "json", None),
    ],
)
def test_format_inferred_from_the_extension(
    tmp_path: Path, file_name: str, expected_format: str, separator: str | None
) -> None:
    (tmp_path / file_name).write_text("")
    source = load_pipeline(write(tmp_path, config(source={"path": file_name}))).source
    assert source.format == expected_format
    if separator is None:
        assert source.csv is None
    else:
        assert source.csv is not None and source.csv.separator == separator


def test_tsv_is_tab_separated_with_an_explicit_csv_format(tmp_path: Path) -> None:
    (tmp_path / "x.tsv").write_text("")
    source = load_pipeline(write(tmp_path, config(source={"path": "x.tsv", "format": "csv"}))).source
    assert source.csv is not None and source.csv.separator == "\t"


def test_explicit_separator_wins_over_tsv(tmp_path: Path) -> None:
    (tmp_path / "x.tsv").write_text("")
    source = load_pipeline(
        write(tmp_path, config(source={"path": "x.tsv", "csv": {"separator": "|"}}))
    ).source
    assert source.csv is not None and source.csv.separator == "|"


def test_unknown_extension_needs_a_format(tmp_path: Path) -> None:
    (tmp_path / "x.xlsx").write_text("")
    error = config_error(tmp_path, config(source={"path": "x.xlsx"}))
    assert [path for path, _ in error.problems] == ["source.format"]
    assert "set source.format to one of: csv, parquet, ndjson, json" in error.problems[0][1]

    pipeline = load_pipeline(write(tmp_path, config(source={"path": "x.xlsx", "format": "csv"})))
    assert pipeline.source.format == "csv"


def test_query_source(tmp_path: Path) -> None:
    pipeline = load_pipeline(write(tmp_path, config(source={"query": "select 1 as amount"})))
    assert pipeline.source.query == "select 1 as amount"
    assert pipeline.source.path is None and pipeline.source.files == []
    assert pipeline.source.format is None


# --------------------------------------------------------------------------
# one error, one key path
# --------------------------------------------------------------------------

API = {"type": "api", "base_url": "https://api.endclose.com/v1", "api_key": SECRET}

ERROR_CASES = [
    (with_mapping(amount={"column": "amount"}), "mapping.amount.unit", "field required"),
    (config(version=None), "version", "field required"),
    (config(version=2), "version", "must be 1"),
    (config(name="Chase Ops"), "name",
     "must use only lowercase letters, digits, '_' and '-' (it names the reports)"),
    (config(mappings={}), "mappings", "unknown key (did you mean 'mapping'?)"),
    (config(source={"path": "data/*.csv", "csv": {"seperator": ";"}}),
     "source.csv.seperator", "unknown key (did you mean 'separator'?)"),
    (config(source={"path": "data/*.csv", "csv": {"separator": ";;"}}),
     "source.csv.separator", 'must be exactly one character (write "\\t" for a tab)'),
    (config(source={"path": "data/*.csv", "csv": {"encoding": "utf16"}}),
     "source.csv.encoding", "must be one of: utf8, utf8-lossy, latin1"),
    (config(source={"path": "data/*.csv", "query": "select 1"}), "source",
     "set either path or query, not both"),
    (config(source={}), "source", "needs path (a file or glob) or query (DuckDB SQL)"),
    (config(source={"query": "select 1", "format": "csv"}), "source.format",
     "only for source.path (a query reads its own files)"),
    (config(source={"path": "data/*.csv", "format": "xlsx"}), "source.format",
     "must be one of: csv, parquet, ndjson, json"),
    (config(source={"path": "data/*.csv", "format": "parquet", "csv": {}}), "source.csv",
     "only for format csv"),
    # `files` is computed from the glob, never read from the YAML.
    (config(source={"path": "data/*.csv", "files": ["x.csv"]}), "source.files",
     "unknown key (expected one of: path, query, format, csv)"),
    (config(transform={"sql": " "}), "transform.sql", "must not be empty"),
    (with_mapping(description="memo"), "mapping.description",
     "must be a mapping: use {column: memo} or {value: ...}"),
    (with_mapping(date={"column": "d", "value": "2024-01-01"}), "mapping.date",
     "set either column or value, not both"),
    (with_mapping(date={"default": "2024-01-01"}), "mapping.date",
     "needs column (a source column) or value (a constant)"),
    (with_mapping(data_stream_key={}), "mapping.data_stream_key",
     "needs column (a source column) or value (a constant)"),
    (with_mapping(date={"column": "d", "format": "mm/dd"}), "mapping.date.format",
     'must be a strftime pattern such as "%m/%d/%Y"'),
    (with_mapping(amount={"column": "a", "unit": "cents"}), "mapping.amount.unit",
     "must be one of: major, minor"),
    (with_mapping(amount={"value": "1,234.56", "unit": "major"}), "mapping.amount.value",
     "must be a number"),
    (with_mapping(amount={"column": "a", "unit": "minor", "default": 1.5}),
     "mapping.amount.default", "must be a whole number of minor units (unit: minor)"),
    (with_mapping(currency={"default": "dollars"}), "mapping.currency.default",
     "must be an ISO 4217 currency code such as USD"),
    (with_mapping(currency={}), "mapping.currency", "needs column, value or default"),
    (with_mapping(direction={"column": "x", "map": {"DR": "debt"}}), "mapping.direction.map.DR",
     "must be one of: credit, debit"),
    (with_mapping(direction={"value": "out"}), "mapping.direction.value",
     "must be one of: credit, debit"),
    (with_mapping(metadata={"columns": ["a"], "column": "b"}), "mapping.metadata",
     "set either columns or column, not both"),
    (with_mapping(metadata=["a", "b"]), "mapping.metadata", "must be a mapping: use {columns: [a, b]}"),
    (with_mapping(metadata={"columns": []}), "mapping.metadata.columns", "must not be empty"),
    (with_mapping(memo={"column": "m"}), "mapping.memo",
     "unknown key (expected one of: date, data_stream_key, amount, currency, direction, "
     "description, external_id, metadata)"),
    (config(validation={"max_abs_amount": 0}), "validation.max_abs_amount", "must be greater than 0"),
    (config(validation={"date_range": {"min": "2030-01-01", "max": "2020-01-01"}}),
     "validation.date_range", "min 2030-01-01 is after max 2020-01-01"),
    (config(validation={"date_range": {"min": "soon"}}), "validation.date_range.min",
     "must be a date (YYYY-MM-DD)"),
    (config(validation={"required": ["external_id", "memo"]}), "validation.required.1",
     "must be one of: date, data_stream_key, amount, currency, direction, description, "
     "external_id, metadata"),
    (config(dedupe={"within_source": "last"}), "dedupe.within_source", "must be one of: first, fail"),
    (config(dedupe={"cache": ""}), "dedupe.cache", "must not be empty"),
    (config(target={"type": "remote"}), "target.type", "must be one of: local, api"),
    (config(target={"on_conflict": "ignore"}), "target.on_conflict", "must be one of: skip, error"),
    (config(target={"chunk_size": 1001}), "target.chunk_size", "must be at most 1000"),
    (config(target={"chunk_size": 0}), "target.chunk_size", "must be at least 1"),
    (config(target={"chunk_size": "many"}), "target.chunk_size", "must be a whole number"),
    (config(target={"concurrency": 0}), "target.concurrency", "must be at least 1"),
    (config(target={"timeout_seconds": 0}), "target.timeout_seconds", "must be greater than 0"),
    (config(target={"poll_timeout_seconds": -1}), "target.poll_timeout_seconds",
     "must be greater than 0"),
    (config(target={"streams": [{"name": "Chase"}]}), "target.streams.0.key", "field required"),
    (config(target={"streams": [{"key": "a", "name": "A"}, {"key": "a", "name": "B"}]}),
     "target.streams.1.key", "duplicate stream key a"),
    (config(target={"base_url": "https://x.test"}), "target.base_url", "only for target.type api"),
    (config(target={"api_key": "k"}), "target.api_key", "only for target.type api"),
    (config(target={**API, "database": "x.duckdb"}), "target.database", "only for target.type local"),
    (config(target={**API, "streams": []}), "target.streams", "only for target.type local"),
    (config(target={"type": "api", "base_url": "https://x.test"}), "target.api_key",
     "field required when target.type is api"),
    (config(target={"type": "api", "api_key": "k"}), "target.base_url",
     "field required when target.type is api"),
    (config(target={**API, "base_url": "api.endclose.com"}), "target.base_url",
     "must be an http(s) URL such as https://api.endclose.com/v1"),
    (config(report={"formats": ["json", "pdf"]}), "report.formats.1",
     "must be one of: json, parquet, csv, html"),
    (config(report="reports"), "report", "must be a mapping"),
    (config(fail_on={"failed_rows": -1}), "fail_on.failed_rows", "must be at least 0"),
]


@pytest.mark.parametrize(("content", "key_path", "message"), ERROR_CASES,
                         ids=[case[1] + ":" + case[2][:30] for case in ERROR_CASES])
def test_each_error_names_its_key(project: Path, content: dict[str, Any], key_path: str,
                                  message: str) -> None:
    error = config_error(project, content)
    assert error.problems == [(key_path, message)]
    assert f"{key_path}: {message}" in str(error)
    assert error.file == str(project / "pipeline.yaml")


def test_all_problems_are_collected(project: Path) -> None:
    content = with_mapping(amount={"column": "amount"}, description="memo")
    content["target"] = {"on_conflict": "ignore", "chunk_size": 5000, "base_url": "https://x.test"}
    content["report"] = {"formats": ["pdf"]}
    content["source"] = {"path": "data/*.csv", "csv": {"seperator": ";"}}
    error = config_error(project, content)
    assert set(error.problems) == {
        ("source.csv.seperator", "unknown key (did you mean 'separator'?)"),
        ("mapping.amount.unit", "field required"),
        ("mapping.description", "must be a mapping: use {column: memo} or {value: ...}"),
        ("target.base_url", "only for target.type api"),
        ("target.on_conflict", "must be one of: skip, error"),
        ("target.chunk_size", "must be at most 1000"),
        ("report.formats.0", "must be one of: json, parquet, csv, html"),
    }
    assert str(error).count("\n") == 7  # a header line and one line per problem


def test_yaml_syntax_error_has_line_and_column(project: Path) -> None:
    error = config_error(project, "version: 1\nname: x\nsource: {path: [a, b}\n")
    assert len(error.problems) == 1
    path, message = error.problems[0]
    assert path == ""
    assert message.startswith("invalid YAML at line 3, column ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty; a pipeline needs version, name, source and mapping"),
        ("- version: 1\n", "the top level must be a mapping (version: 1, name: ..., source: ...), not a list"),
        ("just a string\n", "the top level must be a mapping (version: 1, name: ..., source: ...), "
                            "not a single value"),
    ],
)
def test_top_level_must_be_a_mapping(project: Path, text: str, message: str) -> None:
    assert config_error(project, text).problems == [("", message)]


def test_control_characters_are_refused_with_their_position(project: Path) -> None:
    error = config_error(project, "version: 1\nname: a\x07b\n")
    assert error.problems == [
        ("", "invalid YAML at line 2, column 8: character #x0007 is not allowed "
             "(control characters are not allowed)")
    ]


def test_several_documents_are_refused(project: Path) -> None:
    error = config_error(project, yaml.safe_dump(MINIMAL) + "---\nversion: 1\n")
    assert "expected a single document in the stream, but found another document" in str(error)


def test_unsafe_tags_are_refused(project: Path) -> None:
    error = config_error(project, "version: !!python/object/apply:os.system ['true']\n")
    assert "could not determine a constructor" in str(error)


def test_duplicate_keys_are_errors(project: Path) -> None:
    text = yaml.safe_dump(MINIMAL, sort_keys=False) + "name: other_name\n"
    error = config_error(project, text)
    assert error.problems == [("name", "duplicate key (first on line 2)")]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_pipeline(tmp_path / "nope.yaml")
    assert excinfo.value.problems == [("", "file not found")]
    assert excinfo.value.exit_code == 2


# --------------------------------------------------------------------------
# ${NAME}
# --------------------------------------------------------------------------


def test_vars_win_over_the_environment(project: Path) -> None:
    content = config(name="${NAME}", target={"environment": "${ENV}-${REGION}"})
    pipeline = load_pipeline(
        write(project, content),
        {"NAME": "from_vars", "ENV": "prod"},
        environ={"NAME": "from_environ", "ENV": "dev", "REGION": "eu"},
    )
    assert pipeline.name == "from_vars"
    assert pipeline.target.environment == "prod-eu"


def test_environ_defaults_to_os_environ(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOADER_TEST_STREAM", "from_os_environ")
    content = with_mapping(data_stream_key={"value": "${LOADER_TEST_STREAM}"})
    pipeline = load_pipeline(write(project, content))
    assert pipeline.mapping.data_stream_key.value == "from_os_environ"


def test_interpolated_numbers_are_coerced(project: Path) -> None:
    content = config(target={"chunk_size": "${CHUNK}"}, fail_on={"failed_rows": "${MAX_FAILED}"})
    pipeline = load_pipeline(write(project, content), {"CHUNK": "500", "MAX_FAILED": "3"}, environ={})
    assert pipeline.target.chunk_size == 500
    assert pipeline.fail_on.failed_rows == 3


def test_interpolation_reaches_lists_and_paths(project: Path) -> None:
    content = config(
        source={"path": "${DIR}/*.csv"},
        target={"streams": [{"key": "${STREAM}", "name": "Stream ${STREAM}"}]},
    )
    pipeline = load_pipeline(write(project, content), {"DIR": "data", "STREAM": "ops"}, environ={})
    assert len(pipeline.source.files) == 2
    assert [(s.key, s.name) for s in pipeline.target.streams] == [("ops", "Stream ops")]


def test_unresolved_variable_names_the_key(project: Path) -> None:
    content = config(target={"type": "api", "base_url": "https://x.test",
                             "api_key": "${ENDCLOSE_API_KEY}", "chunk_size": "${CHUNK}"})
    error = config_error(project, content, environ={"CHUNK": "10"})
    # One problem per key: the unresolved text is not also reported as invalid.
    assert error.problems == [
        ("target.api_key", "${ENDCLOSE_API_KEY} is not set; pass --var ENDCLOSE_API_KEY=... "
                           "or set the environment variable"),
    ]


def test_unresolved_variable_in_a_number_is_reported_once(project: Path) -> None:
    error = config_error(project, config(target={"chunk_size": "${CHUNK}"}), environ={})
    assert error.problems == [
        ("target.chunk_size", "${CHUNK} is not set; pass --var CHUNK=... or set the environment variable")
    ]


def test_dollar_dollar_is_a_literal(project: Path) -> None:
    content = config(transform={"sql": "select '$${NOT_A_VAR}' as t, '${WHO}' as w from source"})
    pipeline = load_pipeline(write(project, content), {"WHO": "me"}, environ={})
    assert pipeline.transform is not None
    assert pipeline.transform.sql == "select '${NOT_A_VAR}' as t, 'me' as w from source"


def test_substituted_values_are_not_interpolated_again(project: Path) -> None:
    content = with_mapping(description={"value": "${N}"})
    pipeline = load_pipeline(write(project, content), {"N": "${X}"}, environ={"X": "no"})
    assert pipeline.mapping.description is not None
    assert pipeline.mapping.description.value == "${X}"


def test_shared_alias_values_are_interpolated_once(project: Path) -> None:
    text = yaml.safe_dump(MINIMAL, sort_keys=False) + (
        "transform: {sql: &q \"select '$${A}' from source\"}\n"
        "target: {environment: *q}\n"
    )
    pipeline = load_pipeline(write(project, text), environ={})
    assert pipeline.transform is not None and pipeline.transform.sql == "select '${A}' from source"
    assert pipeline.target.environment == "select '${A}' from source"


def test_malformed_reference(project: Path) -> None:
    error = config_error(project, config(name="${not valid}"), environ={})
    assert error.problems[0][0] == "name"
    assert "is not a valid reference" in error.problems[0][1]


# --------------------------------------------------------------------------
# YAML alias bombs
# --------------------------------------------------------------------------

BILLION_LAUGHS = """\
version: 1
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
name: "${NAME}"
"""


def test_alias_bomb_is_refused_fast(project: Path) -> None:
    started = time.perf_counter()
    error = config_error(project, BILLION_LAUGHS, environ={})
    elapsed = time.perf_counter() - started
    # 9**9 = 387 million strings if expanded; refusing must not expand them.
    assert elapsed < 2.0
    assert error.problems == [
        ("", "the file uses too many YAML aliases: they would expand to more than 100000 values")
    ]


def test_recursive_alias_is_refused(project: Path) -> None:
    error = config_error(project, "version: 1\nloop: &x [1, *x]\n")
    assert error.problems == [("", "the file uses a recursive YAML alias (an anchor inside itself)")]


# --------------------------------------------------------------------------
# the api key stays secret
# --------------------------------------------------------------------------


def test_api_key_never_shows(project: Path) -> None:
    pipeline = load_pipeline(write(project, config(target=API)))

    assert SECRET not in repr(pipeline)
    assert SECRET not in str(pipeline)
    assert SECRET not in str(pipeline.target)
    assert SECRET not in repr(pipeline.target)
    assert SECRET not in pipeline.model_dump_json()
    assert SECRET not in str(pipeline.model_dump())
    assert SECRET not in str(pipeline.describe_target())
    assert SECRET not in pipeline.target_key


def test_api_key_from_a_variable_never_shows_in_errors(project: Path) -> None:
    content = config(target={**API, "api_key": "${ENDCLOSE_API_KEY}", "chunk_size": 0,
                             "concurrency": "${ENDCLOSE_API_KEY}"},
                     report={"formats": ["${ENDCLOSE_API_KEY}"]})
    error = config_error(project, content, vars={"ENDCLOSE_API_KEY": SECRET}, environ={})
    assert ("target.chunk_size", "must be at least 1") in error.problems
    assert ("target.concurrency", "must be a whole number") in error.problems
    assert len(error.problems) == 3
    assert SECRET not in str(error)
    assert SECRET not in repr(error.problems)
    # The ValidationError underneath (which prints inputs) is not chained.
    assert error.__cause__ is None and error.__suppress_context__


def test_api_key_not_in_a_validation_error_built_in_python() -> None:
    # Short and first, so that pydantic's truncation of long inputs can't hide it.
    secret = "hunter2"
    with pytest.raises(ValidationError) as excinfo:
        TargetConfig(api_key=secret, type="api", base_url="https://x.test", chunk_size=0)
    assert "chunk_size: must be at least 1" in str(excinfo.value)
    assert secret not in str(excinfo.value)


# --------------------------------------------------------------------------
# target identity
# --------------------------------------------------------------------------


def target_key_of(folder: Path, target: dict[str, Any]) -> str:
    return load_pipeline(write(folder, config(target=target))).target_key


def test_target_key_of_local_targets(project: Path) -> None:
    default = target_key_of(project, {})
    assert default == f"local:{project.resolve() / '.loader' / 'endclose.duckdb'}#default"
    assert target_key_of(project, {"environment": "default"}) == default
    other_environment = target_key_of(project, {"environment": "sandbox"})
    other_database = target_key_of(project, {"database": "other.duckdb"})
    assert len({default, other_environment, other_database}) == 3


def test_target_key_of_api_targets(project: Path) -> None:
    key_a = target_key_of(project, API)
    fingerprint = hashlib.sha256(SECRET.encode()).hexdigest()[:12]
    assert key_a == f"api:https://api.endclose.com/v1#{fingerprint}"
    assert target_key_of(project, {**API, "base_url": "https://api.endclose.com/v1/"}) == key_a
    key_b = target_key_of(project, {**API, "api_key": SECRET + "x"})
    other_url = target_key_of(project, {**API, "base_url": "https://staging.endclose.com/v1"})
    assert len({key_a, key_b, other_url, target_key_of(project, {})}) == 4


# --------------------------------------------------------------------------
# --var, sections from Python, parse_pipeline
# --------------------------------------------------------------------------


def test_parse_var_assignments() -> None:
    assert parse_var_assignments(["A=1", "SQL=a=b", "EMPTY=", "A=2"]) == {
        "A": "2",
        "SQL": "a=b",
        "EMPTY": "",
    }
    assert parse_var_assignments([]) == {}


def test_parse_var_assignments_errors() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_var_assignments(["OK=1", "ENDCLOSE_API_KEY", SECRET, "1BAD=x"])
    assert excinfo.value.exit_code == 2
    assert excinfo.value.problems == [
        ("--var", "expected NAME=VALUE, but --var number 2 has no '='"),
        ("--var", "expected NAME=VALUE, but --var number 3 has no '='"),
        ("--var", "'1BAD' is not a variable name (letters, digits and _)"),
    ]
    assert SECRET not in str(excinfo.value)  # a value pasted without its name is not echoed


def test_record_fields_are_the_mapping_fields() -> None:
    assert tuple(MappingConfig.model_fields) == RECORD_FIELDS


def test_parse_section_mapping_from_a_dict() -> None:
    mapping = parse_section(
        MappingConfig,
        {"date": {"column": "d"}, "data_stream_key": {"value": "s"},
         "amount": {"column": "a", "unit": "minor"}},
        "mapping",
    )
    assert isinstance(mapping, MappingConfig)
    assert mapping.amount.unit == "minor"

    with pytest.raises(ConfigError) as excinfo:
        parse_section(MappingConfig, {"date": {"column": "d"}, "data_stream_key": "s",
                                      "amount": {"column": "a"}}, "mapping")
    assert excinfo.value.problems == [
        ("mapping.data_stream_key", "must be a mapping: use {column: s} or {value: ...}"),
        ("mapping.amount.unit", "field required"),
    ]


def test_parse_section_target_resolves_against_base_dir(tmp_path: Path) -> None:
    target = parse_section(TargetConfig, {"database": "db.duckdb"}, "target", base_dir=tmp_path)
    assert target.database == tmp_path.resolve() / "db.duckdb"
    assert target.target_key == f"local:{tmp_path.resolve() / 'db.duckdb'}#default"


def test_parse_section_source_no_match(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_section(SourceConfig, {"path": "*.csv"}, "source", base_dir=tmp_path)
    assert excinfo.value.problems == [("source.path", f"no file matches {tmp_path.resolve() / '*.csv'}")]


def test_parse_pipeline_from_text(project: Path) -> None:
    pipeline = parse_pipeline(yaml.safe_dump(MINIMAL), base_dir=project)
    assert isinstance(pipeline, Pipeline)
    assert pipeline.path is None
    assert pipeline.base_dir == project.resolve()
    assert len(pipeline.source.files) == 2

    with pytest.raises(ConfigError) as excinfo:
        parse_pipeline(yaml.safe_dump(config(version=3)), base_dir=project, file="inline.yaml")
    assert excinfo.value.file == "inline.yaml"
    assert str(excinfo.value) == "inline.yaml: version: must be 1"
