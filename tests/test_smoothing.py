"""Smoothing functions: documented invariants as hypothesis properties, and their application."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pss_cli.config import SmoothingMethod
from pss_cli.core.smoothing import (
    NeedMoreValues,
    SmoothingParams,
    apply_spectrum_change,
    cap_level,
    cap_values,
    clip_values,
    conv_values,
    smooth_values,
    softmax_values,
)
from tests.spectra_factory import with_spectrum

spectra = st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=40).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64)
)


def _stable_rank(s: torch.Tensor) -> float:
    return float((s**2).sum() / s[0] ** 2)


@settings(max_examples=300, deadline=None)
@given(spectra, st.floats(0.0, 1.0))
def test_cap_reaches_the_target_and_only_lowers_values_above_it(s: torch.Tensor, t: float) -> None:
    rank = s.numel()
    current = _stable_rank(s)
    assume(rank - current > 1e-6)
    target = current + t * (rank - current)
    frob = float(s.norm())
    capped = cap_values(s, frob, rank, target)
    # rel 1e-6: the tail energy F^2 - sum s_i^2 cancels when sigma_1 dominates (s = [297, 0.06])
    assert _stable_rank(capped) == pytest.approx(target, rel=1e-6)
    assert (capped <= s + 1e-15).all()  # never increases a value
    level = float(capped[0])
    below = s <= level
    assert torch.equal(capped[below], s[below])  # values under the cap unchanged
    assert torch.allclose(capped[~below], torch.full_like(capped[~below], level))
    # Idempotent: capping the capped spectrum at the same target changes nothing.
    again = cap_values(capped, float(capped.norm()), rank, target)
    assert torch.allclose(again, capped, rtol=1e-6, atol=0)


def test_cap_level_closed_form() -> None:
    s = torch.tensor([10.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # SR = 1.03
    level = cap_level(s, float(s.norm()), 4, 2.0)
    # One value capped: (3 + c^2) / c^2 = 2 -> c = sqrt(3).
    assert level == pytest.approx(math.sqrt(3.0))


def test_cap_needs_more_values_when_the_level_falls_below_the_known_ones() -> None:
    s = torch.tensor([10.0, 1.0], dtype=torch.float64)
    frob = math.sqrt(100 + 1 + 50 * 0.9**2)  # 50 unknown values of 0.9 in the tail
    with pytest.raises(NeedMoreValues):
        cap_level(s, frob, 52, 50.0)


def test_cap_target_beyond_rank_is_an_error() -> None:
    s = torch.tensor([2.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="exceeds the rank"):
        cap_level(s, float(s.norm()), 2, 3.0)


def test_conv_matches_the_paper_on_sigma_1() -> None:
    s = torch.tensor([9.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    out = conv_values(s, 2, 5)
    assert out[0] == pytest.approx((9.0 + 2 * 3.0) / 3)
    assert out[1] == pytest.approx((9.0 + 3.0 + 2.0) / 3)
    assert torch.equal(out[2:], s[2:])


@settings(max_examples=300, deadline=None)
@given(spectra, st.integers(1, 40))
def test_conv_is_a_local_average(s: torch.Tensor, window: int) -> None:
    rank = s.numel()
    window = min(window, rank)
    out = conv_values(s, window, rank)
    assert out[:window].max() <= s[0] + 1e-12 and out[:window].min() >= s[-1] - 1e-12
    assert out[0] <= s[0] + 1e-12  # sigma_1 never grows
    assert torch.equal(out[window:], s[window:])


@settings(max_examples=300, deadline=None)
@given(spectra, st.integers(1, 40), st.floats(0.05, 100.0))
def test_softmax_keeps_sum_and_order(s: torch.Tensor, window: int, temperature: float) -> None:
    window = min(window, s.numel())
    out = softmax_values(s, window, temperature)
    assert float(out[:window].sum()) == pytest.approx(float(s[:window].sum()), rel=1e-9)
    assert (out[:window][:-1] >= out[:window][1:] - 1e-12).all()
    assert (out[:window] >= 0).all()  # may underflow to 0: softmax can sharpen (docs/DESIGN.md)
    assert torch.equal(out[window:], s[window:])


def test_clip_sets_the_top_values_to_the_next_one() -> None:
    s = torch.tensor([9.0, 5.0, 2.0, 1.0], dtype=torch.float64)
    assert clip_values(s, 1).tolist() == [5.0, 5.0, 2.0, 1.0]
    assert clip_values(s, 2).tolist() == [2.0, 2.0, 2.0, 1.0]
    with pytest.raises(NeedMoreValues):
        clip_values(s, 4)


@pytest.mark.parametrize("method", list(SmoothingMethod))
def test_apply_changes_only_the_dominant_values_and_keeps_vectors(method: SmoothingMethod) -> None:
    truth = torch.cat([torch.tensor([30.0, 12.0]), torch.linspace(2.0, 0.1, 58)]).double()
    w = with_spectrum(80, 60, truth, seed=3)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = 16
    params = SmoothingParams(method=method, target_stable_rank=4.0)
    new = smooth_values(s[:k], float(w.norm()), 60, params)
    w2 = apply_spectrum_change(w, u[:, :k], s[:k], vh[:k].T, new)
    s2 = torch.linalg.svdvals(w2)
    expected = torch.cat([new, s[k:]]).sort(descending=True).values
    torch.testing.assert_close(s2, expected, rtol=1e-10, atol=1e-10)
    # Directions of unchanged values are exactly preserved: W' v_i = s_i u_i for i > k.
    torch.testing.assert_close(w2 @ vh[k:].T, u[:, k:] * s[k:], rtol=1e-10, atol=1e-10)
    if method is SmoothingMethod.CAP:
        assert _stable_rank(s2) == pytest.approx(4.0, rel=1e-9)


def test_every_method_has_one_registry_entry() -> None:
    from pss_cli.config import SmoothingMethod
    from pss_cli.core.smoothing import METHODS

    assert set(METHODS) == set(SmoothingMethod)
    # only cap needs a per-matrix target; only softmax may raise sigma_max (it can sharpen)
    assert [m for m, spec in METHODS.items() if spec.needs_target] == [SmoothingMethod.CAP]
    assert [m for m, spec in METHODS.items() if spec.may_raise_sigma_max] == [
        SmoothingMethod.SOFTMAX
    ]


@pytest.mark.parametrize("scale", [3.0, 0.0123, 1e200])
def test_values_outside_the_softmax_window_come_back_bit_for_bit(scale: float) -> None:
    # (s * c) / c is not always s: a 1-ulp difference counted as a change and added a spurious
    # rank-1 update per tail value.
    top = torch.linspace(1.0, 0.01, 16, dtype=torch.float64) ** 3
    params = SmoothingParams(method=SmoothingMethod.SOFTMAX, temperature=4.0)
    frobenius = float(top.norm()) * 1.01
    new = smooth_values(top, frobenius, 64, params, scale=scale)
    window = math.ceil((frobenius / float(top[0])) ** 2 - 1e-12)
    assert torch.equal(new[window:], top[window:])
    scaled = top * scale
    head = torch.softmax(scaled[:window] / 4.0, dim=0) * scaled[:window].sum() / scale
    assert torch.allclose(new[:window], head, rtol=1e-12)
