"""The checks behind `pss check`'s rules: one layer against its thresholds (PSS001, PSS003-PSS006)
and a report against its baseline (PSS007-PSS010). Pure: findings from a report, no I/O.

The thresholds' defaults and their reasons are in pss_cli/gate_rules.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import PurePosixPath

from pss_cli.gate_rules import RULES_BY_ID, Finding, Policy, Thresholds
from pss_cli.results import LayerResult, ScanReport
from pss_cli.thresholds import stable_rank_floor

# The report layouts (checkpoint/formats/*/format.py kinds) that name one file, not a folder.
SINGLE_FILE_LAYOUTS = frozenset({"single-file", "torch-file"})


def artifact_path(checkpoint: str, file: str, layout: str | None = None) -> str:
    """Where a layer's file lies, relative to where the checkpoint was named: a file or an index
    names its folder's files, a folder names its own (no filesystem access: works on a report).
    The report's layout decides when known (a single file need not end in .safetensors)."""
    root = PurePosixPath(checkpoint.replace("\\", "/"))
    # A single file (a .safetensors, or a .pt/.bin/.pth/.ckpt whatever its name) is its own
    # artifact: joining its name again gave "sd.pt/sd.pt", a path no CI annotation can attach to.
    if layout in SINGLE_FILE_LAYOUTS or (layout is None and root.name == file):
        return str(root)
    if root.suffix in {".safetensors", ".json"}:
        root = root.parent
    return str(root / file)


def _make(
    rule_id: str,
    report: ScanReport,
    layer: LayerResult,
    message: str,
    value: float | None = None,
    threshold: float | None = None,
) -> Finding:
    rule = RULES_BY_ID[rule_id]
    return Finding(
        rule.id,
        rule.severity,
        artifact_path(report.checkpoint, layer.file, report.layout),
        layer.display_name,
        layer.role,
        message,
        value,
        threshold,
    )


def layer_findings(report: ScanReport, layer: LayerResult, policy: Policy) -> Iterator[Finding]:
    limits, ignore = policy.for_layer(layer.name, layer.role, layer.index)
    candidates = [
        _nonfinite(report, layer),
        _low_stable_rank(report, layer, limits, policy.rank_fraction),
        _above(report, layer, "PSS004", "sigma_max", layer.sigma_max, limits.max_sigma_max, ".4g"),
        _ratio(report, layer, limits),
        _energy(report, layer, limits),
    ]
    yield from (f for f in candidates if f is not None and f.rule_id not in ignore)


def _nonfinite(report: ScanReport, layer: LayerResult) -> Finding | None:
    if layer.nonfinite_count <= 0:
        return None
    message = f"{layer.nonfinite_count} non-finite entries (NaN/Inf)"
    return _make("PSS001", report, layer, message, float(layer.nonfinite_count), 0.0)


def _low_stable_rank(
    report: ScanReport, layer: LayerResult, limits: Thresholds, fraction: float
) -> Finding | None:
    # None: non-finite (PSS001 says so) or an all-zero matrix (e.g. a zero-initialised LoRA B),
    # whose stable rank is undefined rather than low.
    if limits.min_stable_rank is None or layer.stable_rank is None:
        return None
    short_side = min(layer.matrix_shape)
    floor = stable_rank_floor(limits.min_stable_rank, short_side, fraction)
    if layer.stable_rank >= floor:
        return None
    lowered = (
        ""
        if floor == limits.min_stable_rank
        else (f", lowered from {limits.min_stable_rank:g} for min(m, n) = {short_side}")
    )
    message = f"stable rank {layer.stable_rank:.2f} below {floor:g}{lowered}"
    return _make("PSS003", report, layer, message, layer.stable_rank, floor)


def _above(
    report: ScanReport,
    layer: LayerResult,
    rule_id: str,
    label: str,
    value: float | None,
    limit: float | None,
    spec: str,
) -> Finding | None:
    if value is None or limit is None or value <= limit:
        return None
    return _make(rule_id, report, layer, f"{label} {value:{spec}} above {limit:g}", value, limit)


# The smallest short side PSS005 judges. Square Gaussian matrices (2000 draws each): sigma_1 /
# sigma_2 > 5 for 37 % of 2 x 2 ones (sigma_2 is often near 0), 0.1 % of 4 x 4, none of 8 x 8 (max
# 2.0) or larger; the diverged sample's collapsed matrices are at 7.3-7.7.
RATIO_MIN_SHORT_SIDE = 8


def _ratio(report: ScanReport, layer: LayerResult, limits: Thresholds) -> Finding | None:
    if min(layer.matrix_shape) < RATIO_MIN_SHORT_SIDE:
        return None
    return _above(
        report,
        layer,
        "PSS005",
        "sigma_1/sigma_2",
        layer.sigma1_over_sigma2,
        limits.max_sigma_ratio,
        ".2f",
    )


def _energy(report: ScanReport, layer: LayerResult, limits: Thresholds) -> Finding | None:
    k = len(layer.top_singular_values)
    if 4 * k > min(layer.matrix_shape):
        # The top k are more than a quarter of the spectrum: a square Gaussian 32 x 32 matrix's
        # top 16 hold 0.90 of its energy (median), a 64 x 64's 0.63. The share says something
        # only about the head of a long spectrum (the quarter, as in the stable-rank floor).
        return None
    return _above(
        report,
        layer,
        "PSS006",
        f"top-{k} energy share",
        layer.topk_energy_share,
        limits.max_topk_energy,
        ".3f",
    )


def baseline_findings(
    report: ScanReport, baseline: ScanReport, policy: Policy
) -> Iterator[Finding]:
    """Layers matched by (name, index); new and missing ones are warnings."""
    current = {(la.name, la.index): la for la in report.layers}
    previous = {(la.name, la.index): la for la in baseline.layers}
    for key, layer in current.items():
        limits, ignore = policy.for_layer(layer.name, layer.role, layer.index)
        before = previous.get(key)
        found = (
            [_new(report, layer)]
            if before is None
            else [_drop(report, layer, before, limits), _growth(report, layer, before, limits)]
        )
        yield from (f for f in found if f is not None and f.rule_id not in ignore)
    for key, layer in previous.items():
        _limits, ignore = policy.for_layer(layer.name, layer.role, layer.index)
        if key not in current and "PSS009" not in ignore:
            # Reported against the model (the file under review), not the baseline's path.
            yield _make("PSS009", report, layer, "in the baseline but not in this model")


def _new(report: ScanReport, layer: LayerResult) -> Finding:
    return _make("PSS010", report, layer, "not in the baseline")


def _relative_change(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before <= 0 or not math.isfinite(before):
        return None
    change = (after - before) / before
    # A baseline value near 0 (5e-324) makes the ratio infinite: no meaningful comparison, and
    # JSON/SARIF cannot carry an infinity.
    return change if math.isfinite(change) else None


def _drop(
    report: ScanReport, layer: LayerResult, before: LayerResult, limits: Thresholds
) -> Finding | None:
    change = _relative_change(before.stable_rank, layer.stable_rank)
    limit = limits.max_stable_rank_drop
    if change is None or limit is None or -change <= limit:
        return None
    message = (
        f"stable rank fell {-change:.0%} against the baseline "
        f"({before.stable_rank:.2f} -> {layer.stable_rank:.2f}; limit {limit:.0%})"
    )
    return _make("PSS007", report, layer, message, -change, limit)


def _growth(
    report: ScanReport, layer: LayerResult, before: LayerResult, limits: Thresholds
) -> Finding | None:
    change = _relative_change(before.sigma_max, layer.sigma_max)
    limit = limits.max_sigma_max_growth
    if change is None or limit is None or change <= limit:
        return None
    message = (
        f"sigma_max grew {change:.0%} against the baseline "
        f"({before.sigma_max:.4g} -> {layer.sigma_max:.4g}; limit {limit:.0%})"
    )
    return _make("PSS008", report, layer, message, change, limit)
