"""`check`, the library form of `pss check`, and the pieces it is built of.

`check_policy` resolves the gate's policy as the CLI does and `check_input` loads or scans one
input and gates it; `pss check` calls these two (also under torchrun), and `check` joins them
for one process. `pss_cli.api` re-exports all three: import them from there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pss_cli.api_args import names, option
from pss_cli.config import DEFAULT_DEVICE, DEFAULT_PRECISION, ProductPrecision, ScanConfig
from pss_cli.errors import CheckpointError
from pss_cli.gate import CheckResult, Policy, Severity, evaluate, unreadable

if TYPE_CHECKING:
    from pss_cli.distributed import Session
    from pss_cli.pipeline import ProgressCallback

PathLike = str | os.PathLike[str]


def check_policy(
    policy_file: PathLike | None = None,
    *,
    fail_on: Severity | str | None = None,
    ignore: Sequence[str] = (),
    min_stable_rank: float | None = None,
    max_sigma_max: float | None = None,
    max_sigma_ratio: float | None = None,
    max_topk_energy: float | None = None,
    max_stable_rank_drop: float | None = None,
    max_sigma_max_growth: float | None = None,
) -> Policy:
    """The gate's policy as `pss check` resolves it: these arguments over PSS_* environment
    variables over `policy_file` (default: pss.toml or pyproject.toml found upward from the
    current directory) over the defaults. None or empty means "not given"."""
    from pss_cli.policy import load_policy

    flags = {
        "min_stable_rank": min_stable_rank,
        "max_sigma_max": max_sigma_max,
        "max_sigma_ratio": max_sigma_ratio,
        "max_topk_energy": max_topk_energy,
        "max_stable_rank_drop": max_stable_rank_drop,
        "max_sigma_max_growth": max_sigma_max_growth,
        "fail_on": option(Severity, fail_on, "fail_on") if fail_on is not None else None,
        "ignore": list(names(ignore, "ignore")) or None,
    }
    config = Path(policy_file) if policy_file is not None else None
    return load_policy(Path.cwd(), config, os.environ, flags).policy


def check_input(
    model: Path,
    baseline: Path | None,
    policy: Policy,
    device: str = DEFAULT_DEVICE,
    quiet: bool = True,
    session: Session | None = None,
    precision: ProductPrecision = DEFAULT_PRECISION,
) -> CheckResult | None:
    """Load or scan one input, then gate it. A checkpoint that cannot be read is a PSS002
    finding (the model is broken); a bad report or baseline is a usage error (exit 2).

    quiet=False draws a progress bar on stderr (the CLI). With a distributed `session`, every
    rank scans its share and rank 0 alone gets the result (None elsewhere)."""
    from pss_cli.distributed import Session
    from pss_cli.report_io import is_report_path, load_report

    session = session if session is not None else Session()
    # Before any scan work, and on rank 0 only (the other ranks never gate).
    base = session.rank0(lambda: load_report(baseline) if baseline else None, share=False)
    base_name = str(baseline) if baseline is not None else None
    if is_report_path(model):
        return session.rank0(
            lambda: evaluate(
                load_report(model), policy, base, input_kind="report", baseline_name=base_name
            ),
            share=False,
        )
    # The progress bar's module imports rich, whose import draws from Python's global `random`
    # (rich.style): a library caller's quiet check must not move the caller's random state.
    bar: contextlib.AbstractContextManager[ProgressCallback | None] = contextlib.nullcontext()
    if not quiet and session.rank == 0:
        from pss_cli.report.progress import stderr_progress

        bar = stderr_progress(enabled=True)
    try:
        with bar as progress:
            report = session.scan(model, ScanConfig(device=device, precision=precision), progress)
    except CheckpointError as exc:
        # Raised on every rank at once (the session synchronises errors): all carry on.
        return unreadable(str(model), exc.message, policy, "checkpoint")
    return session.rank0(
        lambda: (
            evaluate(report, policy, base, baseline_name=base_name) if report is not None else None
        ),
        share=False,
    )


def check(
    path: PathLike,
    *,
    baseline: PathLike | None = None,
    policy: Policy | None = None,
    policy_file: PathLike | None = None,
    fail_on: Severity | str | None = None,
    ignore: Sequence[str] = (),
    min_stable_rank: float | None = None,
    max_sigma_max: float | None = None,
    max_sigma_ratio: float | None = None,
    max_topk_energy: float | None = None,
    max_stable_rank_drop: float | None = None,
    max_sigma_max_growth: float | None = None,
    device: str = DEFAULT_DEVICE,
    precision: ProductPrecision | str = DEFAULT_PRECISION,
) -> CheckResult:
    """Gate a checkpoint, or a saved `pss scan --format json` report (no torch work), on the
    policy (what `pss check` does); `result.passed` is the verdict.

    baseline: a saved scan report to compare with (PSS007/PSS008). policy: a ready Policy;
    otherwise `check_policy(policy_file, fail_on=..., ignore=..., <limits>)` resolves one as
    the CLI does (limits: PSS003-PSS008 thresholds). device/precision: for a checkpoint's scan.
    """
    if policy is None:
        policy = check_policy(
            policy_file,
            fail_on=fail_on,
            ignore=ignore,
            min_stable_rank=min_stable_rank,
            max_sigma_max=max_sigma_max,
            max_sigma_ratio=max_sigma_ratio,
            max_topk_energy=max_topk_energy,
            max_stable_rank_drop=max_stable_rank_drop,
            max_sigma_max_growth=max_sigma_max_growth,
        )
    base = Path(baseline) if baseline is not None else None
    result = check_input(
        Path(path), base, policy, device, precision=option(ProductPrecision, precision, "precision")
    )
    assert result is not None  # a single process is rank 0
    return result
