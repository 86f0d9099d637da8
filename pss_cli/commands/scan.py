"""``pss scan``: per-layer singularity metrics of a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from pss_cli.commands.options import (
    CheckpointArg,
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
    DEFAULT_TOP_K,
    ComputeDtype,
    OutputFormat,
    ScanConfig,
)
from pss_cli.errors import UsageError


def scan_command(
    checkpoint: CheckpointArg,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k", metavar="K", help="How many top singular values to compute and report."
        ),
    ] = DEFAULT_TOP_K,
    min_stable_rank: MinStableRankOpt = DEFAULT_MIN_STABLE_RANK,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="Full SVD of every matrix (slow reference path); adds the entropy effective rank.",
        ),
    ] = False,
    dtype: Annotated[
        ComputeDtype, typer.Option("--dtype", help="Compute dtype, whatever the stored dtype.")
    ] = ComputeDtype.FLOAT32,
    device: DeviceOpt = DEFAULT_DEVICE,
    seed: SeedOpt = DEFAULT_SEED,
    output_format: FormatOpt = OutputFormat.TABLE,
    limit: Annotated[
        int | None,
        typer.Option("--limit", metavar="N", help="Table: show only the N worst layers."),
    ] = None,
    output: OutputOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Compute per-layer singularity metrics (stable rank, sigma_max, ...) of a checkpoint."""
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {top_k})")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    config = ScanConfig(
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        top_k=top_k,
        min_stable_rank=min_stable_rank,
        exact=exact,
        device=device,
        seed=seed,
        compute_dtype=dtype,
    )
    from pss_cli.report.files import (
        check_report_path,
        refuse_overwriting_checkpoint,
        write_text_atomically,
    )

    if output is not None:
        check_report_path(output)
        refuse_overwriting_checkpoint(output, checkpoint)
    from pss_cli.pipeline import scan_checkpoint
    from pss_cli.report.progress import stderr_progress
    from pss_cli.report.render import render_scan

    with stderr_progress(enabled=not quiet) as progress:
        report = scan_checkpoint(checkpoint, config, progress)
    text = render_scan(report, output_format, limit=limit)
    if output is not None:
        write_text_atomically(output, render_scan(report, output_format, limit=limit, color=False))
    typer.echo(text, nl=not text.endswith("\n"))
    flagged = report.summary.flag_counts.get("low_stable_rank", 0)
    if flagged and not quiet and output_format is OutputFormat.TABLE:
        typer.echo(
            f"hint: `pss smooth {checkpoint} --out NEW_PATH --dry-run` previews a repair of "
            f"the {flagged} matrices with a low stable rank",
            err=True,
        )
