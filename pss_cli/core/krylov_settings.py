"""The block Lanczos solver's settings, tolerances and result type, and its iteration budget.

pss_cli/core/spectra.py describes the method and re-exports these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Block width of the Krylov blocks. Products of width < 32 ran far below peak here (width 8: 4x
# slower per flop than width 32 on 4096x4096), while width 32 reached ~75 % of the fp32 GEMM peak.
DEFAULT_BLOCK_SIZE = 32
# Convergence tolerances on the *estimated remaining* relative error of the Ritz values (see
# `remaining_error`). The product goal is 1e-3 on sigma_max and 1e-2 on each top-16 value; these
# keep a safety factor of ~3 because the estimate is an extrapolation, not a bound.
DEFAULT_TOL_SIGMA_MAX = 3e-4
DEFAULT_TOL_TOP_K = 3e-3
# Iterations before the estimate is trusted: it needs two successive changes, and a spike that the
# random start barely touches shows up only after a couple of products.
MIN_ITERATIONS = 3
# Values below this fraction of sigma_1 are resolved relative to it, not to themselves.
RELATIVE_FLOOR = 1e-3
# At or below this smaller dimension the exact SVD is cheaper than the Krylov bookkeeping, and the
# Krylov space would cover a large part of the matrix anyway (measured: pss_cli/config.py).
DEFAULT_EXACT_MAX_DIM = 512


@dataclass(frozen=True)
class KrylovSettings:
    """Knobs of the block Lanczos solver; defaults chosen by measurement (benchmarks/)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    tol_sigma_max: float = DEFAULT_TOL_SIGMA_MAX
    tol_top_k: float = DEFAULT_TOL_TOP_K
    max_iterations: int = 40
    exact_max_dim: int = DEFAULT_EXACT_MAX_DIM
    # Krylov products in bf16 with a final compute-dtype Rayleigh-Ritz (module docstring).
    bf16_products: bool = False


@dataclass(frozen=True)
class BatchSpectrum:
    """Top singular values of a batch, descending.

    values: (B, k) float64 on the CPU; k = min(requested k, min(m, n)).
    iterations: per matrix, the Krylov iterations used (0 for the exact path).
    exact: per matrix, True when the values come from a full SVD (small matrix or fallback).
    """

    values: torch.Tensor
    iterations: tuple[int, ...]
    exact: tuple[bool, ...]


def relative_scale(values: torch.Tensor) -> torch.Tensor:
    """What each of a batch's descending values (B, k) is measured relative to: itself, but
    never less than RELATIVE_FLOOR * sigma_1 (values at rounding level, as in a rank-deficient
    matrix, cannot be resolved relative to themselves), nor than the dtype's smallest normal."""
    floor = values[:, :1] * RELATIVE_FLOOR
    return torch.maximum(values, floor).clamp_min(torch.finfo(values.dtype).tiny)


def uses_exact_path(m: int, n: int, k: int, settings: KrylovSettings) -> bool:
    """True when a full SVD is used: small matrices, or a Krylov space that would not fit."""
    short = min(m, n)
    if short <= settings.exact_max_dim or short < 4 * max(k, settings.block_size):
        return True
    # The Krylov space must hold k Ritz values for three iterations (the convergence estimate
    # needs two increments) plus room to converge; a very large --top-k cannot get that.
    block = settings.block_size
    needed = math.ceil(k / block) + MIN_ITERATIONS + 2
    return _iteration_budget(short, settings) < needed


def iteration_budget(short: int, settings: KrylovSettings) -> int:
    """Most Krylov iterations a matrix with this short side may take (memory planning uses it)."""
    return _iteration_budget(short, settings)


def _iteration_budget(short: int, settings: KrylovSettings) -> int:
    # Never let the Krylov space exceed half the short side: past that the exact SVD is cheaper.
    return max(MIN_ITERATIONS, min(settings.max_iterations, short // (2 * settings.block_size)))
