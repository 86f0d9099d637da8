"""`pss trend` for people: warned layers with sparklines, then the verdict and what to run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

from rich.markup import escape
from rich.table import Table

from pss_cli.config import OutputFormat
from pss_cli.errors import count, printable
from pss_cli.report.formats import renderer_for
from pss_cli.report.table import text_console
from pss_cli.trend.guard_log import overlay_lines
from pss_cli.trend.series import COLLAPSE, HEALTHY, LayerTrend, TrendReport, trend_to_json_dict

_BARS = "▁▂▃▄▅▆▇█"
_QUIET_ROWS = 5  # healthy run: the layers closest to trouble


def sparkline(values: Sequence[float | None], log_scale: bool = False) -> str:
    """One character per value, scaled to the series' own range; a gap is a space."""

    def level(v: float) -> float:
        return math.log(v) if log_scale else v

    finite = [
        level(v) for v in values if v is not None and math.isfinite(v) and (v > 0 or not log_scale)
    ]
    if not finite:
        return " " * len(values)
    low, high = min(finite), max(finite)
    out = []
    for v in values:
        if v is None or not math.isfinite(v) or (log_scale and v <= 0):
            out.append(" ")
            continue
        x = 0.0 if high == low else (level(v) - low) / (high - low)
        out.append(_BARS[min(len(_BARS) - 1, int(x * len(_BARS)))])
    return "".join(out)


def render_trend(
    report: TrendReport, output_format: OutputFormat, color: bool | None = None
) -> str:
    """The trend report as text; `color=None` means: colour only when stdout is a terminal."""
    return renderer_for("trend", _RENDERERS, output_format)(report, color)


def _render_json(report: TrendReport, _color: bool | None) -> str:
    return json.dumps(trend_to_json_dict(report), indent=2, allow_nan=False) + "\n"


def render_trend_table(report: TrendReport, color: bool | None = None) -> str:
    console, buffer = text_console(color)
    steps = report.steps
    span = f"steps {steps[0]}..{steps[-1]}" if steps else "no steps"
    run = escape(printable(report.run))
    console.print(f"[bold]pss trend:[/] {run}  ({count(len(steps), 'checkpoint')}, {span})")
    cached = sum(1 for c in report.checkpoints if c.from_cache)
    failed = sum(1 for c in report.checkpoints if c.status == "failed")
    scanned = len(report.checkpoints) - cached - failed
    console.print(f"{scanned} scanned, {cached} from cache, {failed} unreadable")
    for checkpoint in report.checkpoints:
        if checkpoint.status == "failed":
            error = escape(printable(checkpoint.error or ""))
            console.print(f"[yellow]step {checkpoint.step}: not scanned: {error}[/]")
    warned = report.warned_layers
    rows = warned or _closest_to_trouble(report.layers)
    title = (
        "layers with warnings" if warned else "no warnings: the layers with the lowest stable rank"
    )
    table = Table(title=title, header_style="bold", show_lines=False)
    longest = max((len(layer.display_name) for layer in rows), default=20)
    table.add_column("layer", overflow="fold", min_width=min(48, max(20, longest)))
    table.add_column("role")
    table.add_column("first warning", justify="right")
    table.add_column("kinds")
    table.add_column("stable rank", justify="right")
    table.add_column("SR trend", no_wrap=True)
    table.add_column("sigma_max", justify="right")
    table.add_column("sigma_max trend", no_wrap=True)
    for layer in rows:
        first = layer.first_warning
        style = "bold red" if layer.collapsing else ("yellow" if layer.warnings else None)
        kinds = sorted({w.kind for w in layer.warnings})
        if layer.low_from_start:
            kinds.append("low at start")
        table.add_row(
            escape(printable(layer.display_name)),
            layer.role,
            str(first.step) if first is not None else "-",
            ", ".join(kinds) or "-",
            f"{_fmt(_first(layer.stable_rank))} -> {_fmt(_last(layer.stable_rank))}",
            sparkline(layer.stable_rank, log_scale=True),
            f"{_fmt(_first(layer.sigma_max))} -> {_fmt(_last(layer.sigma_max))}",
            sparkline(layer.sigma_max, log_scale=True),
            style=style,
        )
    console.print(table)
    if report.log:
        losses = [p.loss for p in report.log if p.loss is not None]
        grads = [p.grad_norm for p in report.log if p.grad_norm is not None]
        if losses:
            console.print(f"loss       {sparkline(_thin(losses, 60))}  ({len(losses)} logged)")
        if grads:
            console.print(f"grad norm  {sparkline(_thin(grads, 60), log_scale=True)}")
    for line in verdict_lines(report):
        # Names come from the files: control characters are shown escaped, so a hostile tensor
        # name cannot forge a line of the verdict or send terminal escapes (errors.printable).
        console.print(printable(line), markup=False, soft_wrap=True)
    return buffer.getvalue()


def verdict_lines(report: TrendReport) -> list[str]:
    """The verdict in plain sentences (also used by the HTML plot page)."""
    v = report.verdict
    n_layers = len(report.layers)
    if v.status == HEALTHY:
        lines = [
            f"verdict: healthy: no warning in {count(n_layers, 'matrix', 'matrices')} over "
            f"{count(len(report.steps), 'checkpoint')}"
        ]
    else:
        word = "COLLAPSE" if v.status == COLLAPSE else "WARNING"
        lines = [
            f"verdict: {word}: first warning at step {v.first_warning_step} "
            f"({len(v.first_warning_layers)} of {n_layers} matrices at once)"
        ]
        if v.collapse_step is not None and v.collapse_step != v.first_warning_step:
            lines.append(f"  many layers at once from step {v.collapse_step}")
    low = sum(1 for layer in report.layers if layer.low_from_start)
    if low:
        lines.append(
            f"  {low} of {n_layers} matrices were already below the stable-rank floor at the "
            "first checkpoint: a level, not a trend, so being below it is no warning (a fall "
            "or sigma_max growth still is; pss check judges levels)"
        )
    for label, spike, lead in (
        ("loss spike", v.loss_spike_step, v.lead_steps_loss),
        ("grad-norm spike", v.grad_spike_step, v.lead_steps_grad),
    ):
        if spike is None:
            continue
        if lead is None:
            lines.append(f"  {label} at step {spike} (no spectral warning before it)")
        elif lead >= 0:
            lines.append(f"  {label} at step {spike}: warned {lead} steps ahead")
        else:
            lines.append(f"  {label} at step {spike}: the warning came {-lead} steps after it")
    if report.log and v.loss_spike_step is None and v.grad_spike_step is None:
        lines.append("  training log: no loss or grad-norm spike")
    if v.status != HEALTHY:
        if v.last_healthy_checkpoint is not None:
            lines.append(
                f"last healthy checkpoint: {v.last_healthy_checkpoint} (step {v.last_healthy_step})"
            )
        else:
            lines.append("last healthy checkpoint: none (the first checkpoint already warns)")
        if v.layers_to_smooth:
            lines.append(f"layers to smooth: {', '.join(v.layers_to_smooth)}")
        lines.extend(f"  {command}" for command in v.commands)
    if report.guard is not None:
        lines.extend(overlay_lines(report.guard))
    return lines


def _closest_to_trouble(layers: Sequence[LayerTrend]) -> list[LayerTrend]:
    def key(layer: LayerTrend) -> float:
        last = _last(layer.stable_rank)
        return last if last is not None else math.inf

    return sorted(layers, key=key)[:_QUIET_ROWS]


def _thin(values: list[float], n: int) -> list[float | None]:
    """At most n points, evenly picked (a sparkline wider than the terminal helps nobody)."""
    if len(values) <= n:
        return list(values)
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]


def _first(values: Sequence[float | None]) -> float | None:
    return next((v for v in values if v is not None), None)


def _last(values: Sequence[float | None]) -> float | None:
    return next((v for v in reversed(values) if v is not None), None)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
        return f"{value:.2e}"
    return f"{value:.2f}"


_RENDERERS: dict[OutputFormat, Callable[[TrendReport, bool | None], str]] = {
    OutputFormat.TABLE: render_trend_table,
    OutputFormat.JSON: _render_json,
}
