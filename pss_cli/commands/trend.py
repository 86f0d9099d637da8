"""``pss trend``: a run's checkpoints over time, the early warning, the checkpoint to resume."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pss_cli.commands.options import (
    AllowPickleTypesOpt,
    DeviceOpt,
    ExcludeOpt,
    FormatOpt,
    IncludeOpt,
    MinStableRankOpt,
    OutputOpt,
    QuietOpt,
    SeedOpt,
)
from pss_cli.config import (
    DEFAULT_DEVICE,
    DEFAULT_MIN_STABLE_RANK,
    DEFAULT_SEED,
    DEFAULT_TREND_COLLAPSE_LAYERS,
    DEFAULT_TREND_DROP_FRACTION,
    DEFAULT_TREND_SIGMA_GROWTH,
    DEFAULT_TREND_WARN_ON_DROP,
    DEFAULT_TREND_WINDOW,
    OutputFormat,
)
from pss_cli.errors import CheckpointError, ExitCode, printable

if TYPE_CHECKING:
    from pss_cli.trend.series import TrendReport

RunArg = Annotated[
    list[Path],
    typer.Argument(
        help="A run folder holding checkpoint-N/ (step-N, step_N, stepN, global_stepN, iter_N, "
        "Lightning's step=S / epoch=E-step=S) entries, or several checkpoints in training order.",
        show_default=False,
        metavar="RUN_DIR|CHECKPOINT...",
    ),
]


def trend_command(
    paths: RunArg,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    min_stable_rank: MinStableRankOpt = DEFAULT_MIN_STABLE_RANK,
    drop_fraction: Annotated[
        float,
        typer.Option(
            "--drop-fraction",
            metavar="F",
            help="Warn when a layer's stable rank falls below (1 - F) x the median of its "
            "recent values.",
        ),
    ] = DEFAULT_TREND_DROP_FRACTION,
    warn_on_drop: Annotated[
        bool,
        typer.Option(
            "--warn-on-drop",
            help="Also warn on stable-rank drops (off by default: false alarms early in "
            "training, docs/EXPERIMENTS.md).",
        ),
    ] = DEFAULT_TREND_WARN_ON_DROP,
    window: Annotated[
        int,
        typer.Option("--window", metavar="N", help="Recent values the drop and growth tests use."),
    ] = DEFAULT_TREND_WINDOW,
    sigma_growth: Annotated[
        float,
        typer.Option(
            "--sigma-growth",
            metavar="X",
            help="Warn when sigma_max exceeds X x the median of its recent values.",
        ),
    ] = DEFAULT_TREND_SIGMA_GROWTH,
    collapse_layers: Annotated[
        int,
        typer.Option(
            "--collapse-layers",
            metavar="N",
            help="Call it a collapse when N or more layers warn at the same checkpoint.",
        ),
    ] = DEFAULT_TREND_COLLAPSE_LAYERS,
    guard_log: Annotated[
        Path | None,
        typer.Option(
            "--guard-log",
            metavar="FILE",
            help="Overlay the guard's JSONL event log (triggers, skipped steps) "
            "[default: RUN_DIR/pss-guard-events.jsonl when present].",
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            help="Draw the trend into FILE.png, FILE.svg or FILE.html (needs the plot extra).",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", metavar="DIR", help="Scan cache folder [default: RUN_DIR/.pss-cache]."
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Scan every checkpoint; read and write no cache.")
    ] = False,
    device: DeviceOpt = DEFAULT_DEVICE,
    seed: SeedOpt = DEFAULT_SEED,
    output_format: FormatOpt = OutputFormat.TABLE,
    output: OutputOpt = None,
    quiet: QuietOpt = False,
    allow_pickle_types: AllowPickleTypesOpt = False,
) -> None:
    """Follow a training run's spectra over its checkpoints; warn before a collapse (exit 1)."""
    from pss_cli.checkpoint.names import set_allow_pickle_types

    set_allow_pickle_types(allow_pickle_types)
    from pss_cli.distributed import refuse_torchrun

    refuse_torchrun("trend")
    from pss_cli.api import trend, trend_config

    # The options are checked before the output paths, as before the API existed.
    trend_config(
        drop_fraction=drop_fraction,
        warn_on_drop=warn_on_drop,
        window=window,
        sigma_growth=sigma_growth,
        collapse_layers=collapse_layers,
    )
    _check_outputs(output, plot)
    report = trend(
        paths,
        include=include or (),
        exclude=exclude or (),
        min_stable_rank=min_stable_rank,
        drop_fraction=drop_fraction,
        warn_on_drop=warn_on_drop,
        window=window,
        sigma_growth=sigma_growth,
        collapse_layers=collapse_layers,
        guard_log=guard_log,
        cache_dir=cache_dir,
        use_cache=not no_cache,
        device=device,
        seed=seed,
        progress=None if quiet else _progress,
        notice=_notice,
    )
    _emit(report, output_format, output, plot)


def _check_outputs(output: Path | None, plot: Path | None) -> None:
    from pss_cli.report.files import check_report_path

    if output is not None:
        check_report_path(output)
    if plot is not None:
        from pss_cli.report.trend_figure import check_plot_path

        check_plot_path(plot)


def _emit(
    report: TrendReport, output_format: OutputFormat, output: Path | None, plot: Path | None
) -> None:
    from pss_cli.report.files import write_stdout, write_text_atomically
    from pss_cli.report.trend_render import render_trend
    from pss_cli.trend.series import HEALTHY

    if all(c.status == "failed" for c in report.checkpoints):
        raise CheckpointError(
            "none of the run's checkpoints could be scanned",
            "see the messages above; `pss scan CHECKPOINT` shows one checkpoint's error",
        )
    text = render_trend(report, output_format)
    plain = render_trend(report, output_format, color=False)
    if output is not None:
        write_text_atomically(output, plain)
    if plot is not None:
        from pss_cli.report.trend_figure import write_plot

        write_plot(report, plot)
    write_stdout(text if text.endswith("\n") else text + "\n")
    if report.verdict.status != HEALTHY:
        # SystemExit, not typer.Exit: app.guarded treats any Exception as a bug.
        raise SystemExit(int(ExitCode.FINDINGS))


def _progress(position: int, total: int, path: Path, what: str) -> None:
    if what == "scanning":
        typer.echo(printable(f"[{position + 1}/{total}] scanning {path}"), err=True)


def _notice(message: str) -> None:
    typer.echo(f"Warning: {printable(message)}", err=True)
