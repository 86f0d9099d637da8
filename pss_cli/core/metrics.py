"""Singularity metrics from singular values (PSS, arXiv 2602.01308, and docs/DESIGN.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Re-exported: the gate needs the same floor without torch.
from pss_cli.thresholds import stable_rank_floor as stable_rank_floor


@dataclass(frozen=True)
class SpectralMetrics:
    sigma_max: float | None
    stable_rank: float | None
    topk_energy_share: float | None
    sigma1_over_sigma2: float | None
    entropy_effective_rank: float | None


def spectral_metrics(
    top_values: torch.Tensor, frobenius_norm: float, full_spectrum: torch.Tensor | None = None
) -> SpectralMetrics:
    """Metrics of one matrix.

    top_values: (k,) float64 descending top singular values.
    frobenius_norm: ||W||_F, exact (from every entry), float64. Ratios are formed before squaring
        so that float64 weights near 1e300 do not overflow.
    full_spectrum: (min(m, n),) all singular values when known (exact path), for the entropy rank.

    Stable rank SR = ||W||_F^2 / sigma_1^2 uses the exact Frobenius norm rather than the sum of the
    top-k values, so it is exact up to the error of sigma_1 alone (relative error <= 2x that of
    sigma_1). All-zero matrices have no defined stable rank: None, never a division by zero.
    """
    if top_values.numel() == 0 or float(top_values[0]) <= 0.0 or frobenius_norm <= 0.0:
        return SpectralMetrics(
            sigma_max=0.0 if frobenius_norm <= 0.0 else None,
            stable_rank=None,
            topk_energy_share=None,
            sigma1_over_sigma2=None,
            entropy_effective_rank=None,
        )
    sigma_max = float(top_values[0])
    stable_rank = (frobenius_norm / sigma_max) ** 2
    # Rounding can push the top-k energy a hair above the total when the spectrum has <= k values.
    energy = min(1.0, float(((top_values / frobenius_norm) ** 2).sum()))
    ratio = None
    if top_values.numel() > 1 and float(top_values[1]) > 0.0:
        ratio = sigma_max / float(top_values[1])
    return SpectralMetrics(
        sigma_max=sigma_max,
        stable_rank=stable_rank,
        topk_energy_share=energy,
        sigma1_over_sigma2=ratio,
        entropy_effective_rank=(
            entropy_effective_rank(full_spectrum) if full_spectrum is not None else None
        ),
    )


def entropy_effective_rank(singular_values: torch.Tensor) -> float | None:
    """exp(-sum p_i log p_i) with p = s / sum(s) (Roy & Vetterli 2007), as the PSS authors log it.

    singular_values: (r,) non-negative. None for an all-zero spectrum.
    """
    s = singular_values.to(torch.float64).clamp_min(0)
    total = float(s.sum())
    if total <= 0.0:
        return None
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))
