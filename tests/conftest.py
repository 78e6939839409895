"""Shared fixtures: pipelines written to temp folders, and the CLI as a user runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HEADER = ["posted", "txn_id", "memo", "amount", "ccy", "dr_cr"]

# A small messy export: several currencies, id-less and identical rows, a repeated id, two bad rows.
SAMPLE_ROWS = [
    ["2024-01-02", "T1", "Payroll", "100.50", "USD", "DR"],
    ["2024-01-03", "T2", "Refund", "20", "EUR", "CR"],
    ["2024-01-04", "T3", "Vendor", "1500", "JPY", "DR"],
    ["2024-01-05", "T4", "Rent", "1.234", "BHD", "DR"],
    ["2024-01-06", "", "Fee", "0.99", "USD", "DR"],
    ["2024-01-06", "", "Fee", "0.99", "USD", "DR"],  # an identical id-less row: a second record
    ["2024-01-07", "T1", "Payroll again", "100.50", "USD", "DR"],  # repeated id
    ["2024-13-01", "T5", "Bad date", "1.00", "USD", "DR"],
    ["2024-01-08", "T6", "Too precise", "1.001", "USD", "CR"],
]


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def pipeline_config(**overrides) -> dict:
    config = {
        "version": 1,
        "name": "test_pipeline",
        "source": {"path": "data/*.csv"},
        "mapping": {
            "date": {"column": "posted"},
            "data_stream_key": {"value": "ops"},
            "amount": {"column": "amount", "unit": "major"},
            "currency": {"column": "ccy", "default": "USD"},
            "direction": {"column": "dr_cr", "map": {"DR": "debit", "CR": "credit"}},
            "description": {"column": "memo"},
            "external_id": {"column": "txn_id"},
        },
        "target": {
            "type": "local",
            "database": ".loader/endclose.duckdb",
            "streams": [{"key": "ops", "name": "Operating"}],
            "chunk_size": 3,
        },
        "report": {"formats": ["json", "parquet", "csv", "html"]},
        "fail_on": {"failed_rows": 1000},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return config


@pytest.fixture
def make_pipeline(tmp_path):
    """Write data files and a pipeline.yaml into tmp_path; return the YAML's path."""

    def make(files: dict[str, list[list[str]]], **overrides) -> Path:
        for name, rows in files.items():
            write_csv(tmp_path / "data" / name, rows)
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(pipeline_config(**overrides), sort_keys=False))
        return path

    return make


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`loader ARGS` in a real subprocess, as a user types it."""
    return subprocess.run([sys.executable, "-m", "loader", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout)
