"""Top singular values of batches of same-shaped matrices.

Method: randomized block Golub-Kahan-Lanczos (block Krylov) with full re-orthogonalisation and a
per-matrix convergence test, falling back to exact ``torch.linalg.svdvals`` where that is cheaper
(small matrices) or where the iteration did not converge (never a silently wrong value).

Why block Krylov and not plain subspace (power) iteration: on the flat Marchenko-Pastur bulks of
random-init or early-training weights, sigma_2/sigma_1 is ~0.999 and subspace iteration converges
like (sigma_{l+1}/sigma_1)^(2q). Measured here on a 4096x4096 bulk, subspace iteration with l=48
needed ~21 iterations (42 products of width 48) for a 1e-3 error on sigma_1, block Lanczos with
b=16 ~10 iterations of width 16 (Musco & Musco 2015, "Randomized Block Krylov Methods for
Stronger and Faster Approximate SVD": Krylov depends on sqrt(gap), power iteration on gap).

Mixed precision (`KrylovSettings.bf16_products`, chosen per device by pss_cli.core.precision): the
Krylov expansion's products A V and A^T U run in bf16 (fp32 accumulation), while the
re-orthogonalisation (of the right basis alone: lanczos.py says why), the QR factorisations and the
projected bidiagonal problem stay in the compute dtype (fp32/fp64). The reported values then come
from a final Rayleigh-Ritz step with the compute-dtype matrix: the singular values of A V_k, V_k
the top Ritz vectors, are Ritz values of the true A (lower bounds of the true values), so bf16
rounding can bias the subspace but never inflate a reported value. The convergence test is made
precision-aware: bf16 rounding makes the Ritz values jitter, and a jitter that reads as a negative
increment must not pass for convergence (see `remaining_error`); if the bf16 Ritz values and the
fp32 Rayleigh-Ritz values disagree by more than the tolerance, the matrix is solved again with
compute-dtype products. Where a CPU has no bf16 kernel (AVX2-only: 50-300x slower than fp32) `auto`
keeps fp32. A BF16 checkpoint's batch may arrive as bf16 (pss_cli/pipeline/loader.py): its values
are the stored ones, so the products use it as it is and the Rayleigh-Ritz product converts it to
fp32 a slab at a time; the retry and the full-SVD fallback convert the matrix they need.

The per-iteration Ritz values come from the eigenvalues of the banded T^T T (T the projected
block bidiagonal, bandwidth b; `krylov_basis.ritz_values`), in float64: O(n^2 b) per iteration
instead of a dense O(n^3) SVD of T.

The pieces: pss_cli/core/krylov_settings.py (settings, tolerances, result type),
pss_cli/core/lanczos.py (the iteration), pss_cli/core/krylov_basis.py (basis,
re-orthogonalisation, convergence estimate), pss_cli/core/mixed_precision.py (bf16 products,
Rayleigh-Ritz), pss_cli/core/lapack.py (deterministic LAPACK, the exact path). This module is the
entry point and re-exports the names other code imports from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pss_cli.core.krylov_settings import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_EXACT_MAX_DIM,
    DEFAULT_TOL_SIGMA_MAX,
    DEFAULT_TOL_TOP_K,
    MIN_ITERATIONS,
    RELATIVE_FLOOR,
    BatchSpectrum,
    KrylovSettings,
    iteration_budget,
    uses_exact_path,
)
from pss_cli.core.lanczos import block_lanczos
from pss_cli.core.lapack import deterministic_lapack, exact_singular_values

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_EXACT_MAX_DIM",
    "DEFAULT_TOL_SIGMA_MAX",
    "DEFAULT_TOL_TOP_K",
    "MIN_ITERATIONS",
    "RELATIVE_FLOOR",
    "BatchSpectrum",
    "KrylovSettings",
    "Triplets",
    "deterministic_lapack",
    "exact_singular_values",
    "gaussian_start",
    "iteration_budget",
    "top_singular_triplets",
    "top_singular_values",
    "uses_exact_path",
]


def gaussian_start(seeds: list[int], n: int, block_size: int) -> torch.Tensor:
    """(B, n, b) float32 Gaussian start blocks on the CPU, one generator per matrix.

    One seed per matrix (not one stream for the batch) so that a matrix's result does not depend
    on which other matrices share its batch, its device, or the process that computes it.
    """
    blocks = []
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        blocks.append(torch.randn(n, block_size, generator=generator, dtype=torch.float32))
    return torch.stack(blocks)


def top_singular_values(
    matrices: torch.Tensor,
    k: int,
    start: torch.Tensor | None,
    settings: KrylovSettings = KrylovSettings(),
) -> BatchSpectrum:
    """Top-k singular values of each matrix of a batch.

    matrices: (B, m, n) finite values, float32 or float64, on the compute device; or bfloat16
        values exactly as a BF16 checkpoint stores them, whose Krylov products are then bf16
        whatever `settings` says, with float32 for everything else (module docstring).
    start: (B, min(m, n), block_size) Gaussian start blocks (see `gaussian_start`); may be None
        only when the exact path is certain to be taken (`uses_exact_path`).
    """
    batch, m, n = matrices.shape
    k = min(k, m, n)
    compute = torch.float32 if matrices.dtype == torch.bfloat16 else matrices.dtype
    if uses_exact_path(m, n, k, settings):
        values = exact_singular_values(matrices.to(compute))[:, :k]
        return BatchSpectrum(
            values=values.detach().to("cpu", torch.float64),
            iterations=(0,) * batch,
            exact=(True,) * batch,
        )
    if start is None:
        raise ValueError("the Krylov path needs start blocks")
    # Work on the tall orientation: the Krylov vectors of the short side are cheaper to keep.
    tall = matrices if m >= n else matrices.mT
    if matrices.dtype == torch.bfloat16:
        # The stored values, multiplied as they are (the module docstring).
        settings = replace(settings, bf16_products=True)
    result = block_lanczos(tall, k, start.to(device=matrices.device, dtype=compute), settings)
    return result


@dataclass(frozen=True)
class Triplets:
    """Top-k singular triplets of one matrix: W ~ left diag(values) right^T on those directions.

    left: (m, k), right: (n, k) in the matrix's dtype and device; values: (k,) float64 on CPU.
    """

    left: torch.Tensor
    values: torch.Tensor
    right: torch.Tensor
    exact: bool
    iterations: int


def top_singular_triplets(
    matrix: torch.Tensor,
    k: int,
    start: torch.Tensor | None,
    settings: KrylovSettings = KrylovSettings(),
) -> Triplets:
    """Top-k singular triplets of one (m, n) matrix (float32/64), for smoothing.

    start: (min(m, n), block_size) Gaussian block, or None when `uses_exact_path` holds. The
    Krylov path returns Ritz triplets: exact for the converged dominant directions, which are the
    ones smoothing changes; `pss smooth` re-measures the result to prove it.
    """
    m, n = matrix.shape
    k = min(k, m, n)
    if uses_exact_path(m, n, k, settings):
        with deterministic_lapack(matrix):
            u, values, vh = torch.linalg.svd(matrix, full_matrices=False)
        return Triplets(u[:, :k], values[:k].to("cpu", torch.float64), vh[:k].mT, True, 0)
    if start is None:
        raise ValueError("the Krylov path needs a start block")
    transposed = m < n
    tall = (matrix.mT if transposed else matrix).unsqueeze(0)
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    spectrum = block_lanczos(
        tall, k, start.unsqueeze(0).to(device=matrix.device, dtype=matrix.dtype), settings, found
    )
    left, right = found[0]
    if transposed:
        left, right = right, left
    return Triplets(left, spectrum.values[0], right, spectrum.exact[0], spectrum.iterations[0])
