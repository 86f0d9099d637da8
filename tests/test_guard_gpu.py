"""pss guard on CUDA: one host synchronisation per ordinary step (CUDA's sync debug mode counts
them), a bit-exact skip, and smoothing on the device. Marked `gpu`, skipped without CUDA (no GPU
was available when they were written: they have not run yet)."""

from __future__ import annotations

import warnings

import pytest
import torch

from pss_cli.guard import Guard, GuardConfig, TriggerAction
from tests.guard_factory import assert_bit_identical, loss_of, make_model, make_optimizer, snapshot

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _cuda_guard(config: GuardConfig) -> tuple[torch.nn.Module, Guard]:
    model = make_model(dropout=0.0).cuda()
    return model, Guard(model, make_optimizer(model), config)


def test_one_synchronisation_per_ordinary_step_on_cuda() -> None:
    config = GuardConfig(spike_factor=1e9, warmup_steps=0, check_every=1, matrices_per_check=4)
    model, guard = _cuda_guard(config)
    optimizer = guard.optimizer
    for step in range(len(guard.specs)):  # every matrix visited once (random starts copied in)
        loss_of(model, step).backward()
        guard.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    for step in range(3):
        loss = loss_of(model, 100 + step)
        loss.backward()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                decision = guard.step(loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        optimizer.zero_grad()
        assert not decision.skipped
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_skip_is_bit_exact_and_smooth_runs_on_cuda() -> None:
    fire = {"spike_factor": 1e-9, "warmup_steps": 0, "cooldown_steps": 0}
    model, guard = _cuda_guard(GuardConfig(**fire, spike_action=TriggerAction.SKIP))
    loss_of(model, 0).backward()
    guard.step()
    guard.optimizer.zero_grad()
    before = snapshot(model, guard.optimizer)
    loss_of(model, 1).backward()
    assert guard.step().skipped
    assert_bit_identical(before, snapshot(model, guard.optimizer))

    model, guard = _cuda_guard(GuardConfig(**fire))
    loss_of(model, 0).backward()
    guard.step()
    guard.optimizer.zero_grad()
    fc = model.h[1].c_fc.weight  # type: ignore[union-attr]
    s = torch.linalg.svdvals(fc.detach().double())
    loss_of(model, 1).backward()
    decision = guard.step()
    assert "h.1.c_fc.weight" in decision.smoothed
    assert fc.is_cuda and fc.dtype == torch.float32
    new_top = float(torch.linalg.svdvals(fc.detach().double())[0])
    assert new_top == pytest.approx(float(s[0] + 2 * s[1]) / 3, rel=1e-4)


def test_a_guard_state_moved_to_the_gpu_loads() -> None:
    # accelerate's `prepare` moves the optimizer's state dict, which carries the guard's, to the
    # GPU; a resume may load optimizer.pt with map_location="cuda". The generator state then
    # arrived as a CUDA tensor, which a CPU generator refused (TypeError).
    model, guard = _cuda_guard(GuardConfig())
    wrapped = guard.wrap_optimizer()
    loss = loss_of(model, 0)
    loss.backward()
    wrapped.step()

    def to_cuda(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return value.cuda()
        if isinstance(value, dict):
            return {k: to_cuda(v) for k, v in value.items()}
        if isinstance(value, list):
            return [to_cuda(v) for v in value]
        return value

    state = to_cuda(wrapped.state_dict())
    wrapped.load_state_dict(state)  # type: ignore[arg-type]
    assert guard.step_count == 1
