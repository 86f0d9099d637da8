"""ClipThenStep (clip after the guard's decision) in a plain loop; the Lightning scheduler proxy."""

from __future__ import annotations

import math

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


def test_lightning_scheduler_proxy_keeps_the_scheduler_type_and_waits_after_a_skip() -> None:
    import lightning.pytorch as pl

    from pss_cli.guard.adapters.lightning import guarded_optimizers

    class Holder(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

    holder = Holder()
    optimizer = make_optimizer(holder)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    config = GuardConfig(
        spike_factor=1e-6, warmup_steps=2, cooldown_steps=100, spike_action=TriggerAction.SKIP
    )
    out = guarded_optimizers(holder, optimizer, plateau, config, interval="epoch", monitor="loss")
    scheduler = out["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert scheduler.optimizer is out["optimizer"] and out["lr_scheduler"]["monitor"] == "loss"
    guarded = out["optimizer"]
    lr = optimizer.param_groups[0]["lr"]
    for step in range(3):  # steps 0, 1 taken; step 2 skipped (the spike rule is armed after 2)
        loss_of(holder.net, step).backward()
        guarded.step()
        guarded.zero_grad()
        scheduler.step(1.0 + step)  # a worsening metric: each real step halves the LR
    assert guarded.guard.last_decision.skipped
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr / 2)


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
