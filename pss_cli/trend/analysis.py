"""`pss trend` orchestration: discover the run, scan each checkpoint once (cached), detect.

Metrics come from `pipeline.scan_checkpoint` (no second implementation); the detector is the
pure `trend.detect`. A checkpoint that cannot be read is a gap in the series, not the end of the
analysis: a run often ends in a half-written or NaN-filled checkpoint.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from pss_cli import __version__
from pss_cli.checkpoint.out_names import default_output
from pss_cli.checkpoint.selection import glob_literal
from pss_cli.checkpoint.trainer_save import incomplete_trainer_save
from pss_cli.config import ScanConfig, TrendConfig
from pss_cli.errors import CheckpointError, ComputeError, PssError
from pss_cli.results import Flag, LayerResult
from pss_cli.trend import cache_store
from pss_cli.trend.detect import (
    SIGMA_GROWTH,
    SPECTRAL_COLLAPSE,
    grad_spike_step,
    layer_warnings,
    loss_spike_step,
    low_from_start,
)
from pss_cli.trend.discovery import RunCheckpoint, RunLayout, discover_run
from pss_cli.trend.series import (
    COLLAPSE,
    HEALTHY,
    WARNING,
    CheckpointStatus,
    LayerTrend,
    TrendReport,
    Verdict,
)

# Called once per checkpoint before it is scanned or read from the cache: (position, total,
# checkpoint path, "cached" | "scanning").
TrendProgress = Callable[[int, int, Path, str], None]
Notice = Callable[[str], None]


def analyse_run(
    paths: list[Path],
    scan_config: ScanConfig,
    trend_config: TrendConfig,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    progress: TrendProgress | None = None,
    notice: Notice | None = None,
) -> TrendReport:
    """Trend of a run folder (one path) or of explicit checkpoints (several, in order)."""
    started = time.perf_counter()
    run = discover_run(paths)
    if use_cache and cache_dir is None:
        cache_dir = default_cache_dir(run, paths)
    cache = cache_dir if use_cache else None
    if notice is not None:
        notice = _once(notice)  # an unwritable cache said so once per checkpoint: 10 lines
    statuses: list[CheckpointStatus] = []
    scans: list[dict[tuple[str, int | None], LayerResult]] = []
    order: dict[tuple[str, int | None], LayerResult] = {}
    latest: dict[tuple[str, int | None], str] = {}  # the name in the newest checkpoint
    counts = {"scanned": 0, "cached": 0, "failed": 0}
    for position, checkpoint in enumerate(run.checkpoints):
        layers, status = _layers_of(checkpoint, scan_config, cache, position, run, progress, notice)
        counts[
            "failed" if status.status == "failed" else "cached" if status.from_cache else "scanned"
        ] += 1
        statuses.append(status)
        scans.append({series_key(layer.name, layer.index): layer for layer in layers})
        for layer in layers:
            key = series_key(layer.name, layer.index)
            order.setdefault(key, layer)
            latest[key] = layer.name

    steps = tuple(c.step for c in run.checkpoints)
    trends = tuple(
        _layer_trend(key, first, latest[key], steps, scans, trend_config)
        for key, first in order.items()
    )
    verdict = _verdict(run, statuses, trends, trend_config)
    return TrendReport(
        pss_version=__version__,
        run=str(run.root) if run.root is not None else " ".join(str(p) for p in paths),
        settings={
            "seed": scan_config.seed,
            "top_k": scan_config.top_k,
            "min_stable_rank": scan_config.min_stable_rank,
            "include": list(scan_config.include),
            "exclude": list(scan_config.exclude),
            "drop_fraction": trend_config.drop_fraction,
            "warn_on_drop": trend_config.warn_on_drop,
            "window": trend_config.window,
            "sigma_growth": trend_config.sigma_growth,
            "collapse_layers": trend_config.collapse_layers,
            "grad_spike_factor": trend_config.grad_spike_factor,
            "grad_ema_decay": trend_config.grad_ema_decay,
            "loss_spike_factor": trend_config.loss_spike_factor,
            "log_warmup_points": trend_config.log_warmup_points,
            "quiet_roles": list(trend_config.quiet_roles),
        },
        steps=steps,
        checkpoints=tuple(statuses),
        layers=trends,
        log=run.log,
        log_source=str(run.log_source) if run.log_source is not None else None,
        verdict=verdict,
        timings={
            "total_seconds": round(time.perf_counter() - started, 6),
            **{f"checkpoints_{name}": float(n) for name, n in counts.items()},
        },
    )


def default_cache_dir(run: RunLayout, paths: list[Path]) -> Path:
    """`RUN/.pss-cache`, or beside the named checkpoints (their common folder)."""
    if run.root is not None:
        return run.root / cache_store.DEFAULT_CACHE_DIR_NAME
    parents = [str(p.resolve().parent) for p in paths]
    return Path(os.path.commonpath(parents)) / cache_store.DEFAULT_CACHE_DIR_NAME


def _once(notice: Notice) -> Notice:
    """`notice`, passing each distinct message once."""
    said: set[str] = set()

    def once(message: str) -> None:
        if message not in said:
            said.add(message)
            notice(message)

    return once


def _layers_of(
    checkpoint: RunCheckpoint,
    config: ScanConfig,
    cache: Path | None,
    position: int,
    run: RunLayout,
    progress: TrendProgress | None,
    notice: Notice | None,
) -> tuple[tuple[LayerResult, ...], CheckpointStatus]:
    from pss_cli.report_io import report_from_json_dict
    from pss_cli.results import report_to_json_dict

    def status(kind: str, error: str | None, matrices: int) -> CheckpointStatus:
        return CheckpointStatus(
            checkpoint.step,
            str(checkpoint.path),
            checkpoint.step_source,
            "failed" if kind == "failed" else "ok",
            error,
            matrices,
            from_cache=kind == "cached",
        )

    key = None
    if cache is not None:
        try:
            key = cache_store.cache_key(checkpoint.path, config)
        except OSError:
            key = None  # unreadable: the scan below says why
        cached = cache_store.load(cache, key) if key is not None else None
        if cached is not None:
            try:
                layers = report_from_json_dict(cached, str(cache)).layers
            except PssError:
                layers = None  # an entry from an incompatible version: rescan
            if layers is not None:
                if progress is not None:
                    progress(position, len(run.checkpoints), checkpoint.path, "cached")
                return layers, status("cached", None, len(layers))
    if progress is not None:
        progress(position, len(run.checkpoints), checkpoint.path, "scanning")
    from pss_cli.pipeline import scan_checkpoint

    try:
        report = scan_checkpoint(checkpoint.path, config)
    except (CheckpointError, ComputeError) as exc:
        # One bad checkpoint (unreadable, or a matrix the solver could not handle) is a gap in
        # the series; usage errors (a bad --include) still end the command.
        message = exc.message + (f" ({exc.hint})" if exc.hint else "")
        if notice is not None:
            notice(f"step {checkpoint.step}: cannot scan '{checkpoint.path}': {exc.message}")
        return (), status("failed", message, 0)
    if cache is not None and key is not None:
        try:
            cache_store.store(cache, key, report_to_json_dict(report))
        except OSError as exc:
            if notice is not None:
                notice(f"cannot write the scan cache in '{cache}': {exc.strerror or exc}")
    return report.layers, status("scanned", None, len(report.layers))


# Wrapper segments torch adds to parameter names: torch.compile's `_orig_mod.`, DDP's leading
# `module.`, FSDP1's and activation checkpointing's wrapped-module segments. A run that turns
# one on mid-way (compile after a resume) saved the same matrix under two names: two series,
# and the collapsed one read as "low from the start" (its first point), a collapse called
# healthy.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def series_key(name: str, index: int | None) -> tuple[str, int | None]:
    """The layer's identity across a run's checkpoints: its name without wrapper segments."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name.removeprefix("module."), index


def _layer_trend(
    key: tuple[str, int | None],
    first: LayerResult,
    name: str,
    steps: tuple[int, ...],
    scans: list[dict[tuple[str, int | None], LayerResult]],
    config: TrendConfig,
) -> LayerTrend:
    points = [scan.get(key) for scan in scans]
    stable_rank = tuple(p.stable_rank if p is not None else None for p in points)
    sigma_max = tuple(p.sigma_max if p is not None else None for p in points)
    # Only the checkpoints that hold this layer take part in its history.
    present = [i for i, p in enumerate(points) if p is not None]
    present_sr = [stable_rank[i] for i in present]
    low = [Flag.LOW_STABLE_RANK in points[i].flags for i in present]  # type: ignore[union-attr]
    bad = [Flag.NONFINITE in points[i].flags for i in present]  # type: ignore[union-attr]
    events = layer_warnings(
        [steps[i] for i in present],
        present_sr,
        [sigma_max[i] for i in present],
        low,
        bad,
        config,
        spectral=first.role not in config.quiet_roles,
    )
    return LayerTrend(
        name=name,  # as the newest checkpoint has it: the name `pss smooth --layers` matches
        index=first.index,
        role=first.role,
        matrix_shape=first.matrix_shape,
        stable_rank=stable_rank,
        sigma_max=sigma_max,
        warnings=events,
        low_from_start=low_from_start(present_sr, low, bad),
        below_floor=tuple(None if p is None else Flag.LOW_STABLE_RANK in p.flags for p in points),
        quantized=first.scale_tensor is not None,
    )


def _verdict(
    run: RunLayout,
    statuses: list[CheckpointStatus],
    layers: tuple[LayerTrend, ...],
    config: TrendConfig,
) -> Verdict:
    per_step: dict[int, set[str]] = {}
    for layer in layers:
        for event in layer.warnings:
            per_step.setdefault(event.step, set()).add(layer.display_name)
    warning_steps = sorted(per_step)
    first = warning_steps[0] if warning_steps else None
    collapse = next((s for s in warning_steps if len(per_step[s]) >= config.collapse_layers), None)
    loss_spike = loss_spike_step(run.log, config)
    grad_spike = grad_spike_step(run.log, config)

    healthy = [c for c in statuses if c.status != "failed" and (first is None or c.step < first)]
    last_healthy = healthy[-1] if healthy and first is not None else None
    repair = next((c for c in statuses if c.step == first and c.status != "failed"), None)
    # Smooth the matrices whose spectrum collapsed where the first warning fired: a fall below
    # the floor or a drop there, or sigma_max growth while below the floor (a matrix of a small
    # model can start below it, so its collapse to rank one is no `floor` event: leaving those
    # out left rank-1 matrices in the repaired checkpoint). When none collapsed, the ones that
    # warned at all.
    at_first = [layer for layer in layers if any(e.step == first for e in layer.warnings)]
    first_index = run_steps_index(statuses, first)
    collapsing = [
        layer
        for layer in at_first
        if any(
            e.step == first
            and (
                e.kind in SPECTRAL_COLLAPSE
                or (e.kind == SIGMA_GROWTH and layer.below_floor_at(first_index))
            )
            for e in layer.warnings
        )
    ]
    chosen = collapsing or at_first
    to_smooth = tuple(dict.fromkeys(layer.name for layer in chosen if not layer.quantized))
    quantized = tuple(dict.fromkeys(layer.name for layer in chosen if layer.quantized))
    status = HEALTHY if first is None else (COLLAPSE if collapse is not None else WARNING)
    return Verdict(
        status=status,
        first_warning_step=first,
        first_warning_layers=tuple(sorted(per_step[first])) if first is not None else (),
        collapse_step=collapse,
        warning_layers_per_step=tuple((s, len(per_step[s])) for s in warning_steps),
        last_healthy_step=last_healthy.step if last_healthy is not None else None,
        last_healthy_checkpoint=last_healthy.path if last_healthy is not None else None,
        repair_checkpoint=repair.path if repair is not None else None,
        layers_to_smooth=to_smooth,
        loss_spike_step=loss_spike,
        grad_spike_step=grad_spike,
        lead_steps_loss=_lead(loss_spike, first),
        lead_steps_grad=_lead(grad_spike, first),
        commands=_commands(repair, last_healthy, to_smooth, quantized),
    )


def run_steps_index(statuses: list[CheckpointStatus], step: int | None) -> int:
    """Position of `step` among the run's checkpoints (the index of the layers' series)."""
    steps = [c.step for c in statuses]
    return steps.index(step) if step in steps else len(steps)


def _lead(spike: int | None, first_warning: int | None) -> int | None:
    return spike - first_warning if spike is not None and first_warning is not None else None


def _commands(
    repair: CheckpointStatus | None,
    last_healthy: CheckpointStatus | None,
    layers: tuple[str, ...],
    quantized: tuple[str, ...] = (),
) -> tuple[str, ...]:
    commands = []
    if repair is not None and layers:
        source = Path(repair.path)
        out = default_output(source)  # the same default `pss smooth` suggests
        parts = ["pss", "smooth", str(source)]
        for name in layers:
            parts += ["--layers", glob_literal(name)]
        parts += ["--out", str(out)]
        commands.append(shlex.join(parts))
    if last_healthy is not None:
        commands.append(f"# or resume from {shlex.quote(last_healthy.path)} with a lower LR")
    if quantized:
        shown = ", ".join(quantized[:3]) + (" ..." if len(quantized) > 3 else "")
        commands.append(
            f"# {shown}: stored quantized, which pss smooth leaves alone (it would have to "
            "re-quantize): repair the float checkpoint it was quantized from"
        )
    incomplete = incomplete_trainer_save(Path(repair.path)) if repair is not None else None
    if incomplete is not None:
        commands.append(f"# note: {incomplete}")
    return tuple(commands)
