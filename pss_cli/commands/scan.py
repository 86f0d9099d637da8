"""``pss scan``: per-layer singularity metrics of a checkpoint."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pss_cli.commands.options import (
    AllowPickleTypesOpt,
    CheckpointArg,
    DeviceOpt,
    ExcludeOpt,
    FormatOpt,
    IncludeOpt,
    MinStableRankOpt,
    OutputOpt,
    PrecisionOpt,
    QuietOpt,
    SeedOpt,
)
from pss_cli.config import (
    DEFAULT_DEVICE,
    DEFAULT_MIN_STABLE_RANK,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
    DEFAULT_TOP_K,
    ComputeDtype,
    OutputFormat,
    ProductPrecision,
    ScanConfig,
)
from pss_cli.errors import UsageError

if TYPE_CHECKING:
    from pss_cli.results import ScanReport


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
    precision: PrecisionOpt = DEFAULT_PRECISION,
    device: DeviceOpt = DEFAULT_DEVICE,
    seed: SeedOpt = DEFAULT_SEED,
    output_format: FormatOpt = OutputFormat.TABLE,
    limit: Annotated[
        int | None,
        typer.Option("--limit", metavar="N", help="Table: show only the N worst layers."),
    ] = None,
    output: OutputOpt = None,
    quiet: QuietOpt = False,
    allow_pickle_types: AllowPickleTypesOpt = False,
) -> None:
    """Compute per-layer singularity metrics (stable rank, sigma_max, ...) of a checkpoint."""
    from pss_cli.checkpoint.names import set_allow_pickle_types

    set_allow_pickle_types(allow_pickle_types)
    from pss_cli.distributed import open_session

    # Under torchrun every process runs this; the session keeps them in step (one error, on
    # rank 0) and only rank 0 renders, prints and writes. Single-process: each step just runs.
    with open_session() as session:
        config = session.run(
            lambda: _scan_config(
                include,
                exclude,
                top_k,
                min_stable_rank,
                exact,
                device,
                seed,
                dtype,
                limit,
                precision,
            )
        )
        session.rank0(lambda: _check_output(output, checkpoint), share=False)
        from pss_cli.report.progress import stderr_progress

        with stderr_progress(enabled=not quiet and session.rank == 0) as progress:
            report = session.scan(checkpoint, config, progress)
        session.rank0(
            lambda: _emit(report, checkpoint, output_format, limit, output, quiet), share=False
        )


def _scan_config(
    include: list[str] | None,
    exclude: list[str] | None,
    top_k: int,
    min_stable_rank: float,
    exact: bool,
    device: str,
    seed: int,
    dtype: ComputeDtype,
    limit: int | None,
    precision: ProductPrecision = DEFAULT_PRECISION,
) -> ScanConfig:
    from pss_cli.api import scan_config

    config = scan_config(
        include=include or (),
        exclude=exclude or (),
        top_k=top_k,
        min_stable_rank=min_stable_rank,
        exact=exact,
        device=device,
        seed=seed,
        compute_dtype=dtype,
        precision=precision,
    )
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    return config


def _check_output(output: Path | None, checkpoint: Path) -> None:
    from pss_cli.report.files import check_report_path, refuse_overwriting_checkpoint

    if output is not None:
        check_report_path(output)
        refuse_overwriting_checkpoint(output, checkpoint)


def _emit(
    report: ScanReport | None,
    checkpoint: Path,
    output_format: OutputFormat,
    limit: int | None,
    output: Path | None,
    quiet: bool,
) -> None:
    from pss_cli.report.files import write_stdout, write_text_atomically
    from pss_cli.report.render import render_scan

    assert report is not None  # rank 0 (or a single process) always has the report
    text = render_scan(report, output_format, limit=limit)
    if output is not None:
        write_text_atomically(output, render_scan(report, output_format, limit=limit, color=False))
    write_stdout(text if text.endswith("\n") else text + "\n")
    if quiet or output_format is not OutputFormat.TABLE:
        return
    from pss_cli.repair import would_smooth_by_default  # the count smooth's selection gives

    count = would_smooth_by_default(report.layers)
    if count:
        matrices = "matrix" if count == 1 else "matrices"
        typer.echo(
            f"hint: `pss smooth {shlex.quote(str(checkpoint))} --out NEW_PATH --dry-run` "
            f"previews a repair of the {count} {matrices} with a low stable rank that smooth "
            "would change (embeddings and the LM head are left alone unless named)",
            err=True,
        )
