from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pss_cli.core.metrics import entropy_effective_rank, spectral_metrics, stable_rank_floor


def test_stable_rank_and_shares_of_a_known_spectrum() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    frob = float((s**2).sum()) ** 0.5  # sqrt(22)
    m = spectral_metrics(s[:2], frob)
    assert m.sigma_max == 4.0
    assert m.stable_rank == pytest.approx(22 / 16, rel=1e-15)
    assert m.topk_energy_share == pytest.approx(20 / 22, rel=1e-15)
    assert m.sigma1_over_sigma2 == pytest.approx(2.0)
    assert m.entropy_effective_rank is None


def test_all_zero_matrix_has_no_stable_rank() -> None:
    m = spectral_metrics(torch.zeros(3, dtype=torch.float64), 0.0)
    assert m.sigma_max == 0.0
    assert m.stable_rank is None and m.topk_energy_share is None and m.sigma1_over_sigma2 is None


def test_rank_one_has_no_sigma_ratio() -> None:
    m = spectral_metrics(torch.tensor([3.0, 0.0], dtype=torch.float64), 3.0)
    assert m.stable_rank == pytest.approx(1.0)
    assert m.sigma1_over_sigma2 is None


def test_entropy_rank_of_a_flat_spectrum_is_its_length() -> None:
    assert entropy_effective_rank(torch.ones(37, dtype=torch.float64)) == pytest.approx(37.0)
    assert entropy_effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert entropy_effective_rank(torch.zeros(4)) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=40))
def test_stable_rank_lies_between_one_and_rank(values: list[float]) -> None:
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    m = spectral_metrics(s, float((s**2).sum()) ** 0.5, s)
    assert m.stable_rank is not None and 1.0 - 1e-12 <= m.stable_rank <= len(values) + 1e-9
    assert m.entropy_effective_rank is not None
    assert 1.0 - 1e-9 <= m.entropy_effective_rank <= len(values) + 1e-9
    assert m.topk_energy_share is not None and m.topk_energy_share <= 1.0
    assert not math.isnan(m.stable_rank)


def test_floor_respects_what_the_shape_allows() -> None:
    assert stable_rank_floor(5.0, 2, 0.25) == 0.5  # a 2 x 384 token-type embedding
    assert stable_rank_floor(5.0, 768, 0.25) == 5.0
