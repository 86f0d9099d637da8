"""pss_cli.core.power (the guard's per-step numerics) against exact references, and the guard's
host synchronisations per step."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from pss_cli.core.power import (
    frobenius_norm_sq,
    power_step,
    random_unit_vector,
    stable_jacobian_energy,
)
from pss_cli.guard import Guard, GuardConfig
from tests.guard_factory import loss_of, make_model, make_optimizer
from tests.guard_factory import one_thread as one_thread  # autouse: one intra-op thread
from tests.spectra_factory import with_spectrum


def _matrix(values: list[float], m: int = 40, n: int = 30, seed: int = 0) -> torch.Tensor:
    return with_spectrum(m, n, torch.tensor(values, dtype=torch.float64), seed)


def test_warm_started_power_iteration_tracks_sigma_max() -> None:
    values = [10.0, 6.0] + [1.0] * 28
    w = _matrix(values)
    g = torch.Generator().manual_seed(1)
    v = random_unit_vector(30, g, torch.float64)
    sigma, v = power_step(w, v, 30)
    assert float(sigma) == pytest.approx(10.0, rel=1e-10)
    # A warm vector keeps tracking after a small change, with one iteration (two products).
    w2 = w * 1.01
    sigma2, _ = power_step(w2, v, 1)
    assert float(sigma2) == pytest.approx(10.1, rel=1e-8)
    # A Rayleigh quotient: never above sigma_1, from any start.
    for seed in range(5):
        start = random_unit_vector(30, torch.Generator().manual_seed(seed), torch.float64)
        estimate, _ = power_step(w, start, 1)
        assert float(estimate) <= 10.0 * (1 + 1e-12)


def test_power_step_reads_bf16_weights_in_float32() -> None:
    w = _matrix([4.0, 1.0, 0.5], m=8, n=3).to(torch.bfloat16)
    v = random_unit_vector(3, torch.Generator().manual_seed(0), torch.float32)
    sigma, v2 = power_step(w, v, 40)
    exact = float(torch.linalg.svdvals(w.double())[0])
    assert sigma.dtype == torch.float32 and v2.dtype == torch.float32
    assert float(sigma) == pytest.approx(exact, rel=1e-6)


def test_power_step_on_a_zero_matrix_is_zero_not_nan() -> None:
    sigma, v = power_step(torch.zeros(4, 3), torch.ones(3) / math.sqrt(3), 2)
    assert float(sigma) == 0.0 and torch.isfinite(v).all()


def test_frobenius_norm_sq_is_exact() -> None:
    w = _matrix([3.0, 2.0, 1.0], m=5, n=3)
    assert float(frobenius_norm_sq(w)) == pytest.approx(14.0, rel=1e-12)
    assert frobenius_norm_sq(w.float()).dtype == torch.float64


def test_stable_jacobian_energy_matches_its_definition() -> None:
    # G = U diag(c) V^T on W's own singular directions: e_i = c_i^2 exactly.
    m, n = 12, 9
    w = _matrix([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05], m=m, n=n)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    c = torch.tensor([3.0, 1.0, 2.0, 0.5, 0.1, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    grad = u @ torch.diag(c) @ vh
    stable_rank = float((s**2).sum() / s[0] ** 2)  # ~2.3 -> k = 2
    assert math.floor(stable_rank) == 2
    k_top = 6  # the directions computed (the denominator's sum runs over these)
    sje = stable_jacobian_energy(grad, u[:, :k_top], vh[:k_top].mT, stable_rank)
    e = c[:k_top] ** 2
    assert sje == pytest.approx(float(e[:2].sum() / e.sum()), rel=1e-12)
    # No energy along those directions: undefined, not a division by zero.
    assert stable_jacobian_energy(torch.zeros(m, n), u[:, :3], vh[:3].mT, stable_rank) is None


class _SyncCounter:
    """Counts tensor -> host conversions (tolist, item, bool, float, int)."""

    NAMES = ("tolist", "item", "__bool__", "__float__", "__int__")

    def __init__(self) -> None:
        self.count = 0
        self.active = True

    def __enter__(self) -> _SyncCounter:
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._wrap(original))
        return self

    def _wrap(self, original):  # type: ignore[no-untyped-def]
        counter = self

        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            if counter.active:
                counter.count += 1
            return original(*args, **kwargs)

        return wrapper

    def __exit__(self, *exc: object) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture
def counter() -> Iterator[_SyncCounter]:
    with _SyncCounter() as c:
        yield c


def test_one_host_synchronisation_per_step(counter: _SyncCounter) -> None:
    counter.active = False
    model = make_model()
    optimizer = make_optimizer(model)
    # Monitor every step, over every matrix, all three rules armed: the busiest ordinary step.
    config = GuardConfig(
        spike_factor=1e9,
        warmup_steps=0,
        check_every=1,
        matrices_per_check=100,
        zscore_warmup_steps=1,
        first_power_iters=2,
    )
    guard = Guard(model, optimizer, config)
    inner_step = optimizer.step

    def uncounted_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        # The optimizer's own conversions (Adam's step counter) are not the guard's.
        counter.active = False
        try:
            return inner_step(*args, **kwargs)
        finally:
            counter.active = True

    optimizer.step = uncounted_step  # type: ignore[method-assign]
    for step in range(4):
        loss = loss_of(model, step)
        loss.backward()
        counter.count = 0
        counter.active = True
        decision = guard.step(loss)
        counter.active = False
        optimizer.zero_grad()
        assert not decision.skipped
        assert counter.count == 1, f"step {step}: {counter.count} host conversions"
