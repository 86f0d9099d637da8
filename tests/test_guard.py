"""pss guard in a plain PyTorch loop: the contract of docs/GUARD.md.

A real (tiny) GPT-style transformer with dropout on, AdamW with weight decay; triggers are forced
through GuardConfig (spike_factor / warmup_steps), never by patching the guard.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch
from torch import nn

from pss_cli.config import OptimizerPolicy, SmoothingMethod
from pss_cli.errors import GuardConfigError, GuardTriggered, PssError
from pss_cli.guard import (
    Guard,
    GuardConfig,
    GuardDecision,
    GuardedOptimizer,
    GuardEvent,
    JsonlSink,
    Sink,
    TriggerAction,
)
from tests.guard_factory import (
    assert_bit_identical,
    loss_of,
    make_model,
    make_optimizer,
    snapshot,
    train,
)
from tests.guard_factory import (
    one_thread as one_thread,  # autouse: one intra-op thread
)

# A rule that is armed at once and fires on the second finite step (any norm > 1e-9 x EMA).
FIRE_AT_ONCE = {"spike_factor": 1e-9, "warmup_steps": 0, "cooldown_steps": 0}
# Armed but never firing: exercises the whole decision path on every step.
NEVER_FIRES = {"spike_factor": 1e9, "warmup_steps": 0}


def guarded(config: GuardConfig, seed: int = 0, **kwargs: object) -> tuple[nn.Module, Guard]:
    model = make_model(seed)
    return model, Guard(model, make_optimizer(model), config, **kwargs)  # type: ignore[arg-type]


def run(model: nn.Module, guard: Guard, steps: int, start: int = 0) -> list[GuardDecision]:
    decisions = train(
        model, steps, guard.step, lambda: guard.optimizer.zero_grad(set_to_none=True), start
    )
    return [d for d in decisions if isinstance(d, GuardDecision)]


def test_guarded_run_without_triggers_is_bit_identical_to_an_unguarded_twin() -> None:
    torch.manual_seed(123)
    plain = make_model()
    plain_opt = make_optimizer(plain)
    train(plain, 12, lambda _loss: plain_opt.step(), lambda: plain_opt.zero_grad(True))
    rng_plain = torch.get_rng_state()

    torch.manual_seed(123)
    # The monitor checks every step (every matrix, every step), the z-score and spectral rules
    # are evaluated too: everything the guard does on a normal step runs, and nothing fires.
    config = GuardConfig(
        **NEVER_FIRES,
        check_every=1,
        matrices_per_check=100,
        zscore_action=TriggerAction.SKIP,
        zscore_threshold=1e9,
        spectral_action=TriggerAction.SKIP,
        spectral_sigma_growth=1e9,
        min_stable_rank=1e-9,
    )
    model, guard = guarded(config)
    decisions = run(model, guard, 12)
    assert not any(d.skipped or d.triggered for d in decisions)
    assert_bit_identical(snapshot(plain, plain_opt), snapshot(model, guard.optimizer))
    # The guard drew nothing from the global RNG (dropout masks stayed in step).
    assert torch.equal(rng_plain, torch.get_rng_state())


def test_a_skipped_step_leaves_weights_and_optimizer_state_bit_identical() -> None:
    model, guard = guarded(GuardConfig(**FIRE_AT_ONCE, spike_action=TriggerAction.SKIP))
    run(model, guard, 1)  # step 0: initialises the EMA (and Adam's state), cannot fire
    before = snapshot(model, guard.optimizer)
    loss_of(model, 1).backward()
    decision = guard.step()
    assert decision.skipped and decision.triggered and decision.actions == ("skip",)
    assert decision.reason is not None and "EMA" in decision.reason
    assert_bit_identical(before, snapshot(model, guard.optimizer))
    assert guard.counters["skipped"] == 1
    assert [e.kind for e in guard.events] == ["trigger", "skip"]


@pytest.mark.parametrize("where", ["grad", "loss"])
def test_non_finite_gradients_or_loss_always_skip(where: str) -> None:
    # Even with every rule off, a non-finite step is skipped, counted and reported.
    config = GuardConfig(
        spike_action=TriggerAction.OFF,
        zscore_action=TriggerAction.OFF,
        spectral_action=TriggerAction.OFF,
    )
    model, guard = guarded(config)
    run(model, guard, 2)
    before = snapshot(model, guard.optimizer)
    loss = loss_of(model, 2)
    loss.backward()
    if where == "grad":
        model.h[0].c_fc.weight.grad[0, 0] = float("nan")  # type: ignore[index]
    else:
        loss = loss * float("inf")
    decision = guard.step(loss)
    assert decision.skipped and decision.triggered
    assert math.isnan(decision.grad_norm)
    assert_bit_identical(before, snapshot(model, guard.optimizer))
    assert guard.counters["nonfinite"] == 1
    event = next(e for e in guard.events if e.kind == "nonfinite")
    if where == "grad":
        assert event.detail["layers"] == ["h.0.c_fc.weight"]


_RULES_OFF = {
    "spike_action": TriggerAction.OFF,
    "zscore_action": TriggerAction.OFF,
    "spectral_action": TriggerAction.OFF,
}


def test_a_parameter_unfrozen_after_construction_is_watched_too() -> None:
    # Progressive unfreezing: the optimizer holds every parameter, the guard is built while a
    # block is frozen, and the block is unfrozen later. A NaN in its gradient once went into
    # the weights on a step the guard called finite.
    model = make_model()
    optimizer = make_optimizer(model)
    for p in model.h[0].parameters():  # type: ignore[index]
        p.requires_grad_(False)
    guard = Guard(model, optimizer, GuardConfig(**_RULES_OFF))
    run(model, guard, 2)
    for p in model.h[0].parameters():  # type: ignore[index]
        p.requires_grad_(True)
    before = snapshot(model, optimizer)
    loss_of(model, 2).backward()
    model.h[0].c_fc.weight.grad[0, 0] = float("nan")  # type: ignore[index]
    decision = guard.step()
    assert decision.skipped and guard.counters["nonfinite"] == 1
    assert_bit_identical(before, snapshot(model, optimizer))
    event = next(e for e in guard.events if e.kind == "nonfinite")
    assert event.detail["layers"] == ["h.0.c_fc.weight"]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_unfreezing_restarts_the_rules_instead_of_firing_on_every_step() -> None:
    # Most of the model frozen, then unfrozen: the watched norm rises for good. A value that
    # fires never enters the EMA, so without a restart the spike rule fired again after each
    # cooldown (here: every step) and skipped the rest of the run.
    model = make_model()
    optimizer = make_optimizer(model)
    frozen = [p for name, p in model.named_parameters() if not name.startswith("h.1.")]
    for p in frozen:
        p.requires_grad_(False)
    config = GuardConfig(
        spike_factor=2.0,  # the unfrozen norm is ~2.5x the frozen one (9 -> 17-26)
        warmup_steps=3,
        cooldown_steps=0,
        spike_action=TriggerAction.SKIP,
        zscore_action=TriggerAction.OFF,
        spectral_action=TriggerAction.OFF,
    )
    guard = Guard(model, optimizer, config)
    before = run(model, guard, 6)
    assert not any(d.skipped for d in before)
    for p in frozen:
        p.requires_grad_(True)
    after = run(model, guard, 10, start=6)
    restart = [e for e in guard.events if e.kind == "restart"]
    assert [e.step for e in restart] == [6]
    assert sum(d.skipped for d in after) <= 1, [d.reason for d in after if d.skipped]


@pytest.mark.parametrize("added", ["at_construction", "by_add_param_group"])
def test_a_parameter_outside_the_model_is_watched_when_the_optimizer_steps_it(
    added: str,
) -> None:
    model = make_model()
    temperature = nn.Parameter(torch.ones(()))
    if added == "at_construction":
        optimizer = torch.optim.AdamW([*model.parameters(), temperature], lr=3e-3)
        guard = Guard(model, optimizer, GuardConfig(**_RULES_OFF))
    else:
        optimizer = make_optimizer(model)
        guard = Guard(model, optimizer, GuardConfig(**_RULES_OFF))
        run(model, guard, 1)
        optimizer.add_param_group({"params": [temperature]})
    (loss_of(model, 3) * temperature).backward()
    temperature.grad = torch.full((), float("nan"))
    decision = guard.step()
    assert decision.skipped and guard.counters["nonfinite"] == 1
    assert float(temperature.detach()) == 1.0
    event = next(e for e in guard.events if e.kind == "nonfinite")
    group = 0 if added == "at_construction" else 1
    index = len(list(model.parameters())) if added == "at_construction" else 0
    assert event.detail["layers"] == [f"param_groups[{group}].params[{index}]"]
    # Finite again: the step is taken and the extra parameter counts in the watched norm.
    optimizer.zero_grad(set_to_none=True)
    (loss_of(model, 4) * temperature).backward()
    decision = guard.step()
    assert not decision.skipped and float(temperature.detach()) != 1.0


def test_sparse_gradients_are_read_and_a_nan_in_one_is_caught() -> None:
    # nn.Embedding(sparse=True) with SGD: torch's norm kernels have no sparse version (the
    # first guard.step once raised NotImplementedError).
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 8, sparse=True)
    head = nn.Linear(8, 8)
    model = nn.Sequential(embedding, head)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, optimizer, GuardConfig(**_RULES_OFF, exclude_roles=()))
    ids = torch.tensor([[1, 2, 2, 7]])  # index 2 twice: coalescing sums its two rows
    model(ids).square().mean().backward()
    grad = embedding.weight.grad
    assert grad is not None and grad.is_sparse
    dense = grad.to_dense()
    expected = float(dense.norm()) + float(head.weight.grad.norm()) + float(head.bias.grad.norm())  # type: ignore[union-attr]
    decision = guard.step()
    assert not decision.skipped
    assert decision.grad_norm == pytest.approx(expected, rel=1e-6)
    optimizer.zero_grad(set_to_none=True)
    model(ids).square().mean().backward()
    embedding.weight.grad = torch.sparse_coo_tensor(
        torch.tensor([[3]]), torch.full((1, 8), float("nan")), (50, 8), check_invariants=True
    )
    before = embedding.weight.detach().clone()
    decision = guard.step()
    assert decision.skipped and torch.equal(embedding.weight.detach(), before)
    event = next(e for e in guard.events if e.kind == "nonfinite")
    assert event.detail["layers"] == ["0.weight"]


def test_paper_rule_waits_for_warmup_and_cooldown() -> None:
    # factor 1e-9: every armed, non-cooling step fires. Warm-up 3 finite steps, cooldown 2.
    config = GuardConfig(
        spike_factor=1e-9, warmup_steps=3, cooldown_steps=2, spike_action=TriggerAction.SKIP
    )
    model, guard = guarded(config)
    decisions = run(model, guard, 10)
    fired = [d.step for d in decisions if d.triggered]
    # Steps 0-2 feed the EMA (warm-up), 3 fires, 4-5 cool down, 6 fires, 7-8 cool, 9 fires.
    assert fired == [3, 6, 9]


def test_decision_is_frozen_and_carries_the_contract_fields() -> None:
    model, guard = guarded(GuardConfig(**NEVER_FIRES))
    loss = loss_of(model, 0)
    loss.backward()
    decision = guard.step(loss)
    assert decision.step == 0 and not decision.skipped and decision.reason is None
    assert decision.loss == pytest.approx(float(loss.detach()))
    assert decision.smoothed == () and decision.actions == ()
    assert decision.grad_norm > 0
    assert guard.last_decision is decision
    with pytest.raises(FrozenInstanceError):
        decision.skipped = True  # type: ignore[misc]


def test_norm_kinds() -> None:
    model, guard = guarded(GuardConfig(**NEVER_FIRES))
    loss_of(model, 0).backward()
    norms = [p.grad.norm().item() for p in model.parameters() if p.grad is not None]
    decision = guard.step()
    assert decision.grad_norm == pytest.approx(sum(norms), rel=1e-5)
    model, guard = guarded(GuardConfig(**NEVER_FIRES, norm_kind="l2"))  # type: ignore[arg-type]
    loss_of(model, 0).backward()
    decision = guard.step()
    assert decision.grad_norm == pytest.approx(math.sqrt(sum(n * n for n in norms)), rel=1e-5)


def _stable_rank(matrix: torch.Tensor) -> float:
    s = torch.linalg.svdvals(matrix.double())
    return float((s**2).sum() / s[0] ** 2)


def test_default_smoothing_sets_sigma_1_to_sigma_2() -> None:
    # The default follows docs/EXPERIMENTS.md v2.1 (clip, one value).
    assert GuardConfig().smooth_method is SmoothingMethod.CLIP and GuardConfig().clip_count == 1
    model, guard = guarded(GuardConfig(**FIRE_AT_ONCE))
    run(model, guard, 1)
    fc = model.h[1].c_fc.weight.detach().clone()  # type: ignore[union-attr]
    loss_of(model, 1).backward()
    decision = guard.step()
    assert decision.skipped and "h.1.c_fc.weight" in decision.smoothed
    s = torch.linalg.svdvals(fc.double())
    new_s = torch.linalg.svdvals(model.h[1].c_fc.weight.detach().double())  # type: ignore[union-attr]
    assert float(new_s[0]) == pytest.approx(float(s[1]), rel=1e-5)
    torch.testing.assert_close(new_s[1:8], s[1:8], rtol=1e-5, atol=0.0)


def test_smooth_applies_conv_to_monitored_matrices_and_skips() -> None:
    # spike_action: smooth (the paper), with the paper's conv (the default is clip, below)
    model, guard = guarded(GuardConfig(**FIRE_AT_ONCE, smooth_method=SmoothingMethod.CONV))
    run(model, guard, 1)
    before = snapshot(model, guard.optimizer)
    c_attn = model.h[0].c_attn.weight.detach().clone()  # type: ignore[union-attr]
    fc = model.h[1].c_fc.weight.detach().clone()  # type: ignore[union-attr]
    loss_of(model, 1).backward()
    rng = torch.get_rng_state()
    decision = guard.step()
    assert torch.equal(rng, torch.get_rng_state())  # smoothing draws from its own generators
    assert decision.skipped and decision.actions == ("smooth", "skip")
    # Q, K, V apart; every monitored matrix of both blocks; no embedding/LM head/norm/bias.
    assert "h.0.c_attn.weight[q]" in decision.smoothed
    assert "h.1.c_fc.weight" in decision.smoothed
    after = snapshot(model, guard.optimizer)
    for key in before:
        changed = not torch.equal(before[key], after[key])
        monitored = key.startswith("param/h.") and key.endswith("weight") and ".ln_" not in key
        assert changed == (monitored and key.removeprefix("param/") in _names(decision)), key
    # conv: sigma_1' = (sigma_1 + 2 sigma_2) / 3 (the paper), on each of Q, K, V separately.
    s = torch.linalg.svdvals(fc.double())
    new_s = torch.linalg.svdvals(model.h[1].c_fc.weight.detach().double())  # type: ignore[union-attr]
    assert float(new_s[0]) == pytest.approx(float(s[0] + 2 * s[1]) / 3, rel=1e-5)
    assert _stable_rank(model.h[1].c_fc.weight.detach()) > _stable_rank(fc)  # type: ignore[union-attr]
    q_before = c_attn.chunk(3, dim=0)[0].double()
    q_after = model.h[0].c_attn.weight.detach().chunk(3, dim=0)[0].double()  # type: ignore[union-attr]
    sq = torch.linalg.svdvals(q_before)
    assert float(torch.linalg.svdvals(q_after)[0]) == pytest.approx(
        float(sq[0] + 2 * sq[1]) / 3, rel=1e-5
    )
    smooth_event = next(e for e in guard.events if e.kind == "smooth")
    assert all(m["sje"] is None or 0.0 < m["sje"] <= 1.0 for m in smooth_event.detail["matrices"])
    assert guard.counters["smoothed"] == len(decision.smoothed)
    # Optimizer policy keep: no state tensor changed (the step was skipped).
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("state/"))


def _names(decision: GuardDecision) -> set[str]:
    return {name.split("[")[0] for name in decision.smoothed}


def test_smooth_reset_policy_zeroes_the_smoothed_moments_and_keeps_step_counts() -> None:
    config = GuardConfig(**FIRE_AT_ONCE, optimizer_policy=OptimizerPolicy.RESET)
    model, guard = guarded(config)
    run(model, guard, 1)
    loss_of(model, 1).backward()
    decision = guard.step()
    fc = model.h[1].c_fc.weight  # type: ignore[union-attr]
    state = guard.optimizer.state[fc]
    assert "h.1.c_fc.weight" in decision.smoothed
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert float(state["step"]) == 1.0
    # Not monitored (an embedding): its moments are kept.
    assert guard.optimizer.state[model.wte.weight]["exp_avg"].any()  # type: ignore[union-attr]


def test_smooth_cap_targets_the_matrix_own_recent_stable_rank() -> None:
    # Every matrix measured every step (history), then a trigger at step 6.
    config = GuardConfig(
        spike_factor=1e-9,
        warmup_steps=6,
        check_every=1,
        matrices_per_check=100,
        first_power_iters=60,
        smooth_method=SmoothingMethod.CAP,
    )
    model, guard = guarded(config)
    run(model, guard, 6)
    target = guard.spectral.recent_stable_rank("h.1.c_fc.weight")
    assert target is not None
    fc = model.h[1].c_fc.weight  # type: ignore[union-attr]
    # Push the matrix away from its target: a rank-one spike, so that cap has work to do.
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(fc)
        fc.add_(3 * s[0] * torch.outer(u[:, 0], vh[0]))
    assert _stable_rank(fc.detach()) < target / 2
    loss_of(model, 6).backward()
    decision = guard.step()
    assert "h.1.c_fc.weight" in decision.smoothed
    assert _stable_rank(fc.detach()) == pytest.approx(target, rel=1e-3)


def test_smooth_never_writes_non_finite_values() -> None:
    from pss_cli.core.spectra import KrylovSettings
    from pss_cli.guard.smooth import smooth_spec, smoothing_params
    from pss_cli.guard.targets import MatrixSpec

    layer = nn.Linear(6, 5)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    before = layer.weight.detach().clone()
    spec = MatrixSpec("w", "w", layer.weight, "other", None, 0, (5, 6))
    params = smoothing_params(SmoothingMethod.CONV, None, 4.0, 1)
    outcome = smooth_spec(spec, params, 16, torch.float32, 0, KrylovSettings(), write=True)
    assert not outcome.changed and outcome.skipped_reason == "weights not finite"
    assert torch.equal(before, layer.weight.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", [SmoothingMethod.CAP, SmoothingMethod.CLIP])
def test_smooth_never_shrinks_a_rank_one_weight_to_rounding_noise(
    method: SmoothingMethod, dtype: torch.dtype
) -> None:
    # Capping its only value to a stable rank of 4 left 1.5e-4 of its norm (float32): the
    # noise of the measurement, written into the weight; in bf16, the rounding of the stored
    # entries (2e-3 of the norm).
    from pss_cli.core.spectra import KrylovSettings
    from pss_cli.guard.smooth import smooth_spec, smoothing_params
    from pss_cli.guard.targets import MatrixSpec

    layer = nn.Linear(80, 96).to(dtype)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        outer = torch.randn(96, 1, generator=generator) @ torch.randn(1, 80, generator=generator)
        layer.weight.copy_(outer)
    before = layer.weight.detach().clone()
    spec = MatrixSpec("w", "w", layer.weight, "other", None, 0, (96, 80))
    params = smoothing_params(method, 4.0 if method is SmoothingMethod.CAP else None, 4.0, 1)
    outcome = smooth_spec(spec, params, 16, torch.float32, 0, KrylovSettings(), write=True)
    assert not outcome.changed
    assert outcome.skipped_reason is not None
    assert outcome.skipped_reason.startswith("numerically of low rank")
    assert torch.equal(before, layer.weight.detach())


def test_raise_action_stops_with_a_typed_error_naming_layers() -> None:
    model, guard = guarded(GuardConfig(**FIRE_AT_ONCE, spike_action=TriggerAction.RAISE))
    run(model, guard, 1)
    before = snapshot(model, guard.optimizer)
    loss_of(model, 1).backward()
    with pytest.raises(GuardTriggered) as caught:
        guard.step()
    assert isinstance(caught.value, PssError)
    assert caught.value.step == 1 and caught.value.layers
    assert caught.value.layers[0] in caught.value.message
    assert caught.value.hint is not None and "roll back" in caught.value.hint
    assert_bit_identical(before, snapshot(model, guard.optimizer))
    assert guard.last_decision is not None and guard.last_decision.skipped


def test_log_action_records_and_steps() -> None:
    model, guard = guarded(GuardConfig(**FIRE_AT_ONCE, spike_action=TriggerAction.LOG))
    decisions = run(model, guard, 3)
    assert [d.triggered for d in decisions] == [False, True, True]
    assert not any(d.skipped for d in decisions)
    assert decisions[1].actions == ("log",)


def test_zscore_rule_fires_on_an_outlier() -> None:
    from pss_cli.guard.rules import ZScoreRule

    rule = ZScoreRule(threshold=2.5, alpha=0.97, warmup=5, cooldown=0)
    for value in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.02]:
        assert rule.observe(value) is None
    reason = rule.observe(5.0)
    assert reason is not None and "standard deviations" in reason


def test_spectral_rule_floor_and_sigma_growth() -> None:
    from pss_cli.guard.rules import SpectralRule

    rule = SpectralRule(5.0, 0.25, False, 0.5, 2.0, 3)
    # 64 x 64: floor min(5, 16) = 5. SR 20 (sigma 1, ||W||_F^2 20) three times, then a fall.
    for _ in range(3):
        assert rule.observe("w", 64, 1.0, 20.0) == []
    kinds = [w.kind for w in rule.observe("w", 64, 2.5, 20.0)]  # SR 3.2 < 5; sigma 2.5 > 2
    assert kinds == ["floor", "sigma_growth"]
    # Low from the start is not a fall (as `pss trend`), and a 2-row matrix has floor 0.5.
    fresh = SpectralRule(5.0, 0.25, False, 0.5, 2.0, 3)
    assert fresh.observe("tiny", 2, 1.0, 1.2) == []
    assert [w.kind for w in fresh.observe("nan", 8, None, None)] == ["nonfinite"]


def test_spectral_trigger_from_the_monitor_in_a_loop() -> None:
    config = GuardConfig(
        spike_action=TriggerAction.OFF,
        spectral_action=TriggerAction.SKIP,
        check_every=1,
        matrices_per_check=100,
    )
    model, guard = guarded(config)
    run(model, guard, 4)
    fc = model.h[1].c_fc.weight  # type: ignore[union-attr]
    with torch.no_grad():
        fc.mul_(10.0)  # sigma_1 x 10: past 2 x its recent median
    decision = run(model, guard, 1, start=4)[0]
    assert decision.skipped
    assert decision.reason is not None and "h.1.c_fc.weight: sigma_max" in decision.reason
    assert guard.counters["spectral_triggers"] == 1


def test_monitor_is_round_robin_and_reports_metrics() -> None:
    seen: list[dict[str, float]] = []

    class Collect:
        def record(self, step: int, metrics: dict[str, float], event: GuardEvent | None) -> None:
            if event is None:
                seen.append(metrics)

    config = GuardConfig(**NEVER_FIRES, check_every=2, matrices_per_check=3)
    model, guard = guarded(config, sinks=[Collect()])
    assert isinstance(Collect(), Sink)
    first_q = guard.specs[0].view(guard.specs[0].param.detach()).clone()
    run(model, guard, 6)
    measured = [sorted(k for k in m if k.startswith("sigma_max/")) for m in seen]
    assert [len(m) for m in measured] == [3, 0, 3, 0, 3, 0]
    names = [spec.name for spec in guard.specs]
    assert measured[0] == sorted(f"sigma_max/{n}" for n in names[:3])
    assert measured[2] == sorted(f"sigma_max/{n}" for n in names[3:6])
    # The estimate is a lower bound close to the truth after the first visit's 32 iterations.
    exact = float(torch.linalg.svdvals(first_q.double())[0])
    estimate = seen[0][f"sigma_max/{names[0]}"]
    assert exact * 0.95 < estimate <= exact * (1 + 1e-6)


def test_monitored_matrices_split_fused_qkv_and_skip_embeddings() -> None:
    _, guard = guarded(GuardConfig())
    names = [s.name for s in guard.specs]
    assert names[:3] == ["h.0.c_attn.weight[q]", "h.0.c_attn.weight[k]", "h.0.c_attn.weight[v]"]
    assert guard.specs[0].shape == (24, 24)
    assert not any("wte" in n or "wpe" in n or "ln_" in n or "bias" in n for n in names)
    # nn.MultiheadAttention's in_proj_weight (3d, d) is split by rows too.
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    g = Guard(layer, torch.optim.AdamW(layer.parameters()))
    parts = [s.name for s in g.specs if "in_proj" in s.name]
    assert parts == [f"self_attn.in_proj_weight[{p}]" for p in "qkv"]
    unsplit = Guard(
        layer, torch.optim.AdamW(layer.parameters()), GuardConfig(split_fused_qkv=False)
    )
    assert "self_attn.in_proj_weight" in [s.name for s in unsplit.specs]


def test_hf_conv1d_c_attn_is_split_by_columns() -> None:
    from transformers import pytorch_utils  # in the test extra (pyproject.toml)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = pytorch_utils.Conv1D(3 * 8, 8)  # weight (in=8, out=24)

    model = nn.Module()
    model.attn = Attn()
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert [s.name for s in guard.specs] == [f"attn.c_attn.weight[{p}]" for p in "qkv"]
    assert guard.specs[0].shape == (8, 8)
    assert guard.specs[0].split_dim == 1


def test_state_dict_round_trip_resumes_identically(tmp_path: Path) -> None:
    config = GuardConfig(spike_factor=0.9, warmup_steps=3, check_every=2, cooldown_steps=2)
    model_a, guard_a = guarded(config)
    run(model_a, guard_a, 8)
    path = tmp_path / "guard.pt"
    torch.save(
        {
            "guard": guard_a.state_dict(),
            "model": model_a.state_dict(),
            "opt": guard_a.optimizer.state_dict(),
        },
        path,
    )
    saved = torch.load(path, weights_only=True)
    model_b, guard_b = guarded(config, seed=7)  # other init: everything comes from the file
    model_b.load_state_dict(saved["model"])
    guard_b.optimizer.load_state_dict(saved["opt"])
    guard_b.load_state_dict(saved["guard"])
    assert guard_b.step_count == 8 and guard_b.spike.ema == guard_a.spike.ema
    torch.manual_seed(5)  # dropout masks: the same global RNG for both continuations
    rest_a = run(model_a, guard_a, 12, start=8)
    torch.manual_seed(5)
    rest_b = run(model_b, guard_b, 12, start=8)
    assert any(d.triggered for d in rest_a)
    assert rest_a == rest_b
    assert guard_a.state_dict()["spike"] == guard_b.state_dict()["spike"]
    assert_bit_identical(snapshot(model_a, guard_a.optimizer), snapshot(model_b, guard_b.optimizer))


def test_wrap_optimizer_and_scheduler(tmp_path: Path) -> None:
    model, guard = guarded(GuardConfig(**FIRE_AT_ONCE, spike_action=TriggerAction.SKIP))
    opt = guard.wrap_optimizer()
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, GuardedOptimizer)
    assert opt.param_groups is guard.optimizer.param_groups
    sched = guard.wrap_scheduler(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)))
    lrs = []
    for step in range(3):

        def closure(step: int = step) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(model, step)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    # Step 0 taken (the scheduler advances), steps 1 and 2 skipped (it does not).
    assert [d.skipped for d in [guard.last_decision]] == [True]
    assert lrs == [pytest.approx(0.003 / 2)] * 3
    assert guard.counters["skipped"] == 2
    state = opt.state_dict()
    assert "pss_guard" in state and state["pss_guard"]["step_count"] == 3
    path = tmp_path / "opt.pt"
    torch.save(state, path)
    # A fresh guard + optimizer restores both through the wrapper.
    model2, guard2 = guarded(GuardConfig(**FIRE_AT_ONCE, spike_action=TriggerAction.SKIP))
    opt2 = guard2.wrap_optimizer()
    opt2.load_state_dict(torch.load(path, weights_only=True))
    assert guard2.step_count == 3 and guard2.counters["skipped"] == 2
    assert "pss_guard" not in guard2.optimizer.state_dict()
    # Passing the wrapper to a new Guard unwraps it.
    assert Guard(model2, opt2).optimizer is guard2.optimizer


def test_event_log_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "guard.jsonl"
    config = GuardConfig(**FIRE_AT_ONCE, check_every=2)
    model, guard = guarded(config, event_log=path)
    run(model, guard, 3)
    guard.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["schema"] == "pss-guard-events" and records[0]["version"] == 1
    assert records[0]["config"]["spike_factor"] == 1e-9
    kinds = [(r["step"], r["kind"]) for r in records[1:]]
    assert (0, "decision") in kinds and (0, "metrics") in kinds
    assert (1, "trigger") in kinds and (1, "smooth") in kinds and (1, "skip") in kinds
    decision = next(r for r in records if r.get("kind") == "decision" and r["step"] == 1)
    assert decision["skipped"] is True and decision["grad_norm"] > 0
    metrics = next(r for r in records if r.get("kind") == "metrics")
    layer = metrics["layers"]["h.0.c_attn.weight[q]"]
    assert layer["stable_rank"] >= 1.0 and layer["sigma_max"] > 0


def test_event_log_io_error_warns_once_and_training_continues(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model, guard = guarded(GuardConfig(**NEVER_FIRES), event_log=blocker / "guard.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decisions = run(model, guard, 3)
    assert len(decisions) == 3
    assert len([w for w in caught if "event log" in str(w.message)]) == 1


def test_a_failing_sink_is_disabled_with_one_warning() -> None:
    class Broken:
        def record(self, step: int, metrics: dict[str, float], event: GuardEvent | None) -> None:
            raise RuntimeError("disk full")

    model, guard = guarded(GuardConfig(**NEVER_FIRES), sinks=[Broken()])
    with pytest.warns(RuntimeWarning, match="Broken"):
        run(model, guard, 3)


def test_jsonl_sink_writes_null_for_non_finite(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "x.jsonl")
    sink.record(3, {"grad_norm": math.nan, "skipped": 1.0}, None)
    sink.close()
    line = json.loads((tmp_path / "x.jsonl").read_text().splitlines()[1])
    assert line == {"step": 3, "kind": "decision", "grad_norm": None, "skipped": True}


# --- bad input at construction ------------------------------------------------------------


def test_model_without_2d_weights() -> None:
    model = nn.Sequential(nn.LayerNorm(8))
    with pytest.raises(GuardConfigError, match="no trainable 2-D weight") as caught:
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert caught.value.hint


def test_model_with_only_excluded_matrices() -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(GuardConfigError, match=r"'0\.weight'.*excluded by role"):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_meta_device_parameters() -> None:
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(GuardConfigError, match="'weight' is on the meta device"):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_frozen_parameters_are_ignored_unless_nothing_is_left() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].requires_grad_(False)
    guard = Guard(model, torch.optim.SGD(model[1].parameters(), lr=0.1))
    assert [s.name for s in guard.specs] == ["1.weight"]
    model.requires_grad_(False)
    with pytest.raises(GuardConfigError, match="no trainable parameter"):
        Guard(model, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))


def test_optimizer_not_holding_the_model_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(
        GuardConfigError, match=r"does not hold the trainable parameter '1\.weight'"
    ):
        Guard(model, torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(GuardConfigError, match="needs a torch optimizer"):
        Guard(model, object())  # type: ignore[arg-type]


def test_unsupported_sharded_parameters() -> None:
    model = nn.Linear(4, 4)
    model.weight._is_flat_param = True  # what FSDP1's FlatParameter carries
    with pytest.raises(GuardConfigError, match="'weight' is an FSDP1 flat parameter"):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("spike_factor", 0.0),
        ("spike_ema_decay", 1.0),
        ("matrices_per_check", 0),
        ("optimizer_policy", OptimizerPolicy.DROP),
        ("check_every", -1),
        # Values that once passed construction and failed at the first trigger, inside a
        # training step, with an untyped error (clip_count, softmax_temperature), or were taken
        # silently (a fractional step count, a NaN fraction, a string iterated as roles).
        ("clip_count", 0),
        ("softmax_temperature", 0.0),
        ("softmax_temperature", -1.0),
        ("spike_factor", None),
        ("spike_factor", "2.5x"),
        ("spike_factor", float("nan")),
        ("cooldown_steps", float("inf")),
        ("warmup_steps", 2.7),
        ("warmup_steps", True),
        ("smooth_top_k", None),
        ("min_stable_rank_fraction", -0.5),
        ("min_stable_rank_fraction", 0.0),
        ("min_stable_rank_fraction", float("nan")),
        ("exclude_roles", "embedding"),
        ("exclude_roles", ("embeddings",)),
        ("seed", "abc"),
        ("seed", -1),
        ("split_fused_qkv", "maybe"),
        ("spike_action", 3),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(GuardConfigError, match=f"GuardConfig.{field}"):
        GuardConfig(**{field: value})  # type: ignore[arg-type]


def test_config_takes_numpy_scalars_and_any_list_of_roles() -> None:
    import collections

    import numpy as np

    config = GuardConfig(
        split_fused_qkv=np.bool_(False),  # type: ignore[arg-type]
        sje_on_trigger=1,  # type: ignore[arg-type]
        warmup_steps=np.int64(7),  # type: ignore[arg-type]
        spike_factor=np.float32(2.5),  # type: ignore[arg-type]
        exclude_roles=collections.UserList(["embedding"]),  # type: ignore[arg-type]
    )
    assert config.split_fused_qkv is False and config.sje_on_trigger is True
    assert config.warmup_steps == 7 and type(config.warmup_steps) is int
    assert config.spike_factor == 2.5 and config.exclude_roles == ("embedding",)
    with pytest.raises(GuardConfigError, match=r"GuardConfig\.warmup_steps"):
        GuardConfig(warmup_steps=10**400)
    with pytest.raises(GuardConfigError, match=r"GuardConfig\.sje_on_trigger"):
        GuardConfig(sje_on_trigger=2)  # type: ignore[arg-type]


def test_config_takes_the_strings_of_a_yaml_file_or_command_line_typed() -> None:
    config = GuardConfig(
        spike_factor="2.5",  # type: ignore[arg-type]
        warmup_steps="5",  # type: ignore[arg-type]
        zscore_threshold="3",  # type: ignore[arg-type]
        seed=7.0,  # type: ignore[arg-type]
        split_fused_qkv="false",  # type: ignore[arg-type]
        exclude_roles=["lm_head"],  # type: ignore[arg-type]
        spike_action="skip",  # type: ignore[arg-type]
    )
    assert (config.spike_factor, config.warmup_steps, config.zscore_threshold) == (2.5, 5, 3.0)
    assert type(config.warmup_steps) is int and type(config.zscore_threshold) is float
    assert config.seed == 7 and type(config.seed) is int
    assert config.split_fused_qkv is False
    assert config.exclude_roles == ("lm_head",)
    assert config.spike_action is TriggerAction.SKIP
    assert GuardConfig(**config.as_dict()) == config  # type: ignore[arg-type]


def test_state_dict_of_another_format_is_refused() -> None:
    _, guard = guarded(GuardConfig())
    with pytest.raises(GuardConfigError, match="unknown format"):
        guard.load_state_dict({"version": 99})


def test_import_pss_cli_guard_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pss_cli, pss_cli.guard;"
        "from pss_cli.guard import GuardConfig, TriggerAction, GuardDecision;"
        "GuardConfig(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_with_a_grad_scaler_unscale_then_guard_then_update() -> None:
    # docs/GUARD.md: scaler.unscale_ -> guard.step -> scaler.update (the scaler halves on Inf).
    model, guard = guarded(GuardConfig())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    skipped = []
    for step in range(3):
        loss = loss_of(model, step)
        scaler.scale(loss).backward()
        if step == 1:
            model.h[0].c_fc.weight.grad[0, 0] = float("inf")  # type: ignore[index]
        scaler.unscale_(guard.optimizer)
        skipped.append(guard.step(loss).skipped)
        scaler.update()
        guard.optimizer.zero_grad()
    assert skipped == [False, True, False]
    assert scaler.get_scale() == 2.0**9


@pytest.mark.parametrize(
    "method", [SmoothingMethod.CONV, SmoothingMethod.SOFTMAX, SmoothingMethod.CLIP]
)
def test_every_method_smooths_in_place_with_finite_results(method: SmoothingMethod) -> None:
    model, guard = guarded(GuardConfig(**FIRE_AT_ONCE, smooth_method=method))
    run(model, guard, 1)
    fc = model.h[1].c_fc.weight  # type: ignore[union-attr]
    top_before = float(torch.linalg.svdvals(fc.detach().double())[0])
    loss_of(model, 1).backward()
    decision = guard.step()
    assert "h.1.c_fc.weight" in decision.smoothed
    assert all(torch.isfinite(p).all() for p in model.parameters())
    top_after = float(torch.linalg.svdvals(fc.detach().double())[0])
    if method is SmoothingMethod.CLIP:
        assert top_after < top_before  # sigma_1 -> sigma_2
    assert top_after != top_before


def test_spectral_smooth_with_flagged_scope_changes_only_the_flagged_matrix() -> None:
    config = GuardConfig(
        spike_action=TriggerAction.OFF,
        spectral_action=TriggerAction.SMOOTH,
        smooth_scope="flagged",  # type: ignore[arg-type]
        check_every=1,
        matrices_per_check=100,
    )
    model, guard = guarded(config)
    run(model, guard, 4)
    with torch.no_grad():
        model.h[1].c_fc.weight.mul_(10.0)  # type: ignore[union-attr]
    decision = run(model, guard, 1, start=4)[0]
    assert decision.smoothed == ("h.1.c_fc.weight",)
    assert decision.actions == ("smooth", "skip")


def test_sje_on_log_triggers_when_asked() -> None:
    config = GuardConfig(**FIRE_AT_ONCE, spike_action=TriggerAction.LOG, sje_on_trigger=True)
    model, guard = guarded(config)
    run(model, guard, 2)
    trigger = next(e for e in guard.events if e.kind == "trigger")
    sje = trigger.detail["sje"]
    assert set(sje) == {spec.name for spec in guard.specs}
    assert all(0.0 < value <= 1.0 for value in sje.values())


def test_steps_without_gradients_do_not_feed_the_moving_average() -> None:
    model, guard = guarded(GuardConfig(**NEVER_FIRES))
    guard.step()  # no backward yet: no gradient at all
    assert guard.spike.ema is None and guard.spike.seen == 0
    run(model, guard, 1, start=1)
    assert guard.spike.ema is not None and guard.spike.ema > 0


def test_the_monitor_runs_only_when_its_readings_are_used() -> None:
    off = {"spectral_action": TriggerAction.OFF}
    assert guarded(GuardConfig(**off))[1].monitor.check_every == 0  # type: ignore[arg-type]
    cap = GuardConfig(**off, smooth_method=SmoothingMethod.CAP)  # type: ignore[arg-type]
    assert guarded(cap)[1].monitor.check_every == cap.check_every


def test_config_accepts_strings_for_enums_and_names_bad_ones() -> None:
    config = GuardConfig(spike_action="skip", norm_kind="l2")  # type: ignore[arg-type]
    assert config.spike_action is TriggerAction.SKIP
    with pytest.raises(GuardConfigError, match=r"GuardConfig.smooth_method: 'blur' is not one of"):
        GuardConfig(smooth_method="blur")  # type: ignore[arg-type]
