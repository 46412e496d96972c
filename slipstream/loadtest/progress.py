"""Progress display: a rich bar on a terminal, a few plain lines otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

ProgressFn = Callable[[int, int], None]


@contextmanager
def progress_display(description: str, stream: TextIO | None = None) -> Iterator[ProgressFn]:
    """Yield a `(done, total)` callback that draws progress for one run."""
    out = stream or sys.stderr
    if out.isatty():
        with _rich_bar(description, out) as update:
            yield update
        return
    yield plain_lines(description, out)


@contextmanager
def _rich_bar(description: str, out: TextIO) -> Iterator[ProgressFn]:
    from rich.console import Console  # only on a terminal: rich is slow to import
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=out), transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def plain_lines(description: str, out: TextIO) -> ProgressFn:
    # About ten lines per run: enough to see it move in CI logs without flooding them.
    def update(done: int, total: int) -> None:
        step = max(1, total // 10)
        if done % step == 0 or done == total:
            print(f"{description}: {done}/{total} requests done", file=out, flush=True)

    return update
