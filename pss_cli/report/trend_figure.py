"""`pss trend --plot FILE.png|FILE.svg|FILE.html`: the run's spectra over training, one figure.

Panels: stable rank of the worst layers over steps (log scale, with the scan's floor), their
sigma_max, a layer x step heat map of stable rank relative to each layer's first value (a
collapse is a dark cell whatever the layer's own level), and the training loss / grad norm when
the run logged them. Vertical lines mark the first warning (red) and the loss spike (black), and,
with a guard event log, the steps the guard skipped (purple) or only flagged (olive).
matplotlib is an optional extra, imported here only.
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

from pss_cli.errors import UsageError
from pss_cli.report.files import (
    check_report_path,
    write_bytes_atomically,
    write_text_atomically,
)
from pss_cli.report.trend_render import verdict_lines
from pss_cli.trend.series import LayerTrend, TrendReport

PLOT_SUFFIXES = (".png", ".svg", ".html")
_CURVES = 6  # layers drawn in the line panels
_HEATMAP_ROWS = 48  # layers in the heat map (the ones whose stable rank fell the most)
_MISSING_HINT = "install the plot extra: pip install 'pss-checkpoint[plot]'"


def check_plot_path(path: Path) -> None:
    """Usage errors about --plot, raised before any scanning."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(
            f"--plot '{path}': unknown file type '{path.suffix}'",
            f"use one of {', '.join(PLOT_SUFFIXES)}",
        )
    check_report_path(path)
    _pyplot()


def write_plot(report: TrendReport, path: Path) -> None:
    figure = draw(report)
    suffix = path.suffix.lower()
    buffer = io.BytesIO()
    fmt = "png" if suffix == ".png" else "svg"
    figure.savefig(buffer, format=fmt, dpi=130, bbox_inches="tight")
    _pyplot().close(figure)
    if suffix == ".png":
        write_bytes_atomically(path, buffer.getvalue())
    elif suffix == ".svg":
        write_text_atomically(path, buffer.getvalue().decode("utf-8"))
    else:
        write_text_atomically(path, _html_page(report, buffer.getvalue().decode("utf-8")))


def draw(report: TrendReport) -> Any:
    plt = _pyplot()
    has_log = any(p.loss is not None or p.grad_norm is not None for p in report.log)
    figure, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    (ax_sr, ax_sigma), (ax_heat, ax_log) = axes
    worst = _worst_layers(report)
    steps = list(report.steps)
    colors = plt.get_cmap("tab10")
    for i, layer in enumerate(worst):
        style = {"color": colors(i % 10), "marker": "o", "markersize": 3, "linewidth": 1.6}
        ax_sr.plot(*_xy(steps, layer.stable_rank), label=_short(layer.display_name), **style)
        ax_sigma.plot(*_xy(steps, layer.sigma_max), **style)
    floor = report.settings.get("min_stable_rank")
    if isinstance(floor, int | float):
        ax_sr.axhline(floor, color="grey", linestyle=":", linewidth=1)
        ax_sr.annotate(
            f"flag floor {floor:g}",
            (0.005, floor),
            xycoords=("axes fraction", "data"),
            ha="left",
            va="bottom",
            fontsize=8,
            color="grey",
        )
    ax_sr.set_yscale("log")
    ax_sr.set_title("stable rank ||W||_F^2 / sigma_1^2 (worst layers)")
    ax_sr.set_xlabel("training step")
    ax_sr.set_ylabel("stable rank (log scale)")
    ax_sigma.set_yscale("log")
    ax_sigma.set_title("sigma_max (largest singular value)")
    ax_sigma.set_xlabel("training step")
    ax_sigma.set_ylabel("sigma_max (log scale)")
    _heatmap(figure, ax_heat, report)
    if has_log:
        _training_log(ax_log, report)
    else:
        ax_log.axis("off")
        ax_log.text(
            0.5,
            0.5,
            "no training log\n(trainer_state.json log_history)",
            ha="center",
            va="center",
            color="grey",
            transform=ax_log.transAxes,
        )
    for ax in (ax_sr, ax_sigma, ax_log) if has_log else (ax_sr, ax_sigma):
        _mark_events(ax, report, labelled=ax is ax_sr)
        ax.grid(True, which="major", alpha=0.3)
    for ax in (ax_sr, ax_sigma):
        _plain_log_ticks(ax)
    if worst:
        # Below the panels, never over the curves (long tensor names make in-axes legends cover
        # exactly the late, collapsed points a reader is looking for).
        handles, labels = ax_sr.get_legend_handles_labels()
        figure.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=min(3, len(handles)),
            fontsize=8,
            frameon=False,
        )
    verdict = verdict_lines(report)[0]
    figure.suptitle(f"pss trend: {_short(report.run, 70)}\n{verdict}", fontsize=11)
    return figure


def _worst_layers(report: TrendReport) -> list[LayerTrend]:
    """Warned layers first (by first warning), then the largest relative stable-rank fall."""
    warned = list(report.warned_layers)
    rest = sorted((layer for layer in report.layers if not layer.warnings), key=_relative_fall)
    return (warned + rest)[:_CURVES]


def _relative_fall(layer: LayerTrend) -> float:
    values = [v for v in layer.stable_rank if v is not None and v > 0]
    if len(values) < 2:
        return math.inf
    return min(values) / values[0]


def _heatmap(figure: Any, ax: Any, report: TrendReport) -> None:
    import numpy as np

    layers = sorted(report.layers, key=_relative_fall)[:_HEATMAP_ROWS]
    layers.sort(key=lambda layer: report.layers.index(layer))  # network order reads best
    if not layers or not report.steps:
        ax.axis("off")
        return
    grid = np.full((len(layers), len(report.steps)), np.nan)
    for row, layer in enumerate(layers):
        first = next((v for v in layer.stable_rank if v is not None and v > 0), None)
        for col, value in enumerate(layer.stable_rank):
            if value is not None and value > 0 and first:
                grid[row, col] = value / first
    from matplotlib.colors import LogNorm

    # Diverging around 1 (white: unchanged), symmetric in log: red = fell, blue = rose. A
    # collapse to a tenth of the first value is deep red whatever the layer's own level.
    finite = grid[np.isfinite(grid)]
    spread = float(max(finite.max(), 1 / finite.min())) if finite.size else 2.0
    spread = min(100.0, max(2.0, spread))
    image = ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        cmap="RdBu",
        norm=LogNorm(vmin=1 / spread, vmax=spread),
    )
    first = report.verdict.first_warning_step
    if first is not None and first in report.steps:
        ax.axvline(report.steps.index(first) - 0.5, color="black", linestyle="--", linewidth=1.2)
    ax.set_xticks(range(len(report.steps)))
    ax.set_xticklabels([str(s) for s in report.steps], rotation=60, fontsize=7)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([_short(layer.display_name, 38) for layer in layers], fontsize=6)
    ax.set_xlabel("checkpoint (training step)")
    shown = f"{len(layers)} of {len(report.layers)}" if len(layers) < len(report.layers) else "all"
    ax.set_title(f"stable rank / its first value ({shown} layers)")
    bar = figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label("stable rank / first value (log; red = fell)")
    _plain_log_ticks(bar.ax)


def _training_log(ax: Any, report: TrendReport) -> None:
    loss = [(p.step, p.loss) for p in report.log if p.loss is not None]
    grad = [(p.step, p.grad_norm) for p in report.log if p.grad_norm is not None]
    if loss:
        ax.plot(
            [s for s, _ in loss],
            [_clip(v) for _, v in loss],
            color="black",
            linewidth=1.2,
            label="training loss",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title("training log (trainer_state.json)")
    if grad:
        twin = ax.twinx()
        twin.plot(
            [s for s, _ in grad],
            [_clip(v) for _, v in grad],
            color="tab:orange",
            linewidth=1,
            alpha=0.8,
            label="grad norm",
        )
        twin.set_yscale("log")
        twin.set_ylabel("grad norm (log scale)", color="tab:orange")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    elif loss:
        ax.legend(fontsize=7, loc="upper left")


def _mark_events(ax: Any, report: TrendReport, labelled: bool) -> None:
    v = report.verdict
    if v.first_warning_step is not None:
        label = f"first pss warning (step {v.first_warning_step})" if labelled else None
        ax.axvline(
            v.first_warning_step, color="tab:red", linestyle="--", linewidth=1.2, label=label
        )
    if v.loss_spike_step is not None:
        label = f"loss spike (step {v.loss_spike_step})" if labelled else None
        ax.axvline(v.loss_spike_step, color="black", linestyle=":", linewidth=1.2, label=label)
    if report.guard is not None:
        skipped = list(report.guard.steps_of("skip"))
        # Triggers whose action let the step proceed (log): the guard saw them, changed nothing.
        flagged = sorted(set(report.guard.steps_of("trigger", "nonfinite")) - set(skipped))
        for steps, color, what in (
            (skipped, "tab:purple", "skipped"),
            (flagged, "tab:olive", "flagged"),
        ):
            for i, step in enumerate(steps):
                label = f"guard {what} ({len(steps)} steps)" if labelled and i == 0 else None
                ax.axvline(step, color=color, linestyle="-", linewidth=0.8, alpha=0.6, label=label)


def _plain_log_ticks(ax: Any) -> None:
    """`6` instead of matplotlib's default `6 x 10^0`; minor labels at 2, 3 and 5 only, so a
    decade's labels never run into each other."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    formatter = FuncFormatter(lambda value, _pos: f"{value:g}")
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(formatter)
    ax.yaxis.set_minor_formatter(formatter)


def _xy(steps: list[int], values: tuple[float | None, ...]) -> tuple[list[int], list[float]]:
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None and v > 0]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _clip(value: float) -> float:
    """A NaN/Inf loss cannot be drawn; it is drawn at a large value instead of vanishing."""
    return value if math.isfinite(value) else 1e6


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _html_page(report: TrendReport, svg: str) -> str:
    svg_body = svg[svg.index("<svg") :] if "<svg" in svg else svg
    lines = "\n".join(html.escape(line) for line in verdict_lines(report))
    rows = "\n".join(
        f"<tr><td>{html.escape(c.path)}</td><td>{c.step}</td><td>{c.status}</td>"
        f"<td>{html.escape(c.error or '')}</td></tr>"
        for c in report.checkpoints
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>pss trend: {html.escape(report.run)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}}
pre{{background:#f6f6f6;padding:1em}} td,th{{padding:2px 8px;text-align:left}}
svg{{max-width:100%;height:auto}}</style></head><body>
<h1>pss trend</h1>
<pre>{lines}</pre>
{svg_body}
<h2>Checkpoints</h2>
<table><tr><th>path</th><th>step</th><th>status</th><th>error</th></tr>
{rows}
</table>
<p>pss {html.escape(report.pss_version)}</p>
</body></html>
"""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a window, works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed", _MISSING_HINT) from None
    return plt
