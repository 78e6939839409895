"""Every notebook in notebooks/ runs top to bottom, and the backfill notebook does what it says.

Each notebook is executed with nbclient in an IPython kernel of *this* interpreter (the
venv the tests run in, where `loader` is installed), with the notebook's own folder as
the working directory, as Jupyter does. Any cell that raises fails the test.

The notebooks run in a copy of `notebooks/` and `pipelines/` in a temporary folder, so a
test run never writes into the working tree (the backfill notebook creates
`pipelines/backfill/.loader` and `reports`) and two test runs never share a DuckDB
file. A notebook reaches the rest of the repository only through those folders; add a
folder to COPIED if one needs more.

Committed notebooks carry no outputs: `test_committed_notebook_has_no_outputs`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import duckdb
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COPIED = ("notebooks", "pipelines")
# State a notebook run leaves behind; never copied, so every run starts clean.
NOT_COPIED = shutil.ignore_patterns(".loader", "reports", ".ipynb_checkpoints", "__pycache__", "*.duckdb", "*.wal")
CELL_TIMEOUT = 300  # seconds; the backfill notebook takes a few seconds in all

REPORT_REPR = re.compile(
    r"Report\(run_id='[^']+', total=(?P<total>\d+), successful=(?P<successful>\d+), "
    r"failed=(?P<failed>\d+), skipped=(?P<skipped>\d+)\)"
)


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# -- running notebooks ------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    """Make the kernel `python3` run this interpreter, whatever other kernel specs say.

    A `python3` kernel spec found first on JUPYTER_PATH wins over a user's or the
    system's, which may point at another Python without `loader`. IPython's profile
    and the kernels' connection files go to the temporary folder too, so the kernel
    does not run a user's startup files.
    """
    home = tmp_path_factory.mktemp("jupyter")
    spec = home / "share" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (tests)",
        "language": "python",
    }))
    with pytest.MonkeyPatch.context() as mp:
        paths = [str(home / "share"), os.environ.get("JUPYTER_PATH", "")]
        mp.setenv("JUPYTER_PATH", os.pathsep.join(p for p in paths if p))
        mp.setenv("JUPYTER_RUNTIME_DIR", str(home / "runtime"))
        mp.setenv("IPYTHONDIR", str(home / "ipython"))
        yield "python3"


@pytest.fixture(scope="module")
def executed(kernel: str, tmp_path_factory: pytest.TempPathFactory):
    """`executed(path)` -> (the executed notebook, the folder it ran in); each notebook runs once."""
    runs: dict[str, tuple[nbformat.NotebookNode, Path]] = {}

    def run(path: Path) -> tuple[nbformat.NotebookNode, Path]:
        if path.name not in runs:
            workdir = tmp_path_factory.mktemp(path.stem)
            for folder in COPIED:
                shutil.copytree(ROOT / folder, workdir / folder, ignore=NOT_COPIED)
            notebook = nbformat.read(workdir / "notebooks" / path.name, as_version=4)
            client = NotebookClient(
                notebook,
                kernel_name=kernel,
                timeout=CELL_TIMEOUT,
                resources={"metadata": {"path": str(workdir / "notebooks")}},
            )
            client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
            runs[path.name] = (notebook, workdir)
        return runs[path.name]

    return run


def test_kernel_runs_this_interpreter(kernel: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec(kernel).argv[0] == sys.executable


def test_there_are_notebooks() -> None:
    assert (ROOT / "notebooks" / "backfill.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path: Path, executed) -> None:
    notebook, _ = executed(path)
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert all(cell.execution_count for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    with_outputs = [
        i for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not with_outputs, f"{path.name}: cells {with_outputs} have outputs; clear them before committing"
    assert "widgets" not in notebook.metadata, f"{path.name}: saved widget state; clear it before committing"


# -- the backfill notebook does what it says ------------------------------------------

BACKFILL = ROOT / "notebooks" / "backfill.ipynb"


@pytest.fixture(scope="module")
def backfill(executed) -> tuple[nbformat.NotebookNode, Path]:
    return executed(BACKFILL)


def _cell(notebook: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    cells = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _data(cell: nbformat.NotebookNode, mime: str) -> list[str]:
    return [o.data[mime] for o in cell.outputs if "data" in o and mime in o.data]


def _reports(cell: nbformat.NotebookNode) -> list[dict[str, int]]:
    """The totals of each Report the cell displayed (its text/plain repr), in order."""
    found = []
    for text in _data(cell, "text/plain"):
        match = REPORT_REPR.fullmatch(text.strip())
        if match:
            found.append({k: int(v) for k, v in match.groupdict().items()})
    return found


def _report_html(cell: nbformat.NotebookNode) -> list[str]:
    """The report views (Report._repr_html_) the cell displayed."""
    return [html for html in _data(cell, "text/html") if 'class="loader-report"' in html]


def _text(notebook: nbformat.NotebookNode) -> str:
    """Every text output of the notebook: streams and text/plain."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif "data" in output:
                parts.append(output.data.get("text/plain", ""))
    return "\n".join(parts)


def test_the_draft_mapping_fails_with_a_clear_reason_and_the_fix_leaves_three(backfill) -> None:
    notebook, _ = backfill
    draft = _cell(notebook, "draft-dry-run")
    [totals] = _reports(draft)
    assert totals["successful"] == 0 and totals["failed"] > totals["total"] // 2  # "most of the month failed"
    [view] = _report_html(draft)
    assert "dry run" in view and "Top failure reasons" in view
    assert "is not a date in format %m.%d.%Y" in _text(notebook)
    assert "TooManyFailures" not in _text(notebook)  # raise_for_failures was caught and printed, not raised
    assert re.search(r"\d+ rows failed, more than the 5 allowed", _text(notebook))

    [fixed] = _reports(_cell(notebook, "fixed-dry-run"))
    assert fixed == {"total": 66, "successful": 0, "failed": 3, "skipped": 63}  # "Three rows still fail"


def test_each_month_loads_and_shows_its_report(backfill) -> None:
    notebook, workdir = backfill
    january = _cell(notebook, "load-january")
    assert _reports(january) == [{"total": 66, "successful": 61, "failed": 3, "skipped": 2}]  # as the markdown says
    [view] = _report_html(january)
    assert "dry run" not in view and "Control totals" not in view  # the compact notebook view, not report.html
    others = _cell(notebook, "load-other-months")
    assert len(_reports(others)) == 2 and len(_report_html(others)) == 2
    assert all(r["failed"] <= 5 and r["successful"] > 0 for r in _reports(others))

    with duckdb.connect(str(workdir / "pipelines" / "backfill" / ".loader" / "endclose.duckdb"), read_only=True) as db:
        records, with_id, distinct_ids = db.execute(
            "select count(*), count(external_id), count(distinct external_id) from records"
        ).fetchone()
    created = sum(r["successful"] for r in [*_reports(january), *_reports(others)])
    assert records == created
    assert distinct_ids == with_id  # no id loaded twice, the overlap of January and February included


def test_running_a_month_again_loads_nothing(backfill) -> None:
    notebook, _ = backfill
    rerun = _cell(notebook, "rerun")
    assert _reports(rerun) == [{"total": 66, "successful": 0, "failed": 3, "skipped": 63}]
    assert len(_report_html(rerun)) == 1
    before = _data(_cell(notebook, "records-before"), "text/plain")[-1]
    after = _data(_cell(notebook, "records-after"), "text/plain")[-1]
    assert before == after and "records" in after


def test_progress_shows_in_the_notebook(backfill) -> None:
    notebook, _ = backfill
    outputs = _cell(notebook, "load-january").outputs
    texts = [o.get("data", {}).get("text/plain", "") for o in outputs if o.get("output_type") == "display_data"]
    # The progress line is one display, updated in place; it ends on the run's final counts.
    assert any(t.startswith("loader: 66 rows: ") for t in texts), texts
    assert "ipywidgets" not in json.dumps(outputs)
