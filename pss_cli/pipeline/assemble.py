"""Assembling the report (layers in item order whatever order or process computed them), and
`scan_checkpoint`, the three phases in one call."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from pss_cli import __version__
from pss_cli.checkpoint.layout_files import weight_subfolders
from pss_cli.checkpoint.ties import tied_head_embedding
from pss_cli.config import BF16_MIN_SPEEDUP, MIN_STABLE_RANK_FRACTION_OF_RANK, ScanConfig
from pss_cli.pipeline.plan import (
    MASK_REASON,
    SOLVER_MASK,
    ProgressCallback,
    ScanPlan,
    plan_scan,
    precision_timings,
    relative_file,
)
from pss_cli.pipeline.solve import compute_items
from pss_cli.results import (
    SUBFOLDER_WEIGHTS,
    UNINDEXED_FILE,
    LayerResult,
    ScanReport,
    ScanSettings,
    ScanSummary,
    SkippedResult,
)


def scan_checkpoint(
    path: Path, config: ScanConfig, progress: ProgressCallback | None = None
) -> ScanReport:
    started = time.perf_counter()
    plan = plan_scan(path, config)
    outcome = compute_items(plan, plan.items, progress)
    return assemble_report(
        plan,
        outcome.results,
        {
            "total_seconds": round(time.perf_counter() - started, 6),
            "compute_seconds": round(outcome.compute_seconds, 6),
            "read_seconds": round(outcome.read_seconds, 6),
            **precision_timings(plan.precision),
        },
    )


_BESIDE_SAFETENSORS = "torch weights beside safetensors ones, which are read instead: not scanned"


def assemble_report(
    plan: ScanPlan,
    results: Mapping[tuple[str, int | None], LayerResult],
    timings: dict[str, float],
    world_size: int = 1,
) -> ScanReport:
    """The report, layers in item order whatever order (or process) computed them."""
    layout = plan.layout
    config = plan.config
    settings = plan.settings
    analysed = tuple(results[item.key] for item in plan.items)
    layers = tuple(layer for layer in analysed if layer.solver != SOLVER_MASK)
    analysed_names = {layer.name for layer in layers}
    index_name = layout.index_file.name if layout.index_file is not None else ""
    by_name = {entry.name: entry for entry in layout.entries}
    skipped = (
        tuple(
            SkippedResult(
                name=s.entry.name,
                file=relative_file(layout, s.entry.file),
                shape=s.entry.shape,
                dtype=s.entry.dtype,
                reason=s.reason,
            )
            for s in plan.skipped
        )
        + tuple(
            SkippedResult(
                name="",  # a whole file, not a tensor
                file=relative_file(layout, file),
                shape=(),
                dtype="",
                reason=(
                    f"{UNINDEXED_FILE} '{index_name}': not scanned"
                    if index_name and file.name.endswith(".safetensors")
                    else _BESIDE_SAFETENSORS
                ),
            )
            for file in layout.unindexed_files
        )
        + tuple(
            SkippedResult(
                name=alias,
                file=relative_file(layout, file),
                shape=by_name[name].shape if name in by_name else (),
                dtype=by_name[name].dtype if name in by_name else "",
                reason=f"the same tensor as '{name}' (tied): "
                + (
                    "analysed under that name"
                    if name in analysed_names
                    else "listed under that name"
                ),
            )
            for alias, name, file in layout.aliases
        )
        + tuple(
            SkippedResult(
                name=key,
                file=relative_file(layout, file),
                shape=(),
                dtype="",
                reason=(
                    f"a second set of {count} weights beside the model's (an EMA copy?): not "
                    f"analysed; to scan it, save it alone (torch.save(ckpt['{key}'], 'x.pt'))"
                ),
            )
            for key, count, file in layout.other_weight_sets
        )
        + tuple(
            SkippedResult(
                name=layer.display_name,
                file=layer.file,
                shape=layer.shape,
                dtype=layer.dtype,
                reason=MASK_REASON,
            )
            for layer in analysed
            if layer.solver == SOLVER_MASK
        )
    )
    tied = tied_head_embedding(
        layout.folder,
        [entry.name for entry in layout.entries] + [alias for alias, _, _ in layout.aliases],
        [layer.name for layer in layers if layer.index is None],
    )
    # A fact about the checkpoint, listed with the skipped entries (in JSON and the table's
    # notes) but not counted as a skipped tensor.
    notes: tuple[SkippedResult, ...] = ()
    if tied is not None:
        notes = (
            SkippedResult(
                name="",  # not a tensor: a fact about one
                file="config.json",
                shape=(),
                dtype="",
                reason=(
                    f"the LM head is not stored: config.json ties it to '{tied}' "
                    "(tie_word_embeddings), which is the output head too"
                ),
            ),
        )
    if not layout.one_file:
        notes += tuple(
            SkippedResult(
                name="",  # not a tensor: a file of a sub-folder
                file=str(file.relative_to(layout.folder)),
                shape=(),
                dtype="",
                reason=(f"{SUBFOLDER_WEIGHTS} (scan '{file.parent}' on its own)"),
            )
            for file in weight_subfolders(layout.folder)
        )
    return ScanReport(
        pss_version=__version__,
        checkpoint=str(plan.path),
        layout=str(layout.kind),
        # The device type: a distributed CUDA scan runs on cuda:0..N-1 and reports "cuda", as a
        # single-process `--device cuda` scan does.
        device=str(plan.device) if world_size == 1 else plan.device.type,
        seed=config.seed,
        method="exact" if config.exact else "block-krylov",
        settings=ScanSettings(
            top_k=config.top_k,
            min_stable_rank=config.min_stable_rank,
            min_stable_rank_fraction_of_rank=MIN_STABLE_RANK_FRACTION_OF_RANK,
            compute_dtype=str(config.compute_dtype),
            include=tuple(config.include),
            exclude=tuple(config.exclude),
            block_size=settings.block_size,
            tol_sigma_max=settings.tol_sigma_max,
            tol_top_k=settings.tol_top_k,
            exact_max_dim=settings.exact_max_dim,
            world_size=world_size,
            precision=plan.precision.requested,
            products=plan.precision.products,
            precision_basis=plan.precision.basis,
            bf16_min_speedup=BF16_MIN_SPEEDUP,
        ),
        layers=layers,
        skipped=skipped + notes,
        summary=summarise(layers, len(skipped)),
        timings=timings,
    )


def summarise(layers: tuple[LayerResult, ...], skipped: int) -> ScanSummary:
    ranked = [layer for layer in layers if layer.stable_rank is not None]
    lowest = min(ranked, key=lambda layer: layer.stable_rank or 0.0, default=None)
    sized = [layer for layer in layers if layer.sigma_max is not None]
    largest = max(sized, key=lambda layer: layer.sigma_max or 0.0, default=None)
    counts: dict[str, int] = {}
    for layer in layers:
        for flag in layer.flags:
            counts[flag] = counts.get(flag, 0) + 1
    return ScanSummary(
        matrices=len(layers),
        flagged=sum(1 for layer in layers if layer.flags),
        skipped=skipped,
        nonfinite_matrices=sum(1 for layer in layers if layer.nonfinite_count),
        min_stable_rank=lowest.stable_rank if lowest else None,
        min_stable_rank_layer=lowest.display_name if lowest else None,
        max_sigma_max=largest.sigma_max if largest else None,
        max_sigma_max_layer=largest.display_name if largest else None,
        flag_counts=dict(sorted(counts.items())),
    )
