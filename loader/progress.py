"""Progress of a run, shown with rich on stderr when it is a terminal (and in notebooks)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def terminal_progress(*, force: bool = False) -> Iterator[Callable[[dict], None] | None]:
    """Yield a progress callback for `run_pipeline`, or None when stderr is not a terminal."""
    if not (force or sys.stderr.isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("reading source", total=None)

        def update(event: dict) -> None:
            progress.update(task, description=(
                f"{event['rows']:,} rows: {event['successful']:,} successful, "
                f"{event['failed']:,} failed, {event['skipped']:,} skipped"))

        yield update
