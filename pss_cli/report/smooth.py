"""Renderers for `pss smooth`: the plan (stderr, before writing), the result, a resume recipe."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pss_cli.config import OutputFormat
from pss_cli.errors import count, printable
from pss_cli.report.formats import renderer_for
from pss_cli.report.table import _fmt
from pss_cli.results import SmoothReport, smooth_report_to_json_dict


def _console(buffer: io.StringIO, color: bool) -> Console:
    return Console(
        file=buffer, force_terminal=color, no_color=not color, width=160, highlight=False
    )


def _table(report: SmoothReport, title: str, after: bool) -> Table:
    table = Table(title=title, header_style="bold")
    table.add_column("layer", overflow="fold")
    table.add_column("role")
    table.add_column("shape", justify="right")
    table.add_column("k", justify="right")
    table.add_column("sigma_max", justify="right")
    table.add_column("stable rank", justify="right")
    table.add_column("target", justify="right")
    table.add_column("||dW||/||W||", justify="right")
    if after:
        table.add_column("verified")
    for layer in report.layers:
        if after:
            sigma = f"{_fmt(layer.sigma_max_before, 4)} -> {_fmt(layer.sigma_max_after, 4)}"
            rank = f"{_fmt(layer.stable_rank_before, 2)} -> {_fmt(layer.stable_rank_after, 2)}"
        else:
            sigma = _fmt(layer.sigma_max_before, 4)
            rank = f"{_fmt(layer.stable_rank_before, 2)} -> {_fmt(layer.predicted_stable_rank, 2)}"
        row: list[str | Text] = [
            # printable(): a newline or escape sequence in a tensor name must not split the
            # row or reach the terminal (hostile files name their tensors).
            Text(printable(layer.display_name)),
            layer.role,
            "x".join(str(d) for d in layer.matrix_shape),
            str(layer.k),
            sigma,
            rank,
            _fmt(layer.target_stable_rank, 2),
            _fmt(layer.relative_change, 3),
        ]
        if after:
            row.append("yes" if layer.verified else "NO")
        table.add_row(*row)
    return table


def render_plan(report: SmoothReport) -> str:
    buffer = io.StringIO()
    console = _console(buffer, sys.stderr.isatty())
    if not report.layers:
        console.print("pss smooth: no selected matrix needs smoothing", soft_wrap=True)
    else:
        console.print(
            _table(report, f"pss smooth plan ({report.method}): {escape(report.input)}", False)
        )
    for layer in report.layers:
        if layer.target_source is not None:
            console.print(
                Text(
                    f"target of {printable(layer.display_name)}: "
                    f"{_fmt(layer.target_stable_rank, 3)} = {layer.target_source}"
                ),
                soft_wrap=True,
            )
    for skipped in report.not_smoothed:
        console.print(Text(f"left alone: {skipped.name}: {skipped.reason}"), soft_wrap=True)
    return buffer.getvalue()


def render_smooth(report: SmoothReport, output_format: OutputFormat) -> str:
    return renderer_for("smooth", _RENDERERS, output_format)(report)


def _render_json(report: SmoothReport) -> str:
    return json.dumps(smooth_report_to_json_dict(report), indent=2, allow_nan=False) + "\n"


def _render_table(report: SmoothReport) -> str:
    buffer = io.StringIO()
    console = _console(buffer, sys.stdout.isatty())
    if report.dry_run:
        console.print(
            _table(report, f"pss smooth --dry-run ({report.method}): {report.input}", False)
        )
        for skipped in report.not_smoothed:
            console.print(f"left alone: {skipped.name}: {skipped.reason}", soft_wrap=True)
        console.print(
            f"dry run: {count(len(report.layers), 'matrix', 'matrices')} would change; "
            "nothing written",
            soft_wrap=True,
        )
        return buffer.getvalue()
    if report.layers:
        console.print(
            _table(report, f"pss smooth ({report.method}): {escape(str(report.output))}", True)
        )
        verified = sum(1 for layer in report.layers if layer.verified)
        console.print(
            Text(
                f"{count(len(report.layers), 'matrix', 'matrices')} smoothed "
                f"({verified} verified), "
                f"{count(report.untouched_tensors_verified, 'other tensor')} byte-identical to "
                "the input; "
                f"written to {report.output}"
            ),
            soft_wrap=True,
        )
    elif report.output is not None:  # --lr-scale alone: the weights copied as they are
        console.print(
            Text(
                f"no matrix smoothed; {count(report.untouched_tensors_verified, 'tensor')} "
                f"byte-identical to the input; written to {report.output}"
            ),
            soft_wrap=True,
        )
    for skipped in report.not_smoothed:
        console.print(Text(f"left alone: {skipped.name}: {skipped.reason}"), soft_wrap=True)
    for message in report.messages:
        console.print(Text(f"note: {message}"), soft_wrap=True)
    return buffer.getvalue()


def resume_recipe(report: SmoothReport) -> str:
    optimizer = report.optimizer
    reset = optimizer is not None and optimizer.resets_moments
    why = (
        "the reset Adam moments make the first updates ~lr*sign(g), larger than usual"
        if reset
        else "the repaired matrices meet gradients (and Adam moments) of the old weights"
        if report.layers
        else "the run went on to diverge at the old learning rate"
    )
    scaled = optimizer.lr_scale if optimizer is not None else None
    factor = scaled.get("factor") if scaled is not None else None
    lower = (
        f"its stored learning rates are already x{factor:g} (--lr-scale): resume from it as "
        "it is, or add gradient clipping"
        if isinstance(factor, float)
        else "resume at a lower learning rate (e.g. half; where the checkpoint stores "
        "optimizer or scheduler state, with `pss smooth ... --lr-scale 0.5`, because a trainer "
        "that restores that state ignores the LR you pass at resume; else in your training "
        "script) or with gradient clipping"
    )
    return (
        "To resume from the repaired checkpoint:\n"
        f"  - point your trainer at {report.output} (same layout and tensor names as the input);\n"
        f"  - {lower}: {why}; in "
        "docs/EXPERIMENTS.md smoothing alone at the same LR did not prevent a new explosion, "
        "while a lower LR or clipping did;\n"
        "  - consider skipping the data window around the spike;\n"
        "  - check the result with `pss scan` on the output, and the run with `pss trend`."
    )


_RENDERERS: dict[OutputFormat, Callable[[SmoothReport], str]] = {
    OutputFormat.TABLE: _render_table,
    OutputFormat.JSON: _render_json,
}
