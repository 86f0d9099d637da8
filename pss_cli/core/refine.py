"""One float64 Rayleigh-Ritz step that makes float32 singular triplets float64-accurate.

Why: on a matrix whose sigma_1/sigma_2 is in the hundreds (a rank-one spike, as in a collapsing
GPT-2 layer), W / ||W||_F has sigma_1 ~ 1 and a tail energy 1 - sigma_1^2 of ~1e-5 or less. A
float32 sigma_1 carries a relative error of ~6e-8, so the tail energy it implies is off by
~1e-7 absolute: a 2-10 % error in the stable rank that the cap aims at, and a verification that
fails on precision alone (reproduced in tests/test_smooth_precision.py). Projecting W in float64
onto the float32 subspace and solving the small k x n problem exactly gives values whose error
is the float64 rounding plus the square of the subspace's angle (~1e-14 for a separated spike).
"""

from __future__ import annotations

import torch

from pss_cli.core.spectra import Triplets, deterministic_lapack


def refine_float64(matrix: torch.Tensor, triplets: Triplets) -> Triplets:
    """Rayleigh-Ritz of ``matrix`` on ``triplets.right``'s span, in float64 on the CPU.

    matrix: (m, n) float64 CPU; triplets: top-k of (an approximation of) the same matrix.
    Returns top-k triplets (left (m, k), values (k,), right (n, k)), all float64 CPU.
    """
    right = triplets.right.to("cpu", torch.float64)  # (n, k)
    product = matrix @ right  # (m, k)
    # LAPACK on one thread: its last bits depend on the thread count (spectra.py)
    with deterministic_lapack(product):
        basis, _ = torch.linalg.qr(product)  # (m, k) orthonormal range of W V
    small = basis.T @ matrix  # (k, n): W restricted to that range
    with deterministic_lapack(small):
        u_small, values, vh = torch.linalg.svd(small, full_matrices=False)  # (k,k), (k,), (k,n)
    return Triplets(
        left=basis @ u_small,
        values=values,
        right=vh.T.contiguous(),
        exact=triplets.exact,
        iterations=triplets.iterations + 1,
    )
