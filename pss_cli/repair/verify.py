"""Re-open the staged output: untouched tensors byte-identical, changed ones at their target."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pss_cli.checkpoint.digest import tensor_digests
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.selection import glob_literal
from pss_cli.config import ComputeDtype
from pss_cli.core.smoothing import METHODS
from pss_cli.errors import CheckpointError
from pss_cli.pipeline import scan_checkpoint
from pss_cli.repair.model import TARGET_TOLERANCE, Change, SmoothConfig
from pss_cli.results import LayerResult


def verify_or_raise(
    layout: CheckpointLayout, staged: Path, changes: list[Change], config: SmoothConfig
) -> tuple[int, dict[tuple[str, int | None], LayerResult]]:
    verified_untouched, after = _verify(layout, staged, changes, config)
    failed = [c for c in changes if not _verified(c, after.get(_key(c)))]
    if failed and config.scan.compute_dtype is not ComputeDtype.FLOAT64:
        # A float32 re-measurement of a near-rank-one result can miss by its own rounding:
        # re-measure just the failed matrices in float64 before calling it a failure.
        names = sorted({c.plan.entry.name for c in failed})
        rescan = scan_checkpoint(
            staged,
            replace(
                config.scan,
                include=tuple(glob_literal(n) for n in names),
                exclude=(),
                compute_dtype=ComputeDtype.FLOAT64,
            ),
        )
        after.update({(x.name, x.index): x for x in rescan.layers})
        failed = [c for c in changes if not _verified(c, after.get(_key(c)))]
    if failed:
        layer = failed[0].plan.layer
        measured = after.get(_key(failed[0]))
        raise CheckpointError(
            f"verification failed for '{layer.display_name}': stable rank after writing "
            f"{_num(measured.stable_rank if measured else None)}, expected "
            f"{_num(failed[0].plan.target or failed[0].predicted_stable_rank)}; nothing was "
            "written",
            (
                "rounding to the stored dtype or float32 compute can move small or "
                "near-low-rank matrices: try --dtype float64, another --target-stable-rank "
                "or --method"
                if config.scan.compute_dtype is not ComputeDtype.FLOAT64
                else "the matrix is too close to low rank for this target: choose a lower "
                "--target-stable-rank or another --method"
            ),
        )
    return verified_untouched, after


def _verify(
    layout: CheckpointLayout, out: Path, changes: list[Change], config: SmoothConfig
) -> tuple[int, dict[tuple[str, int | None], LayerResult]]:
    """Re-open the output: re-measure changed matrices, compare every other tensor's bytes."""
    written = open_checkpoint(out)
    modified = {c.plan.entry.name for c in changes}
    before = tensor_digests(layout)
    after = tensor_digests(written)
    if set(before) != set(after):
        raise CheckpointError(
            f"verification failed: '{out}' does not hold the same tensor names as the input",
            "this is a bug in pss; the input is untouched, delete the output and report it",
        )
    untouched = sorted(set(before) - modified)
    differing = [name for name in untouched if before[name] != after[name]]
    if differing:
        raise CheckpointError(
            f"verification failed: tensor '{differing[0]}' in '{out}' differs from the input",
            "this is a bug in pss; the input is untouched, delete the output and report it",
        )
    rescan = scan_checkpoint(
        out,
        replace(config.scan, include=tuple(glob_literal(n) for n in sorted(modified)), exclude=()),
    )
    measured = {(x.name, x.index): x for x in rescan.layers}
    return len(untouched), measured


def _verified(change: Change, measured: LayerResult | None) -> bool:
    if measured is None or measured.sigma_max is None or measured.stable_rank is None:
        return False
    layer = change.plan.layer
    tolerance = TARGET_TOLERANCE.get(layer.dtype, 1e-2)
    assert layer.sigma_max is not None
    # A method that never raises a singular value must not grow sigma_max (beyond the rounding
    # of the stored dtype); one that may (softmax sharpens) is judged on its prediction alone.
    if not METHODS[change.plan.params_method].may_raise_sigma_max and (
        measured.sigma_max > layer.sigma_max * (1 + tolerance)
    ):
        return False
    if change.plan.target is not None:
        return abs(measured.stable_rank - change.plan.target) <= tolerance * change.plan.target
    return (
        abs(measured.stable_rank - change.predicted_stable_rank)
        <= 2e-2 * change.predicted_stable_rank
    )


def _key(change: Change) -> tuple[str, int | None]:
    return (change.plan.layer.name, change.plan.layer.index)


def _num(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4g}"
