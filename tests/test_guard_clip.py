"""ClipThenStep (clip after the guard's decision) in a plain loop; the Lightning scheduler proxy."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from pss_cli.errors import GuardConfigError
from pss_cli.guard import Guard, GuardConfig, NormKind, TriggerAction
from pss_cli.guard.adapters.clip import ClipThenStep, clip_grad_norm_like_accelerate
from tests.guard_factory import (
    assert_bit_identical,
    loss_of,
    make_model,
    make_optimizer,
    snapshot,
    train,
)

STEPS, MAX_NORM = 12, 0.05  # a clip far below the tiny model's gradient norms: always active


def test_guard_sees_the_unclipped_norm_and_the_run_matches_a_self_clipping_loop() -> None:
    # The unguarded loop as people write it: clip, then step.
    plain_model = make_model()
    plain_opt = make_optimizer(plain_model)
    norms: list[float] = []

    def clip_and_step(loss: torch.Tensor) -> None:
        norms.append(float(torch.nn.utils.clip_grad_norm_(plain_model.parameters(), MAX_NORM)))
        plain_opt.step()

    train(plain_model, STEPS, clip_and_step, lambda: plain_opt.zero_grad(set_to_none=True))

    model = make_model()
    optimizer = make_optimizer(model)
    clipped = ClipThenStep(optimizer, model.parameters(), MAX_NORM)
    guard = Guard(model, clipped, GuardConfig(norm_kind=NormKind.L2))
    decisions = train(model, STEPS, guard.step, lambda: optimizer.zero_grad(set_to_none=True))

    assert_bit_identical(snapshot(model, optimizer), snapshot(plain_model, plain_opt))
    watched = [d.grad_norm for d in decisions]  # type: ignore[attr-defined]
    assert min(watched) > MAX_NORM  # the guard saw the raw gradients, not the clipped ones
    assert watched == pytest.approx(norms, rel=1e-5)


def test_a_skipped_step_is_not_clipped_either() -> None:
    model = make_model()
    optimizer = make_optimizer(model)
    clipped = ClipThenStep(optimizer, model.parameters(), MAX_NORM)
    config = GuardConfig(
        spike_factor=1e-6, warmup_steps=3, cooldown_steps=100, spike_action=TriggerAction.SKIP
    )
    guard = Guard(model, clipped, config)
    train(model, 3, guard.step, lambda: optimizer.zero_grad(set_to_none=True))
    loss_of(model, 3).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    before = snapshot(model, optimizer)
    assert guard.step().skipped
    assert_bit_identical(snapshot(model, optimizer), before)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name]), name


def test_accelerate_style_norm_matches_torch_and_clips_the_same() -> None:
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 7)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b, strict=True):
        pa.grad = torch.randn_like(pa) * 10
        pb.grad = pa.grad.clone()
    total = clip_grad_norm_like_accelerate(a, 1.0)
    reference = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert math.isclose(float(total), float(reference), rel_tol=1e-6)
    for pa, pb in zip(a, b, strict=True):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-6)  # type: ignore[arg-type]


def test_bad_clip_value_is_refused() -> None:
    model = make_model()
    with pytest.raises(GuardConfigError, match="max_grad_norm must be positive"):
        ClipThenStep(make_optimizer(model), model.parameters(), 0.0)


def _lightning_holder() -> Any:
    import lightning.pytorch as pl

    class Holder(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

    return Holder()


_SKIP_THIRD = GuardConfig(
    spike_factor=1e-6, warmup_steps=2, cooldown_steps=100, spike_action=TriggerAction.SKIP
)


def test_lightning_plateau_scheduler_keeps_its_type_and_steps_on_its_metric_after_a_skip() -> None:
    from pss_cli.guard.adapters.lightning import guarded_optimizers

    holder = _lightning_holder()
    optimizer = make_optimizer(holder)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    out = guarded_optimizers(
        holder, optimizer, plateau, _SKIP_THIRD, interval="epoch", monitor="loss"
    )
    scheduler = out["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert scheduler.optimizer is out["optimizer"] and out["lr_scheduler"]["monitor"] == "loss"
    guarded = out["optimizer"]
    lr = optimizer.param_groups[0]["lr"]
    for step in range(3):  # steps 0, 1 taken; step 2 skipped (the spike rule is armed after 2)
        loss_of(holder.net, step).backward()
        guarded.step()
        guarded.zero_grad()
        scheduler.step(1.0 + step)  # a worsening metric: each evaluation halves the LR
    assert guarded.guard.last_decision.skipped
    # The validation metric is real whatever one training step did: both worsenings count.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr / 4)


@pytest.mark.parametrize(("interval", "steps_taken"), [("step", 2), ("epoch", 3)])
def test_lightning_scheduler_waits_after_a_skip_only_when_it_counts_optimizer_steps(
    interval: str, steps_taken: int
) -> None:
    from pss_cli.guard.adapters.lightning import guarded_optimizers

    holder = _lightning_holder()
    optimizer = make_optimizer(holder)
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    out = guarded_optimizers(holder, optimizer, step_lr, _SKIP_THIRD, interval=interval)
    scheduler = out["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    guarded = out["optimizer"]
    for step in range(3):  # with interval="epoch", each loop stands for an epoch's last step
        loss_of(holder.net, step).backward()
        guarded.step()
        guarded.zero_grad()
        scheduler.step()
    assert guarded.guard.last_decision.skipped
    # An epoch schedule loses no epoch to a skipped last batch (it once lost a whole one).
    assert step_lr.last_epoch == steps_taken


def test_the_guard_core_never_imports_a_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pss_cli.guard, pss_cli.guard.guard, pss_cli.guard.sinks, "
        "pss_cli.guard.adapters.clip, pss_cli.commands.trend\n"
        "bad = [m for m in ('transformers', 'lightning', 'accelerate', 'tensorboard', 'wandb',"
        " 'deepspeed') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
