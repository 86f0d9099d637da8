"""Scale the learning rates a training checkpoint will resume with (``pss smooth --lr-scale``).

A trainer that restores its optimizer and scheduler state ignores the learning rate given on the
command line at resume: HF Trainer loads ``optimizer.pt`` + ``scheduler.pt``, Lightning loads
``optimizer_states`` + ``lr_schedulers`` from the ``.ckpt``, accelerate loads ``optimizer.bin`` +
``scheduler.bin``. Each keeps the LR in two places: the optimizer's param groups (``lr`` used by
the next step, ``initial_lr`` from which schedulers restart) and the scheduler's own state
(``base_lrs`` that LambdaLR / cosine / linear-warmup multiply by their factor, ``_last_lr``, and
per-scheduler bounds such as OneCycleLR's ``max_lr``/``min_lr`` kept in the param groups,
CosineAnnealingLR's ``eta_min``, CyclicLR's ``max_lrs``, ReduceLROnPlateau's ``min_lrs``).
Scaling all of them by the same factor makes the resumed schedule the old one times the factor.

Pure dict work on loaded state dicts (torch is needed only to load and save the files).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, TypeGuard

# Param-group keys that hold a learning rate (torch.optim, OneCycleLR, CyclicLR write these).
GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# Scheduler state keys that hold learning rates (lists, one per group, or one number).
SCHEDULER_LR_KEYS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs", "eta_min", "end_lr")
# Scheduler state keys holding nested schedulers (SequentialLR, ChainedScheduler).
_NESTED_KEYS = ("_schedulers",)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def scaled(value: Any, factor: float) -> tuple[Any, bool]:
    """``value`` times ``factor`` when it is a number or a list/tuple of numbers."""
    if _is_number(value):
        return float(value) * factor, True
    if isinstance(value, list | tuple) and value and all(_is_number(v) for v in value):
        return type(value)(float(v) * factor for v in value), True
    return value, False


def numbers(value: Any) -> list[float]:
    """The LR numbers ``value`` holds (a number, or a list/tuple of numbers)."""
    if _is_number(value):
        return [float(value)]
    if isinstance(value, list | tuple):
        return [float(v) for v in value if _is_number(v)]
    return []


def scale_optimizer(state_dict: dict[str, Any], factor: float) -> list[str]:
    """Multiply every LR in ``state_dict['param_groups']`` by ``factor`` in place; returns the
    keys changed (``param_groups[0].lr`` ...)."""
    changed: list[str] = []
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list):
        return changed
    for i, group in enumerate(groups):
        if not isinstance(group, dict):
            continue
        for key in GROUP_LR_KEYS:
            if key in group:
                group[key], done = scaled(group[key], factor)
                if done:
                    changed.append(f"param_groups[{i}].{key}")
    return changed


def scale_scheduler(state: dict[str, Any], factor: float, where: str = "") -> list[str]:
    """Multiply the LRs a torch LR scheduler's ``state_dict()`` keeps by ``factor`` in place."""
    changed: list[str] = []
    for key in SCHEDULER_LR_KEYS:
        if key in state:
            state[key], done = scaled(state[key], factor)
            if done:
                changed.append(f"{where}{key}")
    for key in _NESTED_KEYS:
        nested = state.get(key)
        if isinstance(nested, list):
            for i, child in enumerate(nested):
                if isinstance(child, dict):
                    changed.extend(scale_scheduler(child, factor, f"{where}{key}[{i}]."))
    return changed


def optimizer_lrs(state_dict: Any) -> list[float]:
    """Every ``lr`` of the param groups, in order (for reports and verification)."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list):
        return []
    return [float(g["lr"]) for g in groups if isinstance(g, dict) and _is_number(g.get("lr"))]


def scheduler_lrs(state: Any) -> list[float]:
    """Every number under the scheduler's LR keys, nested schedulers included, in order."""
    return list(_scheduler_numbers(state))


def _scheduler_numbers(state: Any) -> Iterator[float]:
    if not isinstance(state, dict):
        return
    for key in SCHEDULER_LR_KEYS:
        value = state.get(key)
        if _is_number(value):
            yield float(value)
        elif isinstance(value, list | tuple):
            yield from (float(v) for v in value if _is_number(v))
    for key in _NESTED_KEYS:
        nested = state.get(key)
        if isinstance(nested, list):
            for child in nested:
                yield from _scheduler_numbers(child)


def lr_values(optimizers: list[Any], schedulers: list[Any]) -> list[float]:
    """Every LR number of the given optimizer and scheduler states (verification compares the
    written file's values with the input's times the factor)."""
    values: list[float] = []
    for state_dict in optimizers:
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        for group in groups if isinstance(groups, list) else []:
            for key in GROUP_LR_KEYS:
                value = group.get(key) if isinstance(group, dict) else None
                if _is_number(value):
                    values.append(float(value))
    for state in schedulers:
        values.extend(scheduler_lrs(state))
    return values


def values_match(before: list[float], after: list[float], factor: float) -> bool:
    """``after`` is ``before`` times ``factor`` (to float64 rounding)."""
    return len(before) == len(after) and all(
        math.isclose(b * factor, a, rel_tol=1e-12, abs_tol=0.0)
        for b, a in zip(before, after, strict=True)
    )
