"""Which matrices a repair changes, and the target stable rank of each (cap)."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path

from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.selection import names_weight_norm_magnitude, select
from pss_cli.checkpoint.ties import LM_HEAD_NAMES, config_ties_embeddings, token_embedding
from pss_cli.config import MIN_STABLE_RANK_FRACTION_OF_RANK
from pss_cli.core.smoothing import METHODS
from pss_cli.errors import PssError, UsageError
from pss_cli.repair.model import (
    FALLBACK_TARGET_FACTOR,
    PROTECTED_ROLES,
    Plan,
    SmoothConfig,
    skip_result,
)
from pss_cli.results import Flag, LayerResult, ScanReport, SkippedResult, name_matches
from pss_cli.thresholds import stable_rank_floor


def _tied_to(pattern: str, scan: ScanReport, layout: CheckpointLayout) -> str | None:
    """The token embedding an absent, tied LM head shares its storage with (safetensors and
    torch files keep tied tensors once); None unless the model's config says nothing against
    tying and exactly one token embedding is stored."""
    stored = [name for alias, name, _ in layout.aliases if fnmatchcase(alias, pattern)]
    if stored:
        return stored[0]  # a torch file's tied alias: the name it is analysed under
    if not any(fnmatchcase(name, pattern) for name in LM_HEAD_NAMES) and not any(
        pattern.endswith(name) for name in LM_HEAD_NAMES
    ):
        return None
    if config_ties_embeddings(layout.folder) is False:
        return None
    return token_embedding(x.name for x in scan.layers if x.index is None)


def selected_by_default(layer: LayerResult) -> bool:
    """What `pss smooth` without --layers/--all picks (and what `pss scan`'s hint counts)."""
    return Flag.LOW_STABLE_RANK in layer.flags and layer.role not in PROTECTED_ROLES


def _flagged_protected(layer: LayerResult) -> bool:
    return Flag.LOW_STABLE_RANK in layer.flags and layer.role in PROTECTED_ROLES


def would_smooth_by_default(layers: tuple[LayerResult, ...]) -> int:
    """How many matrices a default `pss smooth` changes: selected, and smoothable (finite, not
    quantized, not all-zero)."""
    return sum(
        1
        for x in layers
        if selected_by_default(x)
        and x.scale_tensor is None
        and not x.nonfinite_count
        and x.stable_rank is not None
    )


def _named(layer: LayerResult, pattern: str) -> bool:
    """--layers matches a tensor name as a glob, or one matrix of a stacked tensor by the name
    the report prints for it (`experts.w1[3]`, where `[3]` would be a glob character class)."""
    return name_matches(layer.name, layer.index, pattern)


def select_plans(
    scan: ScanReport, layout: CheckpointLayout, config: SmoothConfig
) -> tuple[list[Plan], tuple[SkippedResult, ...]]:
    targets, _ = select(layout.entries, config.scan.include, config.scan.exclude)
    by_name = {t.entry.name: t for t in targets}
    plans: list[Plan] = []
    skipped: list[SkippedResult] = []
    if config.layers:
        unmatched = [g for g in config.layers if not any(_named(x, g) for x in scan.layers)]
        if unmatched:
            tied = _tied_to(unmatched[0], scan, layout)
            raise UsageError(
                f"--layers '{unmatched[0]}' matches no analysed matrix in '{layout.root}'"
                + (
                    f": it is tied to '{tied}' (the checkpoint stores that one tensor for both)"
                    if tied
                    else ""
                ),
                f"name it instead: --layers '{tied}' (smoothing it changes both names)"
                if tied
                else "run `pss scan` to list the matrix names",
            )
    for layer in scan.layers:
        explicit = any(_named(layer, g) for g in config.layers)
        if config.layers:
            chosen = explicit
        elif config.all_layers:
            chosen = layer.role not in PROTECTED_ROLES
        else:
            chosen = selected_by_default(layer)
        if not chosen:
            if not config.layers and _flagged_protected(layer):
                # `check` fails on it, so say why smooth leaves it: not silently "nothing to do".
                skipped.append(
                    skip_result(
                        layer,
                        f"role {layer.role}: embeddings and the LM head are low-rank by nature "
                        f"and left alone unless named (--layers '{layer.display_name}')",
                    )
                )
            continue
        reason = None
        if layer.scale_tensor is not None and names_weight_norm_magnitude(layer.scale_tensor):
            reason = (
                f"weight-normalised (stored as direction v and magnitude '{layer.scale_tensor}'; "
                "the weight is g * v / ||v||): smoothing it would rewrite both, which pss does "
                "not do; remove the weight norm (torch.nn.utils.remove_weight_norm) to smooth it"
            )
        elif layer.scale_tensor is not None:
            reason = (
                "quantized (integers + scale): writing it back would need re-quantization, "
                "which pss does not do; smooth the full-precision checkpoint instead"
            )
        elif layer.nonfinite_count:
            reason = (
                "has NaN/Inf entries: no spectrum to smooth (restore it from an earlier checkpoint)"
            )
        elif layer.stable_rank is None:
            reason = "all-zero matrix: nothing to smooth"
        if reason is not None:
            skipped.append(skip_result(layer, reason))
            continue
        target = by_name[layer.name]
        plans.append(Plan(layer, target.entry, target.view, None, None, config.params.method))
    if METHODS[config.params.method].needs_target:
        plans, cap_skips = _with_targets(plans, scan, config, layout.root)
        skipped.extend(cap_skips)
    return plans, tuple(skipped)


def _with_targets(
    plans: list[Plan], scan: ScanReport, config: SmoothConfig, source: Path | None = None
) -> tuple[list[Plan], list[SkippedResult]]:
    """Target stable rank per matrix, and where it came from (shown in the plan):

    1. --target-stable-rank;
    2. when the matrix's role is known, the median of the healthy (finite, unflagged) matrices
       of the same role and shape in this checkpoint: they say what a normal spectrum looks
       like for this model, which an absolute number cannot. Never peers of another role: an
       embedding's or LM head's spectrum says nothing about an MLP's (an unknown-role head once
       got its target from the embeddings: an 83 % change of its norm);
    3. the matrix's own last healthy stable rank in the run's trend cache (`pss trend` writes
       it beside the checkpoints);
    4. just above the flag threshold (FALLBACK_TARGET_FACTOR): the mildest edit that unflags it.
    """
    healthy = [x for x in scan.layers if not x.flags and x.stable_rank is not None]
    history = _own_history(source, config.scan.min_stable_rank) if source is not None else {}
    out: list[Plan] = []
    skipped: list[SkippedResult] = []
    for plan in plans:
        layer = plan.layer
        rank = min(layer.matrix_shape)
        if config.params.target_stable_rank is not None:
            target, origin = config.params.target_stable_rank, "--target-stable-rank"
        else:
            target, origin = _default_target(layer, healthy, history, config.scan.min_stable_rank)
        if target > rank:
            if config.params.target_stable_rank is not None:
                raise UsageError(
                    f"--target-stable-rank {target:g} exceeds the rank {rank} of '{layer.name}'",
                    "choose a target below min(m, n) of every selected matrix",
                )
            target, origin = 0.5 * rank, f"half the rank {rank} ({origin} was higher)"
        assert layer.stable_rank is not None
        if layer.stable_rank >= target:
            skipped.append(
                skip_result(
                    layer, f"stable rank {layer.stable_rank:.3g} already >= target {target:.3g}"
                )
            )
            continue
        out.append(replace(plan, target=target, target_source=origin))
    return out, skipped


_UNKNOWN_ROLE = "other"


def _default_target(
    layer: LayerResult,
    healthy: list[LayerResult],
    history: dict[tuple[str, int | None], tuple[float, int]],
    min_stable_rank: float,
) -> tuple[float, str]:
    if layer.role != _UNKNOWN_ROLE:
        peers = [
            x.stable_rank
            for x in healthy
            if x.role == layer.role
            and x.matrix_shape == layer.matrix_shape
            and x.stable_rank is not None
        ]
        if peers:
            return (
                statistics.median(peers),
                f"median of {len(peers)} healthy {layer.role} matrices of shape "
                f"{'x'.join(map(str, layer.matrix_shape))}",
            )
    own = history.get((layer.name, layer.index))
    if own is not None:
        return own[0], f"its own stable rank at step {own[1]} (trend cache)"
    why = "no healthy peer of its role and shape" if layer.role != _UNKNOWN_ROLE else "role unknown"
    return (
        FALLBACK_TARGET_FACTOR * min_stable_rank,
        f"{FALLBACK_TARGET_FACTOR:g} x --min-stable-rank ({why}, no history)",
    )


def _own_history(
    source: Path, min_stable_rank: float
) -> dict[tuple[str, int | None], tuple[float, int]]:
    """(name, index) -> (stable rank, step) at the latest earlier checkpoint where the matrix
    was healthy, from the trend cache beside ``source`` (empty when there is none).

    Healthy by this run's --min-stable-rank, not by the flags the cached scan was made with:
    a cache written by `pss trend --min-stable-rank 2` once gave targets of 3.4 and 4.1,
    below 5, and the "repaired" matrices stayed flagged.
    """
    from pss_cli.report_io import report_from_json_dict
    from pss_cli.trend.cache_store import DEFAULT_CACHE_DIR_NAME
    from pss_cli.trend.discovery import step_from_name

    cache = source.parent / DEFAULT_CACHE_DIR_NAME
    my_step = step_from_name(source.name)
    if my_step is None or not cache.is_dir():
        return {}
    best: dict[tuple[str, int | None], tuple[float, int]] = {}
    for entry_file in sorted(cache.glob("*.json")):
        try:
            entry = json.loads(entry_file.read_text(encoding="utf-8"))
            checkpoint = Path(entry["key"]["checkpoint"])
            report = report_from_json_dict(entry["report"], str(entry_file))
        except (OSError, ValueError, KeyError, TypeError, PssError):
            continue
        step = step_from_name(checkpoint.name)
        if step is None or step >= my_step or checkpoint.parent != source.parent.resolve():
            continue
        for x in report.layers:
            if x.nonfinite_count or x.stable_rank is None:
                continue
            floor = stable_rank_floor(
                min_stable_rank, min(x.matrix_shape), MIN_STABLE_RANK_FRACTION_OF_RANK
            )
            if x.stable_rank < floor:
                continue
            key = (x.name, x.index)
            if key not in best or best[key][1] < step:
                best[key] = (x.stable_rank, step)
    return best


def equal_copies_left_alone(
    plans: list[Plan], scan: ScanReport, layout: CheckpointLayout
) -> list[str]:
    """Notes for an embedding or LM head smoothed by name while another stored embedding or LM
    head holds exactly the same values and is left as it is.

    A format that stores tied weights twice (a DCP save of a model whose head is tied to its
    embedding) loads both into the one shared parameter, the unchanged copy last: the repair of
    the named one was silently lost. Checked only for an embedding or LM head (ties are between
    those, whatever the other copy's name), against the few stored matrices of its shape.
    """
    import torch

    from pss_cli.checkpoint.reader import TensorReader

    chosen = {(p.layer.name, p.layer.index) for p in plans}
    pairs = [
        (plan, other)
        for plan in plans
        if plan.layer.role in PROTECTED_ROLES and plan.layer.index is None
        for other in scan.layers
        if (other.name, other.index) not in chosen
        and other.index is None
        and other.shape == plan.layer.shape
        and other.dtype == plan.layer.dtype
    ]
    if not pairs:
        return []  # the usual case: no file is opened
    by_name = {entry.name: entry for entry in layout.entries}
    notes: list[str] = []
    with TensorReader(layout) as reader:
        mine: tuple[str, torch.Tensor] | None = None  # at most two tensors held (embeddings)
        for plan, other in pairs:  # grouped by plan
            if mine is None or mine[0] != plan.entry.name:
                mine = (plan.entry.name, reader.read(plan.entry))
            if torch.equal(mine[1], reader.read(by_name[other.name])):
                name = plan.layer.name
                notes.append(
                    f"'{other.name}' holds the same values as '{name}' and is left as "
                    "it is: if the model ties them, loading it after the repaired one undoes "
                    f"the repair; name both (--layers '{name}' --layers '{other.name}')"
                )
    return notes
