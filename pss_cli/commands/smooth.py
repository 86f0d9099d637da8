"""``pss smooth``: write a repaired checkpoint whose dominant singular values are smoothed."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from pss_cli.commands.options import (
    AllowPickleTypesOpt,
    CheckpointArg,
    DeviceOpt,
    ExcludeOpt,
    FormatOpt,
    IncludeOpt,
    MinStableRankOpt,
    PrecisionOpt,
    SeedOpt,
)
from pss_cli.config import (
    DEFAULT_DEVICE,
    DEFAULT_MIN_STABLE_RANK,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
    DEFAULT_SOFTMAX_TEMPERATURE,
    ComputeDtype,
    OptimizerPolicy,
    OutputFormat,
    SmoothingMethod,
)
from pss_cli.errors import UsageError


def smooth_command(
    checkpoint: CheckpointArg,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", metavar="OUT", help="Where to write the repaired checkpoint (a new path)."
        ),
    ] = None,
    method: Annotated[
        SmoothingMethod, typer.Option("--method", help="Smoothing function (see docs/smooth.md).")
    ] = SmoothingMethod.CAP,
    target_stable_rank: Annotated[
        float | None,
        typer.Option(
            "--target-stable-rank",
            metavar="SR",
            help="cap: stable rank to reach (default: median of healthy peers).",
        ),
    ] = None,
    temperature: Annotated[
        float, typer.Option("--temperature", metavar="T", help="softmax: s' = softmax(s/T)*sum(s).")
    ] = DEFAULT_SOFTMAX_TEMPERATURE,
    clip_count: Annotated[
        int, typer.Option("--clip-count", metavar="J", help="clip: s_1..s_J -> s_{J+1}.")
    ] = 1,
    layers: Annotated[
        list[str] | None,
        typer.Option(
            "--layers",
            metavar="GLOB",
            help="Smooth these matrices (repeatable; may name embeddings).",
        ),
    ] = None,
    all_layers: Annotated[
        bool, typer.Option("--all", help="Smooth every matrix except embeddings and lm_head.")
    ] = False,
    min_stable_rank: MinStableRankOpt = DEFAULT_MIN_STABLE_RANK,
    optimizer_state: Annotated[
        OptimizerPolicy,
        typer.Option("--optimizer-state", help="What to do with optimizer.pt (docs/smooth.md)."),
    ] = OptimizerPolicy.KEEP,
    allow_master_weights: Annotated[
        bool,
        typer.Option(
            "--allow-master-weights",
            help="Write even though DeepSpeed fp32 master weights would undo the repair.",
        ),
    ] = False,
    lr_scale: Annotated[
        float | None,
        typer.Option(
            "--lr-scale",
            metavar="FACTOR",
            help="Multiply the learning rates stored in the optimizer and scheduler state "
            "(e.g. 0.5 to resume at half the LR).",
        ),
    ] = None,
    clean_stale: Annotated[
        bool,
        typer.Option(
            "--clean-stale",
            help="Remove staging entries (.*.pss-tmp-*) that killed pss runs left beside OUT.",
        ),
    ] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan; write nothing.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
    dtype: Annotated[
        ComputeDtype, typer.Option("--dtype", help="Compute dtype of the SVD and update.")
    ] = ComputeDtype.FLOAT32,
    device: DeviceOpt = DEFAULT_DEVICE,
    precision: PrecisionOpt = DEFAULT_PRECISION,
    seed: SeedOpt = DEFAULT_SEED,
    output_format: FormatOpt = OutputFormat.TABLE,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No plan, progress bar or resume recipe on stderr."),
    ] = False,
    allow_pickle_types: AllowPickleTypesOpt = False,
) -> None:
    """Smooth the dominant singular values of singular matrices into a new checkpoint."""
    from pss_cli.checkpoint.names import set_allow_pickle_types

    set_allow_pickle_types(allow_pickle_types)
    from pss_cli.distributed import refuse_torchrun

    refuse_torchrun("smooth")
    from pss_cli.checkpoint.out_names import default_output, rotation_risk

    suggested = default_output(checkpoint)
    if out is None and not dry_run:
        raise UsageError(
            "--out is required (or use --dry-run)",
            f"e.g. --out {shlex.quote(str(suggested))} (outside the run folder, where no "
            "trainer's checkpoint rotation deletes it)",
        )
    risk = rotation_risk(out) if out is not None else None
    # A warning, not progress: -q silences the plan, progress and recipe, never this.
    if risk is not None:
        typer.echo(
            f"warning: {risk}; resume with another output_dir, or write to "
            f"--out {shlex.quote(str(suggested))}",
            err=True,
        )
    from pss_cli.api import check_smooth_options, smooth

    check_smooth_options(
        layers=layers or (),
        all_layers=all_layers,
        temperature=temperature,
        lr_scale=lr_scale,
        clip_count=clip_count,
        target_stable_rank=target_stable_rank,
        optimizer_state=optimizer_state,
    )
    from pss_cli.report.files import write_stdout
    from pss_cli.report.progress import stderr_progress
    from pss_cli.report.smooth import render_plan, render_smooth, resume_recipe

    with stderr_progress(enabled=not quiet) as progress:
        report = smooth(
            checkpoint,
            out,
            layers=layers or (),
            all_layers=all_layers,
            method=method,
            target_stable_rank=target_stable_rank,
            temperature=temperature,
            clip_count=clip_count,
            min_stable_rank=min_stable_rank,
            optimizer_state=optimizer_state,
            allow_master_weights=allow_master_weights,
            lr_scale=lr_scale,
            clean_stale=clean_stale,
            include=include or (),
            exclude=exclude or (),
            dry_run=dry_run,
            force=force,
            compute_dtype=dtype,
            device=device,
            precision=precision,
            seed=seed,
            progress=progress,
            announce=None
            if dry_run or quiet
            else lambda plan: typer.echo(render_plan(plan), err=True),
        )
    write_stdout(render_smooth(report, output_format))
    if not dry_run and report.output is not None and not quiet:
        typer.echo(resume_recipe(report), err=True)
