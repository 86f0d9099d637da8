"""The library API: `scan`, `smooth`, `check` and `trend`, the four commands as functions.

Each returns the result type the CLI renders (`--format json` is that result's JSON form), checks
its arguments as the CLI does (a UsageError names the parameter) and prints nothing: progress
goes to the optional callbacks. `pss_cli` re-exports these names lazily, so `import pss_cli`
stays torch-free; torch is imported when a function runs. docs/API.md shows each with an example.

The CLI commands (pss_cli/commands/) call these functions, or for a distributed scan (torchrun)
the pieces they are built of: `scan_config`, `check_policy` and `check_input` (the check
functions live in pss_cli/api_check.py and are re-exported here).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pss_cli.api_args import names, option, whole
from pss_cli.api_check import check, check_input, check_policy
from pss_cli.config import (
    DEFAULT_DEVICE,
    DEFAULT_MIN_STABLE_RANK,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
    DEFAULT_SOFTMAX_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TREND_COLLAPSE_LAYERS,
    DEFAULT_TREND_DROP_FRACTION,
    DEFAULT_TREND_SIGMA_GROWTH,
    DEFAULT_TREND_WARN_ON_DROP,
    DEFAULT_TREND_WINDOW,
    ComputeDtype,
    OptimizerPolicy,
    ProductPrecision,
    ScanConfig,
    SmoothingMethod,
    TrendConfig,
)
from pss_cli.errors import UsageError
from pss_cli.results import ScanReport, SmoothReport

if TYPE_CHECKING:
    from pss_cli.pipeline import ProgressCallback
    from pss_cli.trend.series import TrendReport

__all__ = [
    "check",
    "check_input",
    "check_policy",
    "check_smooth_options",
    "scan",
    "scan_config",
    "smooth",
    "trend",
    "trend_config",
]

PathLike = str | os.PathLike[str]


def scan_config(
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    top_k: int = DEFAULT_TOP_K,
    min_stable_rank: float = DEFAULT_MIN_STABLE_RANK,
    exact: bool = False,
    compute_dtype: ComputeDtype | str = ComputeDtype.FLOAT32,
    precision: ProductPrecision | str = DEFAULT_PRECISION,
    device: str = DEFAULT_DEVICE,
    seed: int = DEFAULT_SEED,
) -> ScanConfig:
    """The checked ScanConfig of `scan`'s options (shared with `pss scan`)."""
    top_k = whole(top_k, "top_k")
    seed = whole(seed, "seed")
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {top_k})")
    if not (math.isfinite(min_stable_rank) and min_stable_rank > 0):
        # nan once passed: "0 flagged (stable rank < nan)", and `smooth` selected nothing.
        raise UsageError(
            f"--min-stable-rank must be a positive number (got {min_stable_rank})",
            f"a stable rank lies between 1 and min(m, n); the default is {DEFAULT_MIN_STABLE_RANK}",
        )
    return ScanConfig(
        include=names(include, "include"),
        exclude=names(exclude, "exclude"),
        top_k=top_k,
        min_stable_rank=min_stable_rank,
        exact=exact,
        device=device,
        seed=seed,
        compute_dtype=option(ComputeDtype, compute_dtype, "compute_dtype"),
        precision=option(ProductPrecision, precision, "precision"),
    )


def scan(
    path: PathLike,
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    top_k: int = DEFAULT_TOP_K,
    min_stable_rank: float = DEFAULT_MIN_STABLE_RANK,
    exact: bool = False,
    compute_dtype: ComputeDtype | str = ComputeDtype.FLOAT32,
    precision: ProductPrecision | str = DEFAULT_PRECISION,
    device: str = DEFAULT_DEVICE,
    seed: int = DEFAULT_SEED,
    progress: ProgressCallback | None = None,
) -> ScanReport:
    """Per-matrix spectral metrics of the checkpoint at `path` (what `pss scan` reports).

    include/exclude: tensor-name globs. top_k: singular values computed per matrix.
    min_stable_rank: the flag floor. exact: full SVD (slow reference). compute_dtype: float32 or
    float64. precision: auto | fp32 | bf16 Krylov products. device: auto, cpu, cuda, cuda:N.
    seed: the Krylov start blocks' seed. progress: called after each batch.
    Raises CheckpointError (unreadable input) or UsageError (a bad option).
    """
    from pss_cli.pipeline import scan_checkpoint

    config = scan_config(
        include=include,
        exclude=exclude,
        top_k=top_k,
        min_stable_rank=min_stable_rank,
        exact=exact,
        compute_dtype=compute_dtype,
        precision=precision,
        device=device,
        seed=seed,
    )
    return scan_checkpoint(Path(path), config, progress)


def check_smooth_options(
    *,
    layers: Sequence[str],
    all_layers: bool,
    temperature: float,
    lr_scale: float | None,
    clip_count: int,
    target_stable_rank: float | None,
    optimizer_state: OptimizerPolicy | str = OptimizerPolicy.KEEP,
) -> None:
    """The UsageErrors of `smooth`'s options (torch-free; `pss smooth` checks them before it
    draws a progress bar)."""
    if layers and all_layers:
        raise UsageError("--layers and --all cannot be combined")
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--temperature must be a positive number (got {temperature})")
    if lr_scale is not None and not (math.isfinite(lr_scale) and lr_scale > 0):
        raise UsageError(f"--lr-scale must be a positive number (got {lr_scale})")
    policy = option(OptimizerPolicy, optimizer_state, "optimizer_state")
    if lr_scale is not None and policy == OptimizerPolicy.DROP:
        # Refused on every layout: with the optimizer state dropped, HF Trainer restarts its
        # schedule at the LR it is given (a halved scheduler.pt did nothing), a Lightning
        # checkpoint failed the LR verification, and a DCP folder reported nothing to scale.
        raise UsageError(
            "--lr-scale scales the stored optimizer and scheduler state, which "
            "--optimizer-state drop does not write",
            "keep or reset the optimizer state with --lr-scale, or drop it and pass the lower "
            "learning rate to the trainer you resume with",
        )
    if clip_count < 1:
        raise UsageError(f"--clip-count must be at least 1 (got {clip_count})")
    if target_stable_rank is not None and not (
        math.isfinite(target_stable_rank) and target_stable_rank >= 1.0
    ):
        raise UsageError(
            f"--target-stable-rank must be a number >= 1 (got {target_stable_rank})",
            "a stable rank lies between 1 and min(m, n)",
        )


def smooth(
    path: PathLike,
    out: PathLike | None,
    *,
    layers: Iterable[str] = (),
    all_layers: bool = False,
    method: SmoothingMethod | str = SmoothingMethod.CAP,
    target_stable_rank: float | None = None,
    temperature: float = DEFAULT_SOFTMAX_TEMPERATURE,
    clip_count: int = 1,
    min_stable_rank: float = DEFAULT_MIN_STABLE_RANK,
    optimizer_state: OptimizerPolicy | str = OptimizerPolicy.KEEP,
    allow_master_weights: bool = False,
    lr_scale: float | None = None,
    clean_stale: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    dry_run: bool = False,
    force: bool = False,
    compute_dtype: ComputeDtype | str = ComputeDtype.FLOAT32,
    device: str = DEFAULT_DEVICE,
    precision: ProductPrecision | str = DEFAULT_PRECISION,
    seed: int = DEFAULT_SEED,
    progress: ProgressCallback | None = None,
    announce: Callable[[SmoothReport], None] | None = None,
) -> SmoothReport:
    """Repair the checkpoint at `path` into `out` (what `pss smooth` does); the input is never
    modified. `out` may be None only with `dry_run=True` (plan, write nothing).

    layers: globs of the matrices to smooth (default: those flagged low_stable_rank, no
    embeddings or LM head); all_layers: every matrix. method: cap | conv | softmax | clip, with
    target_stable_rank (cap), temperature (softmax), clip_count (clip). optimizer_state: keep |
    reset | drop. lr_scale: multiply the stored learning rates. announce: sees the plan before
    anything is written. The other options are `scan`'s.
    """
    layers = names(layers, "layers")
    if out is None and not dry_run:
        raise UsageError("--out is required unless --dry-run is given")
    check_smooth_options(
        layers=layers,
        all_layers=all_layers,
        temperature=temperature,
        lr_scale=lr_scale,
        clip_count=clip_count,
        target_stable_rank=target_stable_rank,
        optimizer_state=optimizer_state,
    )
    from pss_cli.core.smoothing import SmoothingParams
    from pss_cli.repair import SmoothConfig, smooth_checkpoint

    config = SmoothConfig(
        scan=scan_config(
            include=include,
            exclude=exclude,
            min_stable_rank=min_stable_rank,
            device=device,
            seed=seed,
            compute_dtype=compute_dtype,
            precision=precision,
        ),
        layers=layers,
        all_layers=all_layers,
        params=SmoothingParams(
            method=option(SmoothingMethod, method, "method"),
            target_stable_rank=target_stable_rank,
            temperature=temperature,
            clip_count=clip_count,
        ),
        optimizer_state=option(OptimizerPolicy, optimizer_state, "optimizer_state"),
        allow_master_weights=allow_master_weights,
        force=force,
        dry_run=dry_run,
        lr_scale=lr_scale,
        clean_stale=clean_stale,
    )
    target = Path(out) if out is not None else None
    return smooth_checkpoint(Path(path), target, config, progress, announce=announce)


def trend_config(
    *,
    drop_fraction: float = DEFAULT_TREND_DROP_FRACTION,
    warn_on_drop: bool = DEFAULT_TREND_WARN_ON_DROP,
    window: int = DEFAULT_TREND_WINDOW,
    sigma_growth: float = DEFAULT_TREND_SIGMA_GROWTH,
    collapse_layers: int = DEFAULT_TREND_COLLAPSE_LAYERS,
) -> TrendConfig:
    """The checked TrendConfig of `trend`'s detector options (shared with `pss trend`)."""
    if not 0 < drop_fraction < 1:
        raise UsageError(f"--drop-fraction must lie between 0 and 1 (got {drop_fraction})")
    window = whole(window, "window")
    collapse_layers = whole(collapse_layers, "collapse_layers")
    if window < 1:
        raise UsageError(f"--window must be at least 1 (got {window})")
    if not sigma_growth > 1:
        raise UsageError(f"--sigma-growth must be above 1 (got {sigma_growth})")
    if collapse_layers < 1:
        raise UsageError(f"--collapse-layers must be at least 1 (got {collapse_layers})")
    return TrendConfig(
        drop_fraction=drop_fraction,
        warn_on_drop=warn_on_drop,
        window=window,
        sigma_growth=sigma_growth,
        collapse_layers=collapse_layers,
    )


def trend(
    paths: PathLike | Sequence[PathLike],
    *,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    min_stable_rank: float = DEFAULT_MIN_STABLE_RANK,
    drop_fraction: float = DEFAULT_TREND_DROP_FRACTION,
    warn_on_drop: bool = DEFAULT_TREND_WARN_ON_DROP,
    window: int = DEFAULT_TREND_WINDOW,
    sigma_growth: float = DEFAULT_TREND_SIGMA_GROWTH,
    collapse_layers: int = DEFAULT_TREND_COLLAPSE_LAYERS,
    guard_log: PathLike | None = None,
    cache_dir: PathLike | None = None,
    use_cache: bool = True,
    device: str = DEFAULT_DEVICE,
    seed: int = DEFAULT_SEED,
    progress: Callable[[int, int, Path, str], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> TrendReport:
    """The spectra of a training run over its checkpoints and the early-warning verdict (what
    `pss trend` reports): `paths` is a run folder (checkpoint-N/, step-N, ...) or several
    checkpoints in training order.

    drop_fraction, warn_on_drop, window, sigma_growth, collapse_layers: the detector (see
    `pss trend --help`). guard_log: the guard's JSONL event log to overlay (default:
    RUN_DIR/pss-guard-events.jsonl when present). cache_dir/use_cache: the per-checkpoint scan
    cache (default RUN_DIR/.pss-cache). progress(position, total, path, "cached"|"scanning")
    and notice(message) replace the CLI's stderr lines.
    """
    from pss_cli.trend.analysis import analyse_run
    from pss_cli.trend.guard_log import find_guard_log, read_guard_log

    runs = [Path(paths)] if isinstance(paths, str | os.PathLike) else [Path(p) for p in paths]
    config = trend_config(
        drop_fraction=drop_fraction,
        warn_on_drop=warn_on_drop,
        window=window,
        sigma_growth=sigma_growth,
        collapse_layers=collapse_layers,
    )
    scan_settings = scan_config(
        include=include,
        exclude=exclude,
        min_stable_rank=min_stable_rank,
        device=device,
        seed=seed,
    )
    log = Path(guard_log) if guard_log is not None else find_guard_log(runs)
    overlay = read_guard_log(log) if log is not None else None
    report = analyse_run(
        runs,
        scan_settings,
        config,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        use_cache=use_cache,
        progress=progress,
        notice=notice,
    )
    return replace(report, guard=overlay)
