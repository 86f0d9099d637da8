"""The SmoothReport of a repair (planned, or written and re-measured)."""

from __future__ import annotations

import time
from pathlib import Path

from pss_cli import __version__
from pss_cli.checkpoint.lr_files import LrScalePlan
from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.optimizer import OptimizerOutcome
from pss_cli.core.smoothing import METHODS
from pss_cli.repair.model import Change, SmoothConfig
from pss_cli.repair.verify import _verified
from pss_cli.results import (
    LayerResult,
    OptimizerSummary,
    ScanReport,
    SkippedResult,
    SmoothedLayer,
    SmoothReport,
)


def why_nothing(config: SmoothConfig, skipped: tuple[SkippedResult, ...]) -> list[str]:
    """Why --all changed nothing: each target is a peer median, which healthy matrices meet."""
    if not (
        config.all_layers
        and METHODS[config.params.method].needs_target
        and config.params.target_stable_rank is None
        and skipped
    ):
        return []
    return [
        "with --all and no --target-stable-rank, each matrix's target is the median stable rank "
        "of its healthy peers, and every selected matrix already reaches it; pass "
        "--target-stable-rank SR to raise matrices to SR"
    ]


def optimizer_summary(
    outcomes: list[OptimizerOutcome],
    file: Path | None,
    config: SmoothConfig,
    lr_plan: LrScalePlan | None,
) -> OptimizerSummary:
    lr_scale = lr_plan.summary() if lr_plan is not None else None
    lr_note = (lr_plan.note(),) if lr_plan is not None else ()
    if not outcomes:
        return OptimizerSummary(
            str(config.optimizer_state),
            str(file) if file else None,
            "none",
            messages=lr_note,
            lr_scale=lr_scale,
        )
    outcome = outcomes[0]
    return OptimizerSummary(
        str(outcome.policy),
        str(outcome.file) if outcome.file else None,
        outcome.mapping,
        tuple(outcome.reset_param_ids),
        tuple(outcome.reset_names),
        (*outcome.messages, *lr_note),
        lr_scale,
    )


# Above this ||dW||/||W|| the report says so: the smoothed matrix is mostly gone (a near rank-1
# matrix capped to stable rank 5 came out as its rounding noise, 1.000). The diverged sample's
# three collapsed matrices change by 0.70-0.75.
WIPED_CHANGE = 0.9


def build_report(
    scan: ScanReport,
    layout: CheckpointLayout,
    config: SmoothConfig,
    out: Path | None,
    changes: list[Change],
    not_smoothed: tuple[SkippedResult, ...],
    after: dict[tuple[str, int | None], LayerResult] | None,
    untouched_verified: int,
    optimizer: OptimizerSummary | None,
    started: float,
) -> SmoothReport:
    layers = []
    messages: list[str] = []
    for change in changes:
        layer = change.plan.layer
        measured = after.get((layer.name, layer.index)) if after is not None else None
        verified = None
        if after is not None:
            verified = _verified(change, measured)
            if not verified:
                messages.append(f"'{layer.display_name}' did not reach its target after writing")
        assert layer.sigma_max is not None and layer.stable_rank is not None
        if (
            measured is not None
            and measured.stable_rank is not None
            and measured.stable_rank < layer.stable_rank * (1 - 1e-6)  # beyond float noise
        ):
            # A method without a target (softmax sharpens a spectrum it cannot flatten) may
            # leave the matrix more singular than it was: "verified" alone would hide it.
            messages.append(
                f"'{layer.display_name}' is more singular after smoothing: stable rank "
                f"{layer.stable_rank:.6g} -> {measured.stable_rank:.6g}; this method does not "
                "repair it (try --method cap or clip)"
            )
        if change.relative_change > WIPED_CHANGE:
            messages.append(
                f"'{layer.display_name}' changes by {change.relative_change:.3f} of its norm "
                "(||dW||/||W||): its spectrum holds almost nothing below the values smoothed, so "
                "the result is mostly what was left; check it before resuming, or smooth less "
                "(--method clip, a lower --target-stable-rank)"
            )
        layers.append(
            SmoothedLayer(
                name=layer.name,
                index=layer.index,
                role=layer.role,
                matrix_shape=layer.matrix_shape,
                dtype=layer.dtype,
                k=change.k,
                changed_values=change.changed_values,
                target_stable_rank=change.plan.target,
                target_source=change.plan.target_source,
                sigma_max_before=layer.sigma_max,
                stable_rank_before=layer.stable_rank,
                predicted_stable_rank=change.predicted_stable_rank,
                sigma_max_after=measured.sigma_max if measured else None,
                stable_rank_after=measured.stable_rank if measured else None,
                relative_change=change.relative_change,
                verified=verified,
            )
        )
    if optimizer is not None:
        messages.extend(optimizer.messages)
    return SmoothReport(
        pss_version=__version__,
        input=str(layout.root),
        output=str(out) if out is not None and not config.dry_run else None,
        dry_run=config.dry_run,
        method=str(config.params.method),
        parameters=_parameters(config),
        layers=tuple(layers),
        not_smoothed=not_smoothed,
        untouched_tensors_verified=untouched_verified,
        optimizer=optimizer,
        messages=tuple(messages),
        timings={"total_seconds": round(time.perf_counter() - started, 6)},
    )


def _parameters(config: SmoothConfig) -> dict[str, object]:
    params = config.params
    data: dict[str, object] = {"method": str(params.method)}
    data.update(METHODS[params.method].parameters(params))
    data.update(
        {
            "selection": "layers" if config.layers else "all" if config.all_layers else "flagged",
            "layers": list(config.layers),
            "min_stable_rank": config.scan.min_stable_rank,
            "optimizer_state": str(config.optimizer_state),
            "seed": config.scan.seed,
        }
    )
    return data


def parameters_text(config: SmoothConfig) -> str:
    return ";".join(f"{key}={value}" for key, value in _parameters(config).items())
