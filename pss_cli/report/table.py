"""Rich table for people: worst stable rank first, flagged rows highlighted, one summary line."""

from __future__ import annotations

import io
import os
import shutil
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pss_cli.errors import count, printable
from pss_cli.results import Flag, LayerResult, ScanReport


def _fmt(value: float | None, digits: int = 3) -> str:
    """Fixed point for the usual range (a stable rank of 4096 stays 4096.00), else scientific."""
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


# Wider than any table pss prints (rich tables take their natural width up to the console's).
_UNBOUNDED_WIDTH = 1000


def _severity_key(layer: LayerResult) -> tuple[int, float]:
    # Non-finite and all-zero matrices first (no stable rank at all), then lowest stable rank.
    if layer.stable_rank is None:
        return (0, 0.0)
    return (1, layer.stable_rank)


def text_console(color: bool | None) -> tuple[Console, io.StringIO]:
    """A console rendering into a string: coloured and terminal-wide when `color` (None: when
    stdout is a terminal), else plain and as wide as the table needs (files, pipes, CI logs):
    a fixed 160 columns cut the trend table's sparklines and headers of a 40-checkpoint run
    there. COLUMNS, when set, is the width either way."""
    if color is None:
        color = sys.stdout.isatty()
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        width = int(columns)
    elif color:
        width = shutil.get_terminal_size((160, 24)).columns
    else:
        width = _UNBOUNDED_WIDTH
    buffer = io.StringIO()
    console = Console(
        file=buffer, force_terminal=color, no_color=not color, width=width, highlight=False
    )
    return console, buffer


def render_table(report: ScanReport, limit: int | None = None, color: bool | None = None) -> str:
    console, buffer = text_console(color)
    rows = sorted(report.layers, key=_severity_key)
    shown = rows[:limit] if limit is not None else rows
    k = report.settings.top_k
    table = Table(
        title=f"pss scan: {escape(report.checkpoint)}",
        caption=None,
        show_lines=False,
        header_style="bold",
    )
    table.add_column("layer", overflow="fold")
    table.add_column("role")
    table.add_column("shape", justify="right")
    table.add_column("dtype")
    table.add_column("stable rank", justify="right")
    table.add_column("sigma_max", justify="right")
    table.add_column("s1/s2", justify="right")
    table.add_column(f"top-{k} energy", justify="right")
    table.add_column("flags")
    for layer in shown:
        style = "bold red" if layer.flags else None
        table.add_row(
            # printable(): a newline or escape sequence in a tensor name must not split the
            # row or reach the terminal (hostile files name their tensors).
            Text(printable(layer.display_name)),
            layer.role,
            "x".join(str(d) for d in layer.matrix_shape),
            layer.dtype,
            _fmt(layer.stable_rank, 2),
            _fmt(layer.sigma_max, 4),
            _fmt(layer.sigma1_over_sigma2, 2),
            _fmt(layer.topk_energy_share, 3),
            ",".join(layer.flags) or "",
            style=style,
        )
    console.print(table)
    if limit is not None and len(rows) > limit:
        console.print(
            f"({len(rows) - limit} more layers not shown; drop --limit to see all)", soft_wrap=True
        )
    for skipped in report.skipped:
        if not skipped.dtype:  # not a tensor: a whole file, or a second set of weights
            console.print(Text(f"note: {skipped.file}: {skipped.reason}"), soft_wrap=True)
    # Last, so that `pss scan ... | tail -1` reads it (docs/smooth.md) whatever notes there are.
    console.print(_summary_line(report), soft_wrap=True)
    return buffer.getvalue()


def _summary_line(report: ScanReport) -> Text:
    s = report.summary
    floor = report.settings.min_stable_rank
    text = Text()
    text.append(f"{count(s.matrices, 'matrix', 'matrices')}, ")
    text.append(f"{s.flagged} flagged", style="bold red" if s.flagged else "bold green")
    low = s.flag_counts.get(Flag.LOW_STABLE_RANK, 0)
    others = [
        f"{s.flag_counts[flag]} {label}"
        for flag, label in ((Flag.NONFINITE, "with NaN/Inf"), (Flag.ZERO_MATRIX, "all-zero"))
        if s.flag_counts.get(flag)
    ]
    if others:
        reasons = ([f"{low} with stable rank < {floor}"] if low else []) + others
        text.append(f" ({', '.join(reasons)})")
    else:
        text.append(f" (stable rank < {floor})")
    text.append(f", {count(s.skipped, 'tensor')} skipped")
    if s.min_stable_rank is not None:
        lowest = printable(s.min_stable_rank_layer or "")
        text.append(f"; lowest stable rank {s.min_stable_rank:.2f} in {lowest}")
    text.append(f"; {report.method} on {report.device}, {report.timings['total_seconds']:.2f} s")
    return text
