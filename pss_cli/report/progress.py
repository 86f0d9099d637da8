"""Progress on stderr, only when stderr is a terminal (so logs and pipes stay clean).

One bar for a scan: matrices done of total, tensor bytes read of total, read speed, elapsed time
and ETA. The bytes come from the headers (each matrix's share of its tensor), so the bar and its
ETA move by data, not by matrix count: one 32000x4096 embedding weighs as much as eight
4096x4096 projections.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pss_cli.pipeline import ProgressCallback


@contextmanager
def stderr_progress(
    enabled: bool = True, label: str = "scanning"
) -> Iterator[ProgressCallback | None]:
    """A progress callback drawing on stderr, or None when disabled or stderr is not a TTY."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    console = Console(stderr=True)
    with Progress(
        TextColumn(label, markup=False),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[matrices]}", markup=False),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA", markup=False),
        TimeRemainingColumn(),
        TextColumn("{task.description}", markup=False),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None, matrices="")

        def update(
            done: int, total: int, name: str, bytes_done: int = 0, bytes_total: int = 0
        ) -> None:
            # Without byte counts (callers that only count matrices), matrices drive the bar.
            completed, whole = (bytes_done, bytes_total) if bytes_total else (done, total)
            bar.update(
                task,
                completed=completed,
                total=whole,
                description=name,
                matrices=f"{done}/{total} matrices",
            )

        yield update
