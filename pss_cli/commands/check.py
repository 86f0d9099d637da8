"""``pss check``: gate a checkpoint (or a saved scan report) on the policy; exit 1 on findings.

Importing this module stays torch-free: the scan pipeline is imported only when the input is a
checkpoint, so `pss check report.json` never loads torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pss_cli.commands.options import DeviceOpt, OutputOpt, QuietOpt
from pss_cli.config import DEFAULT_DEVICE, ScanConfig
from pss_cli.errors import CheckpointError, ExitCode
from pss_cli.gate import CheckResult, Policy, Severity, evaluate, merge, unreadable
from pss_cli.report.check_formats import CheckFormat, render_check, render_markdown, verdict_line


def _limit(flag: str, text: str) -> object:
    return typer.Option(flag, metavar="X", help=text, show_default=False)


def check_command(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL",
            show_default=False,
            help="A checkpoint (any layout `pss scan` reads) or a saved `pss scan --format json` "
            "report (no torch work); several are gated together.",
        ),
    ],
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", metavar="FILE", help="A saved scan report to compare with."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", metavar="FILE", help="pss.toml or pyproject.toml (default: search upward)."
        ),
    ] = None,
    output_format: Annotated[
        CheckFormat, typer.Option("--format", "-f", help="Output format on stdout.")
    ] = CheckFormat.TEXT,
    output: OutputOpt = None,
    fail_on: Annotated[
        Severity | None,
        typer.Option("--fail-on", help="Exit 1 on findings at or above this severity [error]."),
    ] = None,
    exit_zero: Annotated[
        bool, typer.Option("--exit-zero", help="Report findings but exit 0.")
    ] = False,
    ignore: Annotated[
        list[str] | None,
        typer.Option("--ignore", metavar="RULE", help="Ignore this rule id (repeatable)."),
    ] = None,
    min_stable_rank: Annotated[float | None, _limit("--min-stable-rank", "PSS003 minimum.")] = None,
    max_sigma_max: Annotated[float | None, _limit("--max-sigma-max", "PSS004 maximum.")] = None,
    max_sigma_ratio: Annotated[
        float | None, _limit("--max-sigma-ratio", "PSS005 maximum of sigma_1/sigma_2.")
    ] = None,
    max_topk_energy: Annotated[
        float | None, _limit("--max-topk-energy", "PSS006 maximum top-k energy share.")
    ] = None,
    max_stable_rank_drop: Annotated[
        float | None, _limit("--max-stable-rank-drop", "PSS007 relative drop (0.5 = halved).")
    ] = None,
    max_sigma_max_growth: Annotated[
        float | None, _limit("--max-sigma-max-growth", "PSS008 relative growth (1 = doubled).")
    ] = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    quiet: QuietOpt = False,
) -> None:
    """Gate a checkpoint or scan report on stable rank, NaN/Inf and baseline regressions."""
    from pss_cli.policy import load_policy
    from pss_cli.report.files import (
        check_report_path,
        refuse_overwriting_checkpoint,
        write_text_atomically,
    )

    flags = {
        "min_stable_rank": min_stable_rank,
        "max_sigma_max": max_sigma_max,
        "max_sigma_ratio": max_sigma_ratio,
        "max_topk_energy": max_topk_energy,
        "max_stable_rank_drop": max_stable_rank_drop,
        "max_sigma_max_growth": max_sigma_max_growth,
        "fail_on": fail_on,
        "ignore": ignore,
    }
    policy = load_policy(Path.cwd(), config, os.environ, flags).policy
    if output is not None:
        check_report_path(output)
        for model in models:
            refuse_overwriting_checkpoint(output, model)
    result = merge([run_check(model, baseline, policy, device, quiet) for model in models])
    text = render_check(result, output_format)
    if output is not None:
        write_text_atomically(output, text)
    _append_step_summary(result, output_format)
    typer.echo(text, nl=False)
    if output_format is not CheckFormat.TEXT and not quiet:
        print(verdict_line(result), file=sys.stderr)
    if not result.passed and not exit_zero:
        # SystemExit, not typer.Exit: app.guarded treats any Exception (typer.Exit is a
        # RuntimeError) as an internal error, and findings are a verdict, not an error.
        raise SystemExit(int(ExitCode.FINDINGS))


def run_check(
    model: Path, baseline: Path | None, policy: Policy, device: str, quiet: bool
) -> CheckResult:
    """Load or scan the input, then gate it. A checkpoint that cannot be read is a PSS002
    finding (the model is broken); a bad report or baseline is a usage error (exit 2)."""
    from pss_cli.report_io import is_report_path, load_report

    base = load_report(baseline) if baseline is not None else None  # before any scan work
    base_name = str(baseline) if baseline is not None else None
    if is_report_path(model):
        return evaluate(
            load_report(model), policy, base, input_kind="report", baseline_name=base_name
        )
    from pss_cli.pipeline import scan_checkpoint
    from pss_cli.report.progress import stderr_progress

    try:
        with stderr_progress(enabled=not quiet) as progress:
            report = scan_checkpoint(model, ScanConfig(device=device), progress)
    except CheckpointError as exc:
        return unreadable(str(model), exc.message, policy, "checkpoint")
    return evaluate(report, policy, base, baseline_name=base_name)


def _append_step_summary(result: CheckResult, output_format: CheckFormat) -> None:
    """GitHub shows only 10 + 10 annotations per step: the full table goes to the job summary."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if output_format is not CheckFormat.GITHUB or not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(render_markdown(result))
    except OSError as exc:
        # The gate's verdict matters more than its summary: warn, do not fail the step.
        print(f"Warning: cannot append to GITHUB_STEP_SUMMARY '{path}': {exc}", file=sys.stderr)
