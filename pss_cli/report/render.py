"""Dispatch from an output format to its renderer (a registry, not an if-chain in commands)."""

from __future__ import annotations

from collections.abc import Callable

from pss_cli.config import OutputFormat
from pss_cli.report.formats import renderer_for
from pss_cli.report.json_report import render_json
from pss_cli.report.table import render_table
from pss_cli.results import ScanReport

Renderer = Callable[[ScanReport, int | None, bool | None], str]

_RENDERERS: dict[OutputFormat, Renderer] = {
    OutputFormat.TABLE: render_table,
    OutputFormat.JSON: lambda report, _limit, _color: render_json(report),
}


def render_scan(
    report: ScanReport,
    output_format: OutputFormat,
    limit: int | None = None,
    color: bool | None = None,
) -> str:
    """The report as text; `color=None` means: colour only when stdout is a terminal."""
    return renderer_for("scan", _RENDERERS, output_format)(report, limit, color)
