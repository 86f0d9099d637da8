"""Orchestration of `pss smooth`: scan -> select -> plan -> write -> re-measure -> report.

Reuses the scan pipeline (selection, metrics) and the block Krylov solver; the numerics of the
smoothing itself live in `pss_cli.core.smoothing`, the file work in `pss_cli.checkpoint`.
Modules: `select` (which matrices, which targets), `plan` (their changes), `output` (refusals
before any work), `apply` (writing), `verify` (re-measuring the staged output), `report`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.optimizer import detect_master_weights
from pss_cli.checkpoint.trainer_save import incomplete_trainer_save
from pss_cli.errors import UsageError
from pss_cli.pipeline import ProgressCallback, scan_checkpoint
from pss_cli.repair.apply import (
    OutputWriter,
    copied_weight_files,
    copied_weight_note,
    stale_weight_note,
)
from pss_cli.repair.model import (
    FALLBACK_TARGET_FACTOR,
    PROTECTED_ROLES,
    TARGET_TOLERANCE,
    SmoothConfig,
)
from pss_cli.repair.output import check_output, lr_scale_plan, staging_notes
from pss_cli.repair.plan import compute_changes
from pss_cli.repair.report import build_report, optimizer_summary, why_nothing
from pss_cli.repair.select import (
    equal_copies_left_alone,
    select_plans,
    selected_by_default,
    would_smooth_by_default,
)
from pss_cli.results import SmoothReport

__all__ = [
    "FALLBACK_TARGET_FACTOR",
    "PROTECTED_ROLES",
    "TARGET_TOLERANCE",
    "SmoothConfig",
    "selected_by_default",
    "smooth_checkpoint",
    "would_smooth_by_default",
]


def smooth_checkpoint(
    source: Path,
    out: Path | None,
    config: SmoothConfig,
    progress: ProgressCallback | None = None,
    announce: Callable[[SmoothReport], None] | None = None,
) -> SmoothReport:
    """Repair `source` into `out` (None only for a dry run); `announce` sees the plan first."""
    started = time.perf_counter()
    if out is None and not config.dry_run:
        raise UsageError("--out is required unless --dry-run is given")
    layout = open_checkpoint(source)
    folder = layout.folder
    # A one-file input has no folder around it to carry (optimizer.pt, ZeRO state).
    master = detect_master_weights(folder) if not layout.one_file else []
    if master and not config.allow_master_weights and not config.dry_run:
        raise UsageError(
            f"'{folder}' holds DeepSpeed ZeRO state ({master[0].name}, ...): its fp32 master "
            "weights overwrite the repaired weights on resume, silently undoing the repair",
            "repair the fp32 master weights instead, or pass --allow-master-weights if your "
            "resume loads the model weights (e.g. load_from_fp32_weights=False)",
        )
    notes: list[str] = []
    if out is not None:
        # A dry run refuses what the real run would refuse: it is the preflight of that run.
        check_output(layout, out, config.force)
        if not config.dry_run:
            notes.extend(staging_notes(out, config.clean_stale))
    lr_plan = lr_scale_plan(layout, config)
    incomplete = incomplete_trainer_save(source)
    if incomplete is not None:
        notes.append(incomplete)
    scan = scan_checkpoint(source, config.scan, progress)
    plans, not_smoothed = select_plans(scan, layout, config)
    notes.extend(equal_copies_left_alone(plans, scan, layout))
    changes, more_skips = compute_changes(layout, plans, config)
    not_smoothed = not_smoothed + more_skips
    planned = build_report(scan, layout, config, out, changes, not_smoothed, None, 0, None, started)
    if announce is not None:
        announce(planned)
    if config.dry_run:
        return replace(planned, messages=(*notes, *planned.messages))
    if not changes and lr_plan is None:
        # Writing an identical copy would only suggest a repair that did not happen. With
        # --lr-scale the copy is still written (weights as they are, the LR scaled): rolling
        # back to a healthy checkpoint at a lower LR is the repair the README advises first.
        return replace(
            planned,
            output=None,
            messages=(
                *planned.messages,
                "nothing to change: no selected matrix needs smoothing; nothing was written"
                if not (config.layers and not_smoothed)
                else "nothing was written: every matrix selected was left alone (see 'left "
                "alone' for why)",
                *why_nothing(config, not_smoothed),
            ),
        )

    assert out is not None
    writer = OutputWriter(layout, changes, config, lr_plan)
    written_out, verified_untouched, after = writer.write(out)
    optimizer = optimizer_summary(writer.optimizer_outcomes, writer.optimizer_file, config, lr_plan)
    final = build_report(
        scan,
        layout,
        config,
        written_out,
        changes,
        not_smoothed,
        after,
        verified_untouched,
        optimizer,
        started,
    )
    if not changes:
        notes.append(
            "no selected matrix needs smoothing: the weights are written as they are, with the "
            f"learning rate scaled by {config.lr_scale:g}"
        )
    notes.extend(stale_weight_note(path) for path in writer.left_out)
    notes.extend(copied_weight_note(path) for path in copied_weight_files(layout, writer.left_out))
    return replace(final, messages=(*notes, *final.messages))
