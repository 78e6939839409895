"""Progress of a run: a rich status line on stderr in a terminal, an updating line in Jupyter."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ProgressCallback = Callable[[dict], None]


def describe(event: dict) -> str:
    return (f"{event['rows']:,} rows: {event['successful']:,} successful, "
            f"{event['failed']:,} failed, {event['skipped']:,} skipped")


@contextmanager
def terminal_progress(*, force: bool = False) -> Iterator[ProgressCallback | None]:
    """Yield a progress callback for `run_pipeline`, or None when there is nowhere to show it.

    In a Jupyter kernel the line is a display that updates in place (no widgets
    needed); elsewhere rich draws it on stderr, when stderr is a terminal or
    `force` is set.
    """
    if force and _in_jupyter():
        yield from _jupyter_progress()
        return
    if not (force or sys.stderr.isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("reading source", total=None)
        yield lambda event: progress.update(task, description=describe(event))


def _in_jupyter() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()  # type: ignore[attr-defined]
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _jupyter_progress() -> Iterator[ProgressCallback]:
    from IPython.display import display

    handle = display({"text/plain": "loader: reading source"}, raw=True, display_id=True)

    def update(event: dict) -> None:
        handle.update({"text/plain": "loader: " + describe(event)}, raw=True)

    yield update
