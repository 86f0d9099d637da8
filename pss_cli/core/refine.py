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
    # All of it on one thread: LAPACK's last bits depend on the thread count (lapack.py), and
    # so do MKL's float64 GEMMs with a transposed operand even under MKL_CBWR=AUTO,STRICT
    # (measured: (64 x 600) @ (600 x 700) gave other bits under 1 and 2 threads on an AMD EPYC
    # Zen 4, where float32 gave the same). These are (m, n) x (n, k) products with k <= ~64.
    with deterministic_lapack(matrix):
        product = matrix @ right  # (m, k)
        basis, _ = torch.linalg.qr(product)  # (m, k) orthonormal range of W V
        small = basis.T @ matrix  # (k, n): W restricted to that range
        u_small, values, vh = torch.linalg.svd(small, full_matrices=False)  # (k,k), (k,), (k,n)
        left = basis @ u_small
    return Triplets(
        left=left,
        values=values,
        right=vh.T.contiguous(),
        exact=triplets.exact,
        iterations=triplets.iterations + 1,
    )
