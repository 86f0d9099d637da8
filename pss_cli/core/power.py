"""Cheap per-step spectral numerics for the in-training guard (pss_cli.guard).

- `power_step`: sigma_1 of a matrix by warm-started power iteration. The right vector v persists
  between calls (the guard keeps it in its state), so one or two products per check track a
  slowly moving sigma_1: during training a weight changes by ~lr per step, and the dominant
  direction moves little between checks. Power iteration underestimates sigma_1 (a Rayleigh
  quotient), never overestimates it: the stable rank derived from it is an upper bound, so a
  floor rule built on it errs towards silence rather than false alarms.
- `frobenius_norm_sq`: exact ||W||_F^2 from every entry (the stable rank's numerator).
- `stable_jacobian_energy`: the paper's SJE (arXiv 2602.01308) from the real gradient.

Tensors in, tensors out; no host synchronisation (the guard gathers every scalar of a step into
one tensor and reads it once).
"""

from __future__ import annotations

import math

import torch

# Guards the normalisations against an all-zero matrix or vector (never divides by zero; a zero
# matrix then reports sigma_1 = 0 and the caller treats its stable rank as undefined).
_TINY = 1e-30


def power_step(
    matrix: torch.Tensor, right: torch.Tensor, n_iters: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_iters` power iterations on W^T W from the unit vector `right`.

    matrix: (m, n), any float dtype; it is read, never written. right: (n,) unit-norm, float32
    (or float64), on the matrix's device.
    Returns (sigma, right'): sigma is a 0-d tensor in right's dtype, ||W^T u|| with u = Wv/||Wv||
    (two products per iteration), and right' the new unit vector.
    Products run in the vector's dtype: a bf16 weight is exact in float32, and a float32 vector
    keeps the estimate's rounding at ~1e-7 instead of bf16's ~4e-3.
    """
    w = matrix if matrix.dtype == right.dtype else matrix.to(right.dtype)
    v = right
    sigma = torch.zeros((), dtype=right.dtype, device=right.device)
    for _ in range(max(1, n_iters)):
        u = w @ v  # (m,)
        u = u / u.norm().clamp_min(_TINY)
        wt_u = w.mT @ u  # (n,)
        sigma = wt_u.norm()
        # An all-zero matrix (a LoRA B, a zero-initialised projection at its first visit) has
        # no direction to offer: keep the current vector rather than return zeros, from which
        # every later warm-started call would read sigma = 0 again (no host sync: a select).
        v = torch.where(sigma > 0, wt_u / sigma.clamp_min(_TINY), v)
    return sigma, v


def frobenius_norm_sq(matrix: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 as a 0-d float64 tensor, from every entry.

    The norm is reduced in float32 (float64 for float64 input) and squared in float64, the
    dtype of the guard's vector of scalars.
    """
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    norm: torch.Tensor = torch.linalg.vector_norm(matrix, dtype=dtype)
    return norm.to(torch.float64).square()


def random_unit_vector(n: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """(n,) unit Gaussian vector on the CPU from `generator` (never the global RNG)."""
    v = torch.randn(n, generator=generator, dtype=torch.float64)
    unit: torch.Tensor = v / v.norm().clamp_min(_TINY)
    return unit.to(dtype)


def stable_jacobian_energy(
    gradient: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    stable_rank: float,
) -> float | None:
    """SJE = sum_{i<=k} e_i / sum_i e_i, e_i = (u_i^T G v_i)^2, k = floor(SR) (arXiv 2602.01308).

    gradient: (m, n) dL/dW. left: (m, K), right: (n, K): the top K singular directions of W
    (K >= k; the sum in the denominator runs over these K computed directions, not the whole
    spectrum: the guard computes the top K = max(16, ceil(SR) + 2) triplets on a trigger step,
    so the ratio says how much of the gradient's energy along W's dominant directions sits in
    its top floor(SR) ones). None when the gradient has no energy along them or is not finite.
    """
    k = max(1, min(math.floor(stable_rank), left.shape[1]))
    g = gradient.to(left.dtype)
    # (K,) u_i^T G v_i without forming U^T G V: column-wise dot products of U and G V.
    projections = (left * (g @ right)).sum(dim=0)
    energies = projections.square().to(torch.float64)
    total = float(energies.sum())
    if not math.isfinite(total) or total <= 0.0:
        return None
    return float(energies[:k].sum()) / total
