"""pss guard where real training code leaves the simple loop: GradScaler stepping the wrapped
optimizer, parameters frozen or unfrozen mid-run, zero-initialised matrices, a non-finite or
non-scalar loss, optimizers other than Adam under `optimizer_policy="reset"`, and metric-driven
schedulers. Each test fails on the version before the fix it names.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pss_cli.config import OptimizerPolicy
from pss_cli.core.power import power_step, random_unit_vector
from pss_cli.errors import GuardConfigError
from pss_cli.guard import Guard, GuardConfig, TriggerAction
from tests.guard_factory import loss_of, make_model, make_optimizer
from tests.guard_factory import (
    one_thread as one_thread,  # autouse: one intra-op thread
)

# Armed at once; every step after the first fires (any norm > 1e-9 x EMA) and smooths.
SMOOTH_EVERY_STEP = GuardConfig(
    spike_factor=1e-9, warmup_steps=0, cooldown_steps=0, spike_action=TriggerAction.SMOOTH
)


def _step(model: nn.Module, guard: Guard, step: int) -> Any:
    loss = loss_of(model, step)
    loss.backward()
    decision = guard.step(loss)
    guard.optimizer.zero_grad(set_to_none=True)
    return decision


# --- GradScaler.step(wrapped fused optimizer) ------------------------------------------------


def _scaled_run(fused: bool, guarded: bool) -> nn.Module:
    model = make_model(dropout=0.0)
    inner = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=fused)
    stepped: torch.optim.Optimizer = inner
    if guarded:
        stepped = Guard(model, inner, GuardConfig(spike_factor=1e9)).wrap_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(model, step)
        scaler.scale(loss).backward()
        scaler.step(stepped)  # no unscale_ first: GradScaler's own path
        scaler.update()
        stepped.zero_grad()
    return model


@pytest.mark.parametrize("fused", [False, True])
def test_gradscaler_stepping_the_wrapped_optimizer_equals_the_unguarded_run(fused: bool) -> None:
    # Before: a fused inner optimizer made the proxy claim `_step_supports_amp_scaling`, so
    # GradScaler skipped its unscale and set grad_scale on the proxy, which the fused kernel
    # never read: the weights moved 1024x too far.
    plain, guarded = _scaled_run(fused, False), _scaled_run(fused, True)
    for (name, a), b in zip(plain.named_parameters(), guarded.parameters(), strict=True):
        assert torch.equal(a, b), name


# --- the trainable set changes after construction ------------------------------------------


def test_a_matrix_frozen_after_construction_is_never_smoothed() -> None:
    model = make_model()
    guard = Guard(model, make_optimizer(model), SMOOTH_EVERY_STEP)
    _step(model, guard, 0)
    model.h[0].requires_grad_(False)  # type: ignore[operator]
    frozen = {n: p.detach().clone() for n, p in model.h[0].named_parameters()}
    smoothed: set[str] = set()
    for step in range(1, 4):
        smoothed.update(_step(model, guard, step).smoothed)
    assert smoothed, "the trigger must smooth something, or the test proves nothing"
    assert not any(name.startswith("h.0.") for name in smoothed)
    for name, p in model.h[0].named_parameters():
        assert torch.equal(p, frozen[name]), name
    assert [e.kind for e in guard.events].count("restart") == 1


def test_a_matrix_unfrozen_later_is_monitored_and_smoothed() -> None:
    model = make_model()
    model.h[1].requires_grad_(False)  # type: ignore[operator]
    guard = Guard(model, make_optimizer(model), SMOOTH_EVERY_STEP)
    assert not any(spec.name.startswith("h.1.") for spec in guard.specs)
    _step(model, guard, 0)
    model.h[1].requires_grad_(True)  # type: ignore[operator]
    smoothed: set[str] = set()
    for step in range(1, 4):  # the spike rule warms up again after the restart
        smoothed.update(_step(model, guard, step).smoothed)
    assert any(name.startswith("h.1.") for name in smoothed)
    assert any(spec.name.startswith("h.1.") for spec in guard.specs)


def test_progressive_unfreezing_from_an_excluded_head_is_accepted() -> None:
    # Only the (tied, excluded) embedding/head trainable: before, construction refused ("no
    # 2-D weight left to monitor") although the blocks were about to be unfrozen.
    model = make_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "wte.weight")
    guard = Guard(model, make_optimizer(model), GuardConfig(check_every=1, matrices_per_check=1))
    assert guard.specs == []
    assert not _step(model, guard, 0).skipped
    model.requires_grad_(True)
    _step(model, guard, 1)
    fresh = make_model()
    expected = [spec.name for spec in Guard(fresh, make_optimizer(fresh)).specs]
    assert [spec.name for spec in guard.specs] == expected  # what construction would monitor
    assert guard.last_decision is not None


def test_a_model_without_any_eligible_matrix_is_still_refused() -> None:
    model = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(GuardConfigError, match="no trainable 2-D weight"):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))


# --- zero matrices in the monitor ------------------------------------------------------------


def test_power_step_on_a_zero_matrix_keeps_its_vector() -> None:
    start = random_unit_vector(8, torch.Generator().manual_seed(0), torch.float32)
    sigma, vector = power_step(torch.zeros(5, 8), start, 2)
    assert float(sigma) == 0.0
    assert torch.equal(vector, start)  # before: all zeros, from which sigma stayed 0 forever
    matrix = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    sigma, _ = power_step(matrix, vector, 30)
    assert float(sigma) == pytest.approx(float(torch.linalg.matrix_norm(matrix, 2)), rel=1e-5)


def test_a_zero_initialised_matrix_is_measured_once_it_moves() -> None:
    # A LoRA-style B initialised to zero: its first visit read sigma 0 and stored a zero vector.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4, bias=False), nn.Linear(4, 16, bias=False))
    nn.init.zeros_(model[1].weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = Guard(model, optimizer, GuardConfig(check_every=1, matrices_per_check=2))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    for _ in range(6):
        loss = (model(x) - x).square().mean()
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad()
    true = float(torch.linalg.matrix_norm(model[1].weight.detach(), 2))
    assert true > 0
    recent = guard.spectral.recent_stable_rank("1.weight")
    assert recent is not None and math.isfinite(recent)  # before: no history, ever
    assert guard.monitor.vectors[1] is not None
    assert float(guard.monitor.vectors[1].abs().amax()) > 0


# --- the loss ------------------------------------------------------------------------------


def test_a_nonfinite_loss_is_reported_as_nan_and_logged_as_null(tmp_path: Path) -> None:
    model = make_model()
    log = tmp_path / "events.jsonl"
    guard = Guard(model, make_optimizer(model), GuardConfig(log_every=1), event_log=log)
    loss = loss_of(model, 0) * float("nan")
    loss.backward()
    decision = guard.step(loss)
    guard.close()
    assert decision.skipped and decision.loss is not None and math.isnan(decision.loss)
    nonfinite = next(e for e in guard.events if e.kind == "nonfinite")
    assert math.isnan(nonfinite.detail["loss"])  # before: 0.0 everywhere
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(r.get("loss", None) is None for r in records if "loss" in r)
    assert any("loss" in r for r in records)


@pytest.mark.parametrize("shape", [(3,), (0,), (2, 2)])
def test_a_loss_that_is_not_one_number_is_refused(shape: tuple[int, ...]) -> None:
    model = make_model()
    guard = Guard(model, make_optimizer(model))
    loss_of(model, 0).backward()
    with pytest.raises(GuardConfigError, match="one number"):
        guard.step(torch.ones(shape))


# --- optimizer_policy="reset" beyond Adam --------------------------------------------------


def _reset_after_one_smooth(optimizer_cls: type, **kwargs: Any) -> tuple[Guard, nn.Module]:
    model = make_model(dropout=0.0)
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    config = GuardConfig(
        spike_factor=1e-9,
        warmup_steps=1,
        cooldown_steps=1000,
        spike_action=TriggerAction.SMOOTH,
        optimizer_policy=OptimizerPolicy.RESET,
    )
    guard = Guard(model, optimizer, config)
    decision = _step(model, guard, 0)
    assert not decision.skipped
    decision = _step(model, guard, 1)
    assert "smooth" in decision.actions and decision.smoothed
    return guard, model


def test_reset_zeroes_adafactors_factored_moments() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every state entry is a known one: no warning
        guard, model = _reset_after_one_smooth(torch.optim.Adafactor, lr=1e-2)
    weight = model.h[0].c_fc.weight  # type: ignore[union-attr]
    state = guard.optimizer.state[weight]
    assert float(state["row_var"].abs().sum()) == 0.0  # before: left untouched
    assert float(state["col_var"].abs().sum()) == 0.0


class IterateKeepingSGD(torch.optim.SGD):
    """SGD that also keeps an average of the weights in its state (as ASGD's `ax`, or
    schedule-free's `z`): a state tensor shaped like the weight that is not a moment."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state.setdefault("z", torch.zeros_like(p)).lerp_(p, 0.5)
        return out


def test_reset_leaves_state_that_is_not_a_moment_and_says_so() -> None:
    with pytest.warns(RuntimeWarning, match="z of"):
        guard, model = _reset_after_one_smooth(IterateKeepingSGD, lr=1e-2, momentum=0.9)
    weight = model.h[0].c_fc.weight  # type: ignore[union-attr]
    state = guard.optimizer.state[weight]
    assert float(state["z"].abs().sum()) > 0  # before: zeroed, the averaged weights wiped
    assert float(state["momentum_buffer"].abs().sum()) == 0.0


def test_lbfgs_is_refused_at_construction() -> None:
    model = make_model()
    with pytest.raises(GuardConfigError, match="LBFGS"):
        Guard(model, torch.optim.LBFGS(model.parameters()))


# --- schedulers ------------------------------------------------------------------------------


class MetricSchedule(torch.optim.lr_scheduler.LRScheduler):
    """A metric-driven schedule that is not a ReduceLROnPlateau (transformers' GreedyLR)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.metrics_seen: list[float] = []
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, metrics: float | None = None) -> None:  # type: ignore[override]
        if metrics is not None:
            self.metrics_seen.append(metrics)
        super().step()


def test_a_metric_step_is_never_held_back_by_a_skipped_step() -> None:
    model = make_model()
    optimizer = make_optimizer(model)
    config = GuardConfig(spike_factor=1e-9, warmup_steps=0, cooldown_steps=0)  # skips
    guard = Guard(model, optimizer, config)
    schedule = guard.wrap_scheduler(MetricSchedule(optimizer))
    _step(model, guard, 0)
    assert _step(model, guard, 1).skipped
    schedule.step(0.5)  # an evaluation after a skipped step
    schedule.step()  # a per-step call after it: held back
    assert schedule.metrics_seen == [0.5]
    assert schedule.last_epoch == 1


def test_norm_shares_follow_a_process_group_started_after_the_guard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shares were fixed at construction: a guard built before init_process_group counted a
    # DDP gradient once per rank (sqrt(world) too large) for the whole run.
    model = make_model()
    guard = Guard(model, make_optimizer(model))
    assert set(guard._shares) == {1.0}
    monkeypatch.setattr("pss_cli.guard.guard.world_size", lambda: 2)
    guard._refresh_watched()
    assert set(guard._shares) == {0.5}


def test_a_resumed_guard_keeps_saved_vectors_of_matrices_unfrozen_after_the_load() -> None:
    # Resume of a progressive-unfreezing run: the guard is rebuilt with block 1 frozen (as the
    # schedule has it at the start), loads its state, then the schedule unfreezes the block.
    # The saved vectors of block 1 were dropped and redrawn, so the resumed run diverged from
    # the uninterrupted one.
    config = GuardConfig(check_every=1, matrices_per_check=4, spike_factor=1e9)

    def build() -> tuple[nn.Module, Guard]:
        model = make_model(dropout=0.0)
        model.h[1].requires_grad_(False)  # type: ignore[operator]
        return model, Guard(model, make_optimizer(model), config)

    model, guard = build()
    for step in range(2):
        _step(model, guard, step)
    model.h[1].requires_grad_(True)  # type: ignore[operator]
    for step in range(2, 8):
        _step(model, guard, step)
    # Copies: the optimizer's state dict holds its live tensors, which the next steps change.
    state = copy.deepcopy(guard.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(guard.optimizer.state_dict())
    for step in range(8, 10):
        _step(model, guard, step)

    resumed_model, resumed = build()
    resumed_model.load_state_dict(weights)
    resumed.optimizer.load_state_dict(optimizer_state)
    resumed.load_state_dict(state)
    resumed_model.h[1].requires_grad_(True)  # type: ignore[operator]
    for step in range(8, 10):
        _step(resumed_model, resumed, step)
    assert [s.name for s in resumed.specs] == [s.name for s in guard.specs]
    for name, a, b in zip(
        [s.name for s in guard.specs], guard.monitor.vectors, resumed.monitor.vectors, strict=True
    ):
        assert a is not None and b is not None and torch.equal(a, b), name


def test_lbfgs_behind_a_clipping_wrapper_is_refused_too() -> None:
    from pss_cli.guard.adapters.clip import ClipThenStep

    model = make_model()
    lbfgs = torch.optim.LBFGS(model.parameters())
    wrapped = ClipThenStep(lbfgs, list(model.parameters()), 1.0, "norm")
    with pytest.raises(GuardConfigError, match="LBFGS"):
        Guard(model, wrapped)


def test_a_step_with_all_gradients_zero_does_not_enter_the_averages() -> None:
    # zero_grad(set_to_none=False), then a step without backward: every gradient exists and is
    # exactly zero. It pulled the spike EMA towards 0 (1.72 -> 0.91 over six such steps).
    model = make_model()
    optimizer = make_optimizer(model)
    guard = Guard(model, optimizer, GuardConfig(warmup_steps=0))
    for step in range(3):
        loss_of(model, step).backward()
        guard.step()
        optimizer.zero_grad(set_to_none=False)
    ema = guard.spike.ema
    assert ema is not None and ema > 0
    for _ in range(3):
        guard.step()  # no backward: zero gradients
    assert guard.spike.ema == ema


def test_a_float16_smooth_beyond_the_range_is_not_written() -> None:
    # The finiteness check ran in float64 before the cast: a float16 weight whose clipped
    # result leaves float16's range (65504) would have been written as inf.
    from tests.spectra_factory import float16_edge

    m, n = 128, 256
    g = torch.Generator().manual_seed(2)
    bulk_and_spike = float16_edge(m, n)
    model = nn.Sequential(nn.Linear(n, m, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(bulk_and_spike)
    model.half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = Guard(model, optimizer, SMOOTH_EVERY_STEP)
    x = (torch.randn(4, n, generator=g) * 1e-3).half()  # outputs well inside float16
    decisions = []
    for _ in range(2):
        loss = model(x).float().square().mean()
        loss.backward()
        decisions.append(guard.step(loss))
        optimizer.zero_grad()
    assert "smooth" in decisions[1].actions and decisions[1].smoothed == ()
    assert bool(torch.isfinite(model[0].weight).all())
    smooth = next(e for e in guard.events if e.kind == "smooth")
    assert "not finite in torch.float16" in smooth.detail["matrices"][0]["note"]
