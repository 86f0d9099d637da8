"""``pss check``: gate a checkpoint (or a saved scan report) on the policy; exit 1 on findings.

Importing this module stays torch-free: the scan pipeline is imported only when the input is a
checkpoint, so `pss check report.json` never loads torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pss_cli.commands.options import (
    AllowPickleTypesOpt,
    DeviceOpt,
    OutputOpt,
    PrecisionOpt,
    QuietOpt,
)
from pss_cli.config import DEFAULT_DEVICE, DEFAULT_PRECISION
from pss_cli.errors import ExitCode
from pss_cli.gate import CheckResult, Policy, Severity, merge
from pss_cli.report.check_formats import CheckFormat, render_check, render_markdown, verdict_line

if TYPE_CHECKING:
    pass


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
    precision: PrecisionOpt = DEFAULT_PRECISION,
    quiet: QuietOpt = False,
    allow_pickle_types: AllowPickleTypesOpt = False,
) -> None:
    """Gate a checkpoint or scan report on stable rank, NaN/Inf and baseline regressions."""
    from pss_cli.checkpoint.names import set_allow_pickle_types

    set_allow_pickle_types(allow_pickle_types)
    from pss_cli.api import check_input, check_policy
    from pss_cli.distributed import open_session

    def policy() -> Policy:
        return check_policy(
            config,
            fail_on=fail_on,
            ignore=ignore or (),
            min_stable_rank=min_stable_rank,
            max_sigma_max=max_sigma_max,
            max_sigma_ratio=max_sigma_ratio,
            max_topk_energy=max_topk_energy,
            max_stable_rank_drop=max_stable_rank_drop,
            max_sigma_max_growth=max_sigma_max_growth,
        )

    # Under torchrun every process scans its share of each checkpoint; only rank 0 gates,
    # prints and writes, and every process exits with its verdict (see pss_cli.distributed).
    with open_session() as session:
        resolved = session.run(policy)
        session.rank0(lambda: _check_output(output, models), share=False)
        checks = [
            check_input(model, baseline, resolved, device, quiet, session, precision)
            for model in models
        ]
        passed = session.rank0(lambda: _emit(checks, output_format, output, quiet))
    if not passed and not exit_zero:
        # SystemExit, not typer.Exit: app.guarded treats any Exception (typer.Exit is a
        # RuntimeError) as an internal error, and findings are a verdict, not an error.
        raise SystemExit(int(ExitCode.FINDINGS))


def _check_output(output: Path | None, models: list[Path]) -> None:
    from pss_cli.report.files import check_report_path, refuse_overwriting_checkpoint

    if output is not None:
        check_report_path(output)
        for model in models:
            refuse_overwriting_checkpoint(output, model)


def _emit(
    checks: list[CheckResult | None], output_format: CheckFormat, output: Path | None, quiet: bool
) -> bool:
    """Render, write and print the merged verdict (rank 0 of a distributed run); True = passed."""
    from pss_cli.report.files import write_stdout, write_text_atomically

    result = merge([check for check in checks if check is not None])
    text = render_check(result, output_format)
    if output is not None:
        write_text_atomically(output, text)
    _append_step_summary(result, output_format)
    write_stdout(text)
    for glob in result.unmatched_globs:
        print(
            f"Warning: the policy's per-tensor key '{glob}' matches no analysed matrix (a typo, "
            "or a tensor pss skips?): it configures nothing",
            file=sys.stderr,
        )
    for file, why in result.not_checked:
        print(f"Warning: '{file}' was not checked: {why}", file=sys.stderr)
    if output_format is not CheckFormat.TEXT and not quiet:
        print(verdict_line(result), file=sys.stderr)
    return result.passed


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
