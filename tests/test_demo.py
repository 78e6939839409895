"""The README's demo pipelines, run as a user runs them (in a copy of pipelines/demo)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx

from conftest import run_cli, summary_of
from serve_fixture import running_server

DEMO = Path(__file__).resolve().parent.parent / "pipelines" / "demo"


def copy_demo(tmp_path: Path) -> Path:
    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder, ignore=shutil.ignore_patterns(".loader", "reports"))
    return folder


def test_the_local_demo_runs_and_a_rerun_loads_nothing(tmp_path):
    demo = copy_demo(tmp_path)
    first = run_cli("run", str(demo / "pipeline.yaml"), "--json")
    assert first.returncode == 0, first.stderr
    summary = summary_of(first)
    assert summary["totals"]["total"] == 74
    assert {r["reason_code"] for r in summary["reasons"]} == {"created", "invalid", "duplicate_in_source"}
    again = summary_of(run_cli("run", str(demo / "pipeline.yaml"), "--json"))
    assert again["totals"]["successful"] == 0
    assert {(r["reason_code"], r["rows"]) for r in again["reasons"] if r["outcome"] == "skipped"} >= {
        ("already_loaded", summary["totals"]["successful"])}


def test_the_api_demo_against_loader_serve_matches_the_local_one(tmp_path):
    demo = copy_demo(tmp_path)
    local = summary_of(run_cli("run", str(demo / "pipeline.yaml"), "--json"))
    (tmp_path / "server").mkdir()
    with running_server(tmp_path / "server", api_keys={"dev-key": "default"}) as server:
        httpx.post(f"{server.url}/data_streams", headers={"X-API-KEY": "dev-key"},
                   json={"key": "demo_operating", "name": "Demo operating account", "type": "api"}).raise_for_status()
        env = {**os.environ, "ENDCLOSE_BASE_URL": server.url, "ENDCLOSE_API_KEY": "dev-key"}
        result = run_cli("run", str(demo / "api.yaml"), "--json", env=env)
        assert result.returncode == 0, result.stderr
        api = summary_of(result)
        assert api["totals"] == local["totals"]
        assert api["reasons"] == local["reasons"]
        assert api["by_stream"] == local["by_stream"]
        assert "dev-key" not in result.stdout + result.stderr
