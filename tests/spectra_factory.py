"""Matrices of known spectrum, built as U diag(s) V^T with Haar-random U, V (for tests)."""

from __future__ import annotations

import torch


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, cols) with orthonormal columns (rows >= cols), float64."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    # Fix column signs so that the distribution is Haar and the result is deterministic.
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def with_spectrum(m: int, n: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    """(m, n) float64 matrix whose singular values are exactly `singular_values` (descending)."""
    generator = torch.Generator().manual_seed(seed)
    r = singular_values.numel()
    u = orthonormal(m, r, generator)
    v = orthonormal(n, r, generator)
    return (u * singular_values.to(torch.float64)) @ v.T


def spiky(r: int, spikes: tuple[float, ...] = (8.0, 5.0)) -> torch.Tensor:
    """A flat-ish bulk in [0.5, 1] with a few outlying spikes on top (a collapsing layer)."""
    bulk = torch.linspace(1.0, 0.5, r - len(spikes), dtype=torch.float64)
    return torch.cat([torch.tensor(spikes, dtype=torch.float64), bulk])


def power_law(r: int, exponent: float = 0.6) -> torch.Tensor:
    """s_i = (i + 1)^-exponent: the heavy-tailed spectra of trained weights."""
    return (torch.arange(r, dtype=torch.float64) + 1.0) ** -exponent


def flat_bulk(r: int) -> torch.Tensor:
    """Quarter-circle (square Marchenko-Pastur) singular values: sigma_2/sigma_1 ~ 0.99+.

    The hard case of randomized SVD (DESIGN.md): quantiles of the density (1/pi) sqrt(4 - s^2).
    """
    # Inverse of the CDF of the quarter-circle law, by interpolation on a fine grid.
    grid = torch.linspace(0.0, 2.0, 20001, dtype=torch.float64)
    density = torch.sqrt((4.0 - grid**2).clamp_min(0.0)) / torch.pi
    cdf = torch.cumsum(density, 0)
    cdf = cdf / cdf[-1]
    quantiles = (torch.arange(r, dtype=torch.float64) + 0.5) / r
    index = torch.searchsorted(cdf, 1.0 - quantiles).clamp(max=grid.numel() - 1)
    return grid[index]


def float16_edge(m: int = 128, n: int = 256) -> torch.Tensor:
    """(m, n) float32 values that fit float16, whose sigma_1 clipped to sigma_2 does not: a
    +-30000 rank-1 sign pattern over a bulk with one outlier the pattern cancels to ~65000
    (the exact clipped matrix holds ~93000, inf in float16)."""
    g = torch.Generator().manual_seed(1)
    spike = 30000.0 * torch.outer(
        torch.sign(torch.randn(m, generator=g)), torch.sign(torch.randn(n, generator=g))
    )
    bulk = torch.randn(m, n, generator=g) * 500
    bulk[3, 5] = 95000.0 * -torch.sign(spike[3, 5])
    return bulk + spike
