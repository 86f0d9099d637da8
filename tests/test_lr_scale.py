"""`--lr-scale` arithmetic against torch's own schedulers: a resumed optimizer + scheduler whose
saved states were scaled by f follow f times the unscaled schedule, step for step."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as sched

from pss_cli.checkpoint.lr_scale import lr_values, scale_optimizer, scale_scheduler, values_match

Factory = Callable[[torch.optim.Optimizer], Any]

SCHEDULERS: dict[str, Factory] = {
    "lambda (HF linear warm-up/decay)": lambda o: sched.LambdaLR(
        o, lambda s: min(1.0, (s + 1) / 5) * max(0.0, 1 - s / 40)
    ),
    "cosine annealing": lambda o: sched.CosineAnnealingLR(o, T_max=30, eta_min=1e-4),
    "one-cycle": lambda o: sched.OneCycleLR(o, max_lr=1e-2, total_steps=40),
    "linear": lambda o: sched.LinearLR(o, start_factor=0.1, total_iters=10),
    "step": lambda o: sched.StepLR(o, step_size=4, gamma=0.5),
    "cyclic": lambda o: sched.CyclicLR(o, base_lr=1e-4, max_lr=1e-2, step_size_up=5),
    "sequential warm-up + cosine": lambda o: sched.SequentialLR(
        o,
        [sched.LinearLR(o, 0.1, total_iters=5), sched.CosineAnnealingLR(o, T_max=30)],
        milestones=[5],
    ),
    "polynomial": lambda o: sched.PolynomialLR(o, total_iters=30, power=2.0),
}


def _setup(make: Factory) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    return model, optimizer, make(optimizer)


def _steps(model: torch.nn.Module, optimizer: Any, scheduler: Any, n: int) -> list[float]:
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scaled_states_resume_at_the_scaled_schedule(name: str) -> None:
    make = SCHEDULERS[name]
    model, optimizer, scheduler = _setup(make)
    _steps(model, optimizer, scheduler, 12)
    opt_state = copy.deepcopy(optimizer.state_dict())
    sched_state = copy.deepcopy(scheduler.state_dict())
    reference = _steps(model, optimizer, scheduler, 15)  # the unscaled continuation

    before = lr_values([opt_state], [sched_state])
    scale_optimizer(opt_state, 0.5)
    scale_scheduler(sched_state, 0.5)
    assert values_match(before, lr_values([opt_state], [sched_state]), 0.5)

    model2, optimizer2, scheduler2 = _setup(make)
    optimizer2.load_state_dict(opt_state)
    scheduler2.load_state_dict(sched_state)
    resumed = _steps(model2, optimizer2, scheduler2, 15)
    for half, full in zip(resumed, reference, strict=True):
        assert math.isclose(half, 0.5 * full, rel_tol=1e-9, abs_tol=1e-15), (name, half, full)


def test_plateau_scheduler_bounds_scale_too() -> None:
    _, optimizer, _ = _setup(lambda o: None)
    plateau = sched.ReduceLROnPlateau(optimizer, min_lr=1e-3)
    state = plateau.state_dict()
    assert "min_lrs" in scale_scheduler(state, 0.5)
    assert state["min_lrs"] == [5e-4]
