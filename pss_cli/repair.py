"""Orchestration of `pss smooth`: scan -> select -> plan -> write -> re-measure -> report.

Reuses the scan pipeline (selection, metrics) and the block Krylov solver; the numerics of the
smoothing itself live in `pss_cli.core.smoothing`, the file work in `pss_cli.checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from pss_cli import __version__
from pss_cli.checkpoint import out_checks
from pss_cli.checkpoint.dcp_writer import write_dcp_checkpoint
from pss_cli.checkpoint.digest import tensor_digests
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.formats import TORCH_SUFFIXES, provenance_sidecar
from pss_cli.checkpoint.header import read_header
from pss_cli.checkpoint.lr_files import LrScalePlan
from pss_cli.checkpoint.model import TORCH_KINDS, CheckpointLayout, LayoutKind, TensorEntry
from pss_cli.checkpoint.optimizer import (
    OptimizerOutcome,
    apply_in_file,
    detect_master_weights,
    find_optimizer_file,
    rewrite_optimizer_state,
)
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.checkpoint.selection import MatrixView, glob_literal, select
from pss_cli.checkpoint.torch_writer import write_torch_checkpoint
from pss_cli.checkpoint.writer import check_output_path, write_repaired_checkpoint
from pss_cli.config import ComputeDtype, OptimizerPolicy, ScanConfig, SmoothingMethod
from pss_cli.core.refine import refine_float64
from pss_cli.core.smoothing import (
    METHODS,
    NeedMoreValues,
    SmoothingParams,
    apply_spectrum_change,
    smooth_values,
)
from pss_cli.core.spectra import KrylovSettings, gaussian_start, top_singular_triplets
from pss_cli.errors import CheckpointError, PssError, UsageError
from pss_cli.pipeline import (
    ProgressCallback,
    frobenius_norm,
    matrix_seed,
    resolve_device,
    scan_checkpoint,
)
from pss_cli.results import (
    Flag,
    LayerResult,
    ScanReport,
    SkippedResult,
    SmoothedLayer,
    SmoothReport,
)

# Roles left alone unless named with --layers: embeddings are low-rank by nature (docs/DESIGN.md:
# MiniLM position embeddings 7.7) and the paper's code skips embeddings and the LM head.
PROTECTED_ROLES = frozenset({"embedding", "lm_head"})
# A cap target is reached within this relative tolerance after casting back to the stored dtype
# (bf16 keeps 8 bits of mantissa: rounding moves the stable rank by up to ~0.5 %).
TARGET_TOLERANCE = {"F64": 1e-3, "F32": 1e-3, "F16": 1e-2, "BF16": 2e-2}
# Inputs that are one file: no folder around them to carry (optimizer.pt, ZeRO state).
_ONE_FILE_KINDS = frozenset({LayoutKind.SINGLE_FILE, LayoutKind.TORCH_FILE})
# With no healthy matrix to learn from, aim just above the flag threshold: the smallest edit that
# unflags the matrix, with a margin for rounding to the stored dtype. It was 2.0; in
# docs/EXPERIMENTS.md that target (10, on a model whose matrices all sat at SR 1.1-3.4) changed
# 41-87 % of each matrix's norm and no resume at the same LR benefited, so the mildest edit wins.
FALLBACK_TARGET_FACTOR = 1.2


@dataclass(frozen=True)
class SmoothConfig:
    scan: ScanConfig = field(default_factory=ScanConfig)
    layers: tuple[str, ...] = ()  # explicit globs (may name embeddings / lm_head)
    all_layers: bool = False
    params: SmoothingParams = field(default_factory=SmoothingParams)
    # keep, not reset: docs/EXPERIMENTS.md (reset resumes exploded again within 2 steps).
    optimizer_state: OptimizerPolicy = OptimizerPolicy.KEEP
    allow_master_weights: bool = False
    force: bool = False
    dry_run: bool = False
    # Multiply the learning rates stored in the optimizer and scheduler state (lr_scale.py):
    # a trainer that restores them ignores the LR given at resume.
    lr_scale: float | None = None
    clean_stale: bool = False  # remove staging entries left in OUT's folder by killed runs


@dataclass(frozen=True)
class _Plan:
    layer: LayerResult
    entry: TensorEntry
    view: MatrixView
    target: float | None
    target_source: str | None
    params_method: SmoothingMethod = SmoothingMethod.CAP


@dataclass
class _Change:
    """A rank-k update W' = W + left diag(delta) right^T, kept instead of W' itself so that memory
    stays bounded by one tensor however many matrices change (the new tensor is formed only when
    the writer asks for it, see `_LazyReplacements`)."""

    plan: _Plan
    left: torch.Tensor  # (m, c) float64 CPU, the changed directions only
    values: torch.Tensor  # (c,) float64, their singular values s in the stored scale
    new_values: torch.Tensor  # (c,) float64, s'
    right: torch.Tensor  # (n, c) float64 CPU
    k: int
    changed_values: int
    predicted_stable_rank: float
    relative_change: float

    def apply(self, stored: torch.Tensor) -> torch.Tensor:
        """(m, n) stored-dtype matrix -> the repaired one, same dtype.

        The update is added to the stored values in float64, so directions it does not touch
        keep the stored numbers exactly (up to the final cast), whatever the compute dtype.
        """
        updated = apply_spectrum_change(
            stored.to(torch.float64), self.left, self.values, self.right, self.new_values
        )
        return updated.to(stored.dtype)


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
    folder = layout.root if layout.root.is_dir() else layout.root.parent
    master = detect_master_weights(folder) if layout.kind not in _ONE_FILE_KINDS else []
    if master and not config.allow_master_weights and not config.dry_run:
        raise UsageError(
            f"'{folder}' holds DeepSpeed ZeRO state ({master[0].name}, ...): its fp32 master "
            "weights overwrite the repaired weights on resume, silently undoing the repair",
            "repair the fp32 master weights instead, or pass --allow-master-weights if your "
            "resume loads the model weights (e.g. load_from_fp32_weights=False)",
        )
    notes: list[str] = []
    if out is not None and not config.dry_run:
        _check_output(layout, out, config.force)
        notes.extend(_staging_notes(out, config.clean_stale))
    lr_plan = _lr_scale_plan(layout, folder, config)
    scan = scan_checkpoint(source, config.scan, progress)
    plans, not_smoothed = _select(scan, layout, config)
    changes, more_skips = _compute_changes(layout, plans, config)
    not_smoothed = not_smoothed + more_skips
    planned = _report(scan, layout, config, out, changes, not_smoothed, None, 0, {}, started)
    if announce is not None:
        announce(planned)
    if config.dry_run:
        return planned
    if not changes:
        # Writing an identical copy would only suggest a repair that did not happen.
        return replace(
            planned,
            output=None,
            messages=(
                *planned.messages,
                "nothing to change: no selected matrix needs smoothing; nothing was written",
                *_why_nothing(config, not_smoothed),
            ),
        )

    assert out is not None
    replacements = _LazyReplacements(layout, changes)
    optimizer_outcome: list[OptimizerOutcome] = []
    optimizer_file = (
        # DCP keeps its optimizer state inside the folder's own keys (dcp_writer.py)
        find_optimizer_file(folder)
        if layout.kind not in _ONE_FILE_KINDS and layout.kind is not LayoutKind.DCP
        else None
    )
    scheduler_file = lr_plan.scheduler_file if lr_plan is not None else None
    modified_names = sorted(replacements)

    def optimizer_hook(_input_root: Path, staging: Path) -> None:
        if optimizer_file is not None:
            optimizer_outcome.append(
                rewrite_optimizer_state(
                    optimizer_file,
                    staging / optimizer_file.name,
                    config.optimizer_state,
                    layout.entries,
                    modified_names,
                )
            )
        if lr_plan is not None:
            lr_plan.write_folder(staging)

    provenance = {
        "pss.version": __version__,
        "pss.command": "smooth",
        "pss.method": str(config.params.method),
        "pss.parameters": _parameters_text(config),
        "pss.modified_tensors": ",".join(modified_names),
    }

    def skip_optimizer(path: Path) -> bool:
        return path in (optimizer_file, scheduler_file)

    verification: list[tuple[int, dict[tuple[str, int | None], LayerResult]]] = []

    def verify_staged(staged: Path) -> None:
        # Runs on the complete staged output, before it is renamed into place: a checkpoint
        # that fails its own verification never appears where a trainer could resume from it,
        # and with --force the previous output stays until the new one has passed.
        verification.append(_verify_or_raise(layout, staged, changes, config))
        if lr_plan is not None:
            lr_plan.verify(staged)

    if layout.kind is LayoutKind.DCP:
        written_out, dcp_outcome = write_dcp_checkpoint(
            layout,
            out,
            replacements,
            provenance,
            config.optimizer_state,
            force=config.force,
            before_commit=verify_staged,
            lr_items=lr_plan.dcp_items() if lr_plan is not None else None,
        )
        optimizer_outcome.append(dcp_outcome)
    elif layout.kind in TORCH_KINDS:

        def in_file_optimizer(file: Path, obj: object) -> bool:
            # {"model": ..., "optimizer": ...} in one .pt: the same policy as optimizer.pt
            outcome = apply_in_file(
                obj, file, config.optimizer_state, layout.entries, modified_names
            )
            scaled = lr_plan.scale_object(obj) if lr_plan is not None else False
            if outcome is None:
                return scaled
            optimizer_outcome.append(outcome)
            return scaled or (
                outcome.policy is not OptimizerPolicy.KEEP
                and (
                    outcome.policy is OptimizerPolicy.DROP
                    or bool(outcome.reset_param_ids or outcome.reset_names)
                )
            )

        written_out = write_torch_checkpoint(
            layout,
            out,
            replacements,
            provenance,
            force=config.force,
            extra_files=None if out.suffix.lower() in TORCH_SUFFIXES else optimizer_hook,
            skip_copy=skip_optimizer,
            edit_object=in_file_optimizer,
            before_commit=verify_staged,
        )
    else:
        written_out = write_repaired_checkpoint(
            layout,
            out,
            replacements,
            provenance,
            force=config.force,
            extra_files=None if out.name.endswith(".safetensors") else optimizer_hook,
            skip_copy=skip_optimizer,
            before_commit=verify_staged,
        ).out
    verified_untouched, after = verification[-1]
    optimizer = _optimizer_summary(optimizer_outcome, optimizer_file, config)
    if lr_plan is not None:
        optimizer["lr_scale"] = lr_plan.summary()
        messages = optimizer.get("messages")
        optimizer["messages"] = [*(messages if isinstance(messages, list) else []), lr_plan.note()]
    final = _report(
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
    return replace(final, messages=(*notes, *final.messages))


def _staging_notes(out: Path, clean: bool) -> list[str]:
    """Refuse a concurrent run into OUT; name (or, with clean, remove) stale staging entries."""
    entries = out_checks.staging_entries(out)
    out_checks.refuse_concurrent(out, entries)
    if clean and entries.stale:
        removed = out_checks.remove_stale(entries)
        return [f"removed {len(removed)} stale staging entr{'y' if len(removed) == 1 else 'ies'}"]
    note = out_checks.stale_note(entries)
    return [note] if note else []


def _why_nothing(config: SmoothConfig, skipped: tuple[SkippedResult, ...]) -> list[str]:
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


# Names under which transformers ties the LM head to the token embedding (tie_word_embeddings),
# and the embedding names it ties to.
_LM_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
_TOKEN_EMBEDDING_HINTS = ("wte", "embed_tokens", "word_embeddings", "tok_embeddings", "embed_in")


def _tied_to(pattern: str, scan: ScanReport, layout: CheckpointLayout) -> str | None:
    """The token embedding an absent, tied LM head shares its storage with (safetensors and
    torch files keep tied tensors once); None unless the model's config says nothing against
    tying and exactly one token embedding is stored."""
    if not any(fnmatchcase(name, pattern) for name in _LM_HEAD_NAMES) and not any(
        pattern.endswith(name) for name in _LM_HEAD_NAMES
    ):
        return None
    folder = layout.root if layout.root.is_dir() else layout.root.parent
    config_file = folder / "config.json"
    if config_file.is_file():
        import json

        try:
            tie = json.loads(config_file.read_text(encoding="utf-8")).get(
                "tie_word_embeddings", True
            )
        except (OSError, ValueError, AttributeError):
            tie = True
        if tie is False:
            return None
    candidates = [
        x.name
        for x in scan.layers
        if x.index is None and any(hint in x.name for hint in _TOKEN_EMBEDDING_HINTS)
    ]
    return candidates[0] if len(candidates) == 1 else None


def selected_by_default(layer: LayerResult) -> bool:
    """What `pss smooth` without --layers/--all picks (and what `pss scan`'s hint counts)."""
    return Flag.LOW_STABLE_RANK in layer.flags and layer.role not in PROTECTED_ROLES


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


def _lr_scale_plan(
    layout: CheckpointLayout, folder: Path, config: SmoothConfig
) -> LrScalePlan | None:
    """Find what --lr-scale will scale before any computation; refuse when there is nothing."""
    if config.lr_scale is None:
        return None
    factor = config.lr_scale
    if not (math.isfinite(factor) and factor > 0):
        raise UsageError(f"--lr-scale must be a positive number (got {factor})")
    plan: LrScalePlan | None = None
    if layout.kind is LayoutKind.DCP:
        plan = LrScalePlan.for_dcp(
            factor, layout.root, keep_optimizer=config.optimizer_state is not OptimizerPolicy.DROP
        )
    elif layout.kind is LayoutKind.TORCH_FILE:
        from pss_cli.checkpoint.torch_file import load

        plan = LrScalePlan.for_file(factor, layout.root, load(layout.root))
    elif layout.kind not in _ONE_FILE_KINDS:
        plan = LrScalePlan.for_folder(factor, folder)
    if plan is None:
        raise UsageError(
            f"--lr-scale has nothing to scale: '{layout.root}' holds no optimizer or LR "
            "scheduler state",
            "pass the training checkpoint (a Trainer checkpoint-N/ folder, an accelerate "
            "save_state folder, a Lightning .ckpt), or set the LR in your training script",
        )
    return plan


def _select(
    scan: ScanReport, layout: CheckpointLayout, config: SmoothConfig
) -> tuple[list[_Plan], tuple[SkippedResult, ...]]:
    targets, _ = select(layout.entries, config.scan.include, config.scan.exclude)
    by_name = {t.entry.name: t for t in targets}
    plans: list[_Plan] = []
    skipped: list[SkippedResult] = []
    if config.layers:
        unmatched = [
            g for g in config.layers if not any(fnmatchcase(x.name, g) for x in scan.layers)
        ]
        if unmatched:
            tied = _tied_to(unmatched[0], scan, layout)
            raise UsageError(
                f"--layers '{unmatched[0]}' matches no analysed matrix in '{layout.root}'"
                + (
                    f": the LM head is tied to '{tied}' (the checkpoint stores that one "
                    "tensor for both)"
                    if tied
                    else ""
                ),
                f"name it instead: --layers '{tied}' (smoothing it changes the LM head too)"
                if tied
                else "run `pss scan` to list the matrix names",
            )
    for layer in scan.layers:
        explicit = any(fnmatchcase(layer.name, g) for g in config.layers)
        if config.layers:
            chosen = explicit
        elif config.all_layers:
            chosen = layer.role not in PROTECTED_ROLES
        else:
            chosen = selected_by_default(layer)
        if not chosen:
            continue
        reason = None
        if layer.scale_tensor is not None:
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
            skipped.append(_skip(layer, reason))
            continue
        target = by_name[layer.name]
        plans.append(_Plan(layer, target.entry, target.view, None, None, config.params.method))
    if METHODS[config.params.method].needs_target:
        plans, cap_skips = _with_targets(plans, scan, config, layout.root)
        skipped.extend(cap_skips)
    return plans, tuple(skipped)


def _with_targets(
    plans: list[_Plan], scan: ScanReport, config: SmoothConfig, source: Path | None = None
) -> tuple[list[_Plan], list[SkippedResult]]:
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
    history = _own_history(source) if source is not None else {}
    out: list[_Plan] = []
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
                _skip(layer, f"stable rank {layer.stable_rank:.3g} already >= target {target:.3g}")
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


def _own_history(source: Path) -> dict[tuple[str, int | None], tuple[float, int]]:
    """(name, index) -> (stable rank, step) at the latest earlier checkpoint where the matrix
    was healthy, from the trend cache beside ``source`` (empty when there is none)."""
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
            if x.flags or x.stable_rank is None:
                continue
            key = (x.name, x.index)
            if key not in best or best[key][1] < step:
                best[key] = (x.stable_rank, step)
    return best


def _compute_changes(
    layout: CheckpointLayout, plans: list[_Plan], config: SmoothConfig
) -> tuple[list[_Change], tuple[SkippedResult, ...]]:
    dtype = torch.float64 if config.scan.compute_dtype is ComputeDtype.FLOAT64 else torch.float32
    settings = KrylovSettings(exact_max_dim=config.scan.exact_max_dim)
    device = resolve_device(config.scan.device)
    changes: list[_Change] = []
    skipped: list[SkippedResult] = []
    with TensorReader(layout) as reader:
        for plan in plans:
            stored = _matrix_of(reader, plan)
            change = _smooth_one(plan, stored, dtype, device, settings, config)
            if change is None:
                skipped.append(_skip(plan.layer, "the method leaves this spectrum unchanged"))
            else:
                changes.append(change)
    return changes, tuple(skipped)


def _matrix_of(reader: TensorReader, plan: _Plan) -> torch.Tensor:
    tensor = reader.read(plan.entry)
    m, n = plan.layer.matrix_shape
    batch = tensor.reshape(-1, m, n)
    return batch[plan.layer.index if plan.layer.index is not None else 0]


def _smooth_one(
    plan: _Plan,
    stored: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    settings: KrylovSettings,
    config: SmoothConfig,
) -> _Change | None:
    """The update for one plan; grows k until it covers every changed value.

    Works on W / ||W||_F, like the scan, so that float64 weights near 1e300 or 1e-50 neither
    overflow nor underflow in the compute dtype; the change is scaled back at the end.
    """
    layer = plan.layer
    m, n = layer.matrix_shape
    rank = min(m, n)
    norm = frobenius_norm(stored)
    unit = stored.to(torch.float64) / norm  # (m, n), ||unit||_F = 1
    work = unit.to(device=device, dtype=dtype)
    unit_norm = float(torch.linalg.vector_norm(unit))
    params = replace(config.params, target_stable_rank=plan.target)
    k = min(rank, max(config.scan.top_k, math.ceil(layer.stable_rank or 1.0) + 2))
    seed = matrix_seed(config.scan.seed, layer.name, layer.index)
    while True:
        start = gaussian_start([seed], rank, settings.block_size)[0]
        triplets = top_singular_triplets(work, k, start, settings)
        if work.dtype is not torch.float64:
            # float32 values cannot resolve the tail energy of a strong spike: refine the few
            # directions that change in float64 (core/refine.py) before choosing the new values
            triplets = refine_float64(unit, triplets)
        try:
            new_values = smooth_values(triplets.values, unit_norm, rank, params)
        except NeedMoreValues as more:
            if k >= rank:
                raise UsageError(
                    f"cannot smooth '{layer.display_name}' ({m}x{n}) with {params.method}: the "
                    "change would need more singular values than the matrix has",
                    METHODS[params.method].need_more_hint,
                ) from more
            k = min(rank, max(more.needed, 2 * k))
            continue
        break
    changed = (new_values != triplets.values).cpu()
    if not bool(changed.any()):
        return None
    left = triplets.left.to("cpu", torch.float64)[:, changed]
    right = triplets.right.to("cpu", torch.float64)[:, changed]
    change = _Change(
        plan,
        left,
        triplets.values[changed] * norm,
        new_values[changed] * norm,
        right,
        k,
        int(changed.sum()),
        0.0,
        0.0,
    )
    new_stored = change.apply(stored)
    change.relative_change = (
        frobenius_norm(new_stored.to(torch.float64) - stored.to(torch.float64)) / norm
    )
    tail_energy = max(unit_norm**2 - float((triplets.values**2).sum()), 0.0)
    new_energy = float((new_values**2).sum()) + tail_energy
    change.predicted_stable_rank = new_energy / float(new_values.max()) ** 2
    return change


class _LazyReplacements(Mapping[str, torch.Tensor]):
    """Replacement tensors formed on access from the stored tensor and its rank-k updates.

    Nothing is cached: the writer reads each once to check it and once to write it, and memory
    never holds more than one repaired tensor (a whole-model `--all` stays bounded).
    """

    def __init__(self, layout: CheckpointLayout, changes: list[_Change]) -> None:
        self._layout = layout
        self._by_tensor: dict[str, list[_Change]] = {}
        for change in changes:
            self._by_tensor.setdefault(change.plan.entry.name, []).append(change)

    def __getitem__(self, name: str) -> torch.Tensor:
        group = self._by_tensor[name]
        entry = group[0].plan.entry
        m, n = group[0].plan.layer.matrix_shape
        with TensorReader(self._layout) as reader:
            tensor = reader.read(entry).clone().reshape(-1, m, n)
        for change in group:
            index = change.plan.layer.index
            slot = index if index is not None else 0
            tensor[slot] = change.apply(tensor[slot])
        return tensor.reshape(entry.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_tensor)

    def __len__(self) -> int:
        return len(self._by_tensor)


def _verify_or_raise(
    layout: CheckpointLayout, staged: Path, changes: list[_Change], config: SmoothConfig
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
    layout: CheckpointLayout, out: Path, changes: list[_Change], config: SmoothConfig
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


def _key(change: _Change) -> tuple[str, int | None]:
    return (change.plan.layer.name, change.plan.layer.index)


def _num(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4g}"


def _check_output(layout: CheckpointLayout, out: Path, force: bool) -> None:
    """Every refusal about OUT before any work is done (not after minutes of SVDs)."""
    check_output_path(layout, out, force=force)
    out_checks.probe_writable(out.parent, out)
    out_checks.refuse_file_in_checkpoint_folder(layout.root, out)
    folder = layout.root if layout.root.is_dir() else layout.root.parent
    if (
        layout.kind in TORCH_KINDS
        and out.suffix.lower() in TORCH_SUFFIXES
        and layout.kind is not LayoutKind.TORCH_FILE
    ):
        raise UsageError(
            f"output '{out}' names one file but the input '{layout.root}' is a "
            f"{layout.kind} checkpoint with {len(layout.files)} file(s)",
            hint="pass a folder as the output path",
        )
    if layout.kind is LayoutKind.DCP and out.suffix.lower() in (".safetensors", *TORCH_SUFFIXES):
        raise UsageError(
            f"output '{out}' names a file but the input '{layout.root}' is a DCP folder",
            hint="pass a folder as the output path: smooth writes a DCP folder",
        )
    if layout.kind not in _ONE_FILE_KINDS:
        nested = [f for f in layout.files if f.parent.resolve() != folder.resolve()]
        if nested:
            raise UsageError(
                f"shard '{nested[0]}' is not directly in '{folder}': pss smooth cannot mirror "
                "shards in sub-folders yet",
                "move the shards next to the index (and fix the weight_map), then retry",
            )
    if force and os.path.lexists(out) and not _is_pss_output(out):
        # --force replaces a previous repair, never an arbitrary folder (a typo in --out
        # must not delete someone's work).
        raise UsageError(
            f"refusing to replace '{out}': it is not empty and holds no pss output",
            "delete it yourself if you mean it, or choose another --out",
        )


def _is_pss_output(out: Path) -> bool:
    if provenance_sidecar(out).is_file():  # DCP and torch outputs carry a sidecar
        return True
    if out.is_dir() and not out.is_symlink():
        files = list(out.glob("*.safetensors"))
        if not any(out.iterdir()):
            return True
    elif out.is_file() and out.name.endswith(".safetensors"):
        files = [out]
    else:
        return False
    for file in files:
        try:
            _, metadata = read_header(file)
        except PssError:
            continue
        if "pss.version" in metadata:
            return True
    return False


def _optimizer_summary(
    outcomes: list[OptimizerOutcome], file: Path | None, config: SmoothConfig
) -> dict[str, object]:
    if not outcomes:
        return {
            "policy": str(config.optimizer_state),
            "file": str(file) if file else None,
            "mapping": "none",
            "reset_param_ids": [],
            "reset_params": [],
            "messages": [],
        }
    outcome = outcomes[0]
    return {
        "policy": str(outcome.policy),
        "file": str(outcome.file) if outcome.file else None,
        "mapping": outcome.mapping,
        "reset_param_ids": list(outcome.reset_param_ids),
        "reset_params": list(outcome.reset_names),
        "messages": list(outcome.messages),
    }


def _report(
    scan: ScanReport,
    layout: CheckpointLayout,
    config: SmoothConfig,
    out: Path | None,
    changes: list[_Change],
    not_smoothed: tuple[SkippedResult, ...],
    after: dict[tuple[str, int | None], LayerResult] | None,
    untouched_verified: int,
    optimizer: dict[str, object],
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
    optimizer_messages = optimizer.get("messages")
    if isinstance(optimizer_messages, list):
        messages.extend(str(m) for m in optimizer_messages)
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


def _verified(change: _Change, measured: LayerResult | None) -> bool:
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


def _parameters_text(config: SmoothConfig) -> str:
    return ";".join(f"{key}={value}" for key, value in _parameters(config).items())


def _skip(layer: LayerResult, reason: str) -> SkippedResult:
    return SkippedResult(
        name=layer.display_name,
        file=layer.file,
        shape=layer.shape,
        dtype=layer.dtype,
        reason=reason,
    )
