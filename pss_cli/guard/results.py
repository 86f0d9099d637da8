"""Frozen, torch-free results of the guard: one `GuardDecision` per step, `GuardEvent`s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GuardDecision:
    """What `Guard.step` did at guard step `step` (0-based count of `step` calls)."""

    step: int
    skipped: bool  # the optimizer step was not taken
    triggered: bool  # some rule fired (whatever its action), or the step was not finite
    reason: str | None  # why, in words (None on an ordinary step)
    smoothed: tuple[str, ...]  # parameter names smoothed in place (Q/K/V parts as "name[q]")
    grad_norm: float  # the norm the spike rule watches (GuardConfig.norm_kind); NaN if not finite
    loss: float | None = None
    actions: tuple[str, ...] = ()  # e.g. ("skip", "smooth"); () on an ordinary step


@dataclass(frozen=True)
class GuardEvent:
    """Something worth recording: kind is "trigger", "skip", "smooth", "nonfinite", "raise" or
    "restart" (the trainable parameters changed: the rules warm up again).

    detail holds JSON-able values only (numbers, strings, lists, dicts).
    """

    step: int
    kind: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)
