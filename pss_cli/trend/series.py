"""Frozen, torch-free results of `pss trend` and their JSON form.

JSON schema `pss-trend`, version 1 (additions keep the version; renames or removals bump it):
schema, schema_version, pss_version, run, settings, steps[], checkpoints[], layers[] (one value
per step in `stable_rank` / `sigma_max`, null where undefined or not scanned), log[], verdict,
guard (the guard's event-log overlay, null without one), timings. `timings` is the only field
that changes between two runs on the same input and seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pss_cli.results import display_name, finite_json
from pss_cli.trend.detect import SPECTRAL_COLLAPSE, WarningEvent
from pss_cli.trend.discovery import LogPoint
from pss_cli.trend.guard_log import GuardOverlay, overlay_to_json_dict

TREND_SCHEMA = "pss-trend"
TREND_SCHEMA_VERSION = 1

HEALTHY = "healthy"
WARNING = "warning"
COLLAPSE = "collapse"


@dataclass(frozen=True)
class CheckpointStatus:
    step: int
    path: str
    step_source: str  # name | trainer_state | order
    status: str  # ok | failed
    error: str | None  # why it could not be scanned (status "failed")
    matrices: int
    # Served from the scan cache: run-dependent, so not in the JSON's checkpoints (only counted
    # in `timings`, the one run-dependent field).
    from_cache: bool = False


@dataclass(frozen=True)
class LayerTrend:
    name: str
    index: int | None
    role: str
    matrix_shape: tuple[int, int]
    stable_rank: tuple[float | None, ...]  # one per checkpoint, in step order
    sigma_max: tuple[float | None, ...]
    warnings: tuple[WarningEvent, ...]
    # Already below the scan's floor at its first checkpoint: no `floor` warning can fire (it did
    # not fall while watched), but the table and JSON say so.
    low_from_start: bool = False
    # Per checkpoint: below the scan's floor there (None where the layer is absent or has no
    # spectrum). Not in the JSON (stable_rank says it); used to pick the layers to smooth.
    below_floor: tuple[bool | None, ...] = ()
    # Stored quantized (dequantized with a scale to be analysed): `pss smooth` leaves it alone
    # (it would have to re-quantize), so the recipe cannot name it.
    quantized: bool = False

    def below_floor_at(self, step_index: int) -> bool:
        return bool(self.below_floor[step_index]) if step_index < len(self.below_floor) else False

    @property
    def display_name(self) -> str:
        return display_name(self.name, self.index)

    @property
    def first_warning(self) -> WarningEvent | None:
        return self.warnings[0] if self.warnings else None

    @property
    def collapsing(self) -> bool:
        return any(w.kind in SPECTRAL_COLLAPSE for w in self.warnings)


@dataclass(frozen=True)
class Verdict:
    status: str  # healthy | warning | collapse
    first_warning_step: int | None
    first_warning_layers: tuple[str, ...]  # layers warning at the first warning step
    collapse_step: int | None  # first step where >= collapse_layers layers warn together
    warning_layers_per_step: tuple[tuple[int, int], ...]  # (step, layers warning there)
    last_healthy_step: int | None
    last_healthy_checkpoint: str | None
    repair_checkpoint: str | None  # the checkpoint where the first warning fired
    layers_to_smooth: tuple[str, ...]
    loss_spike_step: int | None
    grad_spike_step: int | None
    lead_steps_loss: int | None  # loss spike step - first warning step (> 0: warned ahead)
    lead_steps_grad: int | None
    commands: tuple[str, ...]  # what to run next, shell-quoted


@dataclass(frozen=True)
class TrendReport:
    pss_version: str
    run: str
    settings: dict[str, Any]
    steps: tuple[int, ...]
    checkpoints: tuple[CheckpointStatus, ...]
    layers: tuple[LayerTrend, ...]  # in the checkpoints' tensor order
    log: tuple[LogPoint, ...]
    log_source: str | None
    verdict: Verdict
    timings: dict[str, float]
    schema_version: int = TREND_SCHEMA_VERSION
    # The guard's event log (`pss_cli.guard`), when the run has one: triggers and skipped steps.
    guard: GuardOverlay | None = None

    @property
    def warned_layers(self) -> tuple[LayerTrend, ...]:
        """Layers with a warning, by first warning step, then lowest final stable rank."""
        warned = [layer for layer in self.layers if layer.warnings]
        return tuple(sorted(warned, key=_warned_key))


def _warned_key(layer: LayerTrend) -> tuple[int, int, float]:
    first = layer.warnings[0]
    last_sr = next((v for v in reversed(layer.stable_rank) if v is not None), math.inf)
    return (first.step, 0 if layer.collapsing else 1, last_sr)


def trend_to_json_dict(report: TrendReport) -> dict[str, Any]:
    verdict = report.verdict
    data: dict[str, Any] = finite_json(
        {
            "schema": TREND_SCHEMA,
            "schema_version": report.schema_version,
            "pss_version": report.pss_version,
            "run": report.run,
            "settings": report.settings,
            "steps": list(report.steps),
            "checkpoints": [
                {
                    "step": c.step,
                    "path": c.path,
                    "step_source": c.step_source,
                    "status": c.status,
                    "error": c.error,
                    "matrices": c.matrices,
                }
                for c in report.checkpoints
            ],
            "layers": [
                {
                    "name": layer.name,
                    "index": layer.index,
                    "role": layer.role,
                    "matrix_shape": list(layer.matrix_shape),
                    "stable_rank": list(layer.stable_rank),
                    "sigma_max": list(layer.sigma_max),
                    "low_from_start": layer.low_from_start,
                    "warnings": [
                        {"kind": w.kind, "step": w.step, "value": w.value, "threshold": w.reference}
                        for w in layer.warnings
                    ],
                }
                for layer in report.layers
            ],
            "log": [{"step": p.step, "loss": p.loss, "grad_norm": p.grad_norm} for p in report.log],
            "log_source": report.log_source,
            "verdict": {
                "status": verdict.status,
                "first_warning_step": verdict.first_warning_step,
                "first_warning_layers": list(verdict.first_warning_layers),
                "collapse_step": verdict.collapse_step,
                "warning_layers_per_step": [
                    {"step": s, "layers": n} for s, n in verdict.warning_layers_per_step
                ],
                "last_healthy_step": verdict.last_healthy_step,
                "last_healthy_checkpoint": verdict.last_healthy_checkpoint,
                "repair_checkpoint": verdict.repair_checkpoint,
                "layers_to_smooth": list(verdict.layers_to_smooth),
                "loss_spike_step": verdict.loss_spike_step,
                "grad_spike_step": verdict.grad_spike_step,
                "lead_steps_loss": verdict.lead_steps_loss,
                "lead_steps_grad": verdict.lead_steps_grad,
                "commands": list(verdict.commands),
            },
            "guard": overlay_to_json_dict(report.guard) if report.guard is not None else None,
            "timings": report.timings,
        }
    )
    return data
