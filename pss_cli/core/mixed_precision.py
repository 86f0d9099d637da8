"""Mixed-precision (bf16) Krylov products and the compute-dtype Rayleigh-Ritz step that vouches
for their values (pss_cli/core/spectra.py's docstring gives the reasoning)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pss_cli.core.krylov_settings import KrylovSettings, relative_scale
from pss_cli.core.lapack import deterministic_lapack

# Rows converted per slab in `_upcast_product`: 16 MiB of float32 scratch.
UPCAST_CHUNK_ENTRIES = 2**22


class Products:
    """A V and A^T U, in the matrix's dtype or in bf16 (fp32 accumulation, bf16 result).

    The bf16 path keeps one bf16 copy of A and computes A^T U as (U^T A)^T: torch's bf16 product
    with a transposed A was 4-17x slower here (AMD EPYC Zen 4, (11008x4096)^T @ (11008x32):
    676 ms vs 40 ms for (U^T A)^T). A contiguous transposed bf16 copy would make the adjoint as
    fast as A V, but it cost about what it saves over a scan's ~13 adjoint products (machine
    shared, best of 7: 334 ms copy vs 13 x 16 ms saved at 4096x4096; 1726 ms vs 13 x 82 ms at
    11008x4096) and doubles the bf16 memory.
    A BF16 checkpoint's values arrive exactly (the buffer is scaled by a power of two, see the
    pipeline), so the bf16 copy adds no rounding of A for them.

    The bf16 matrix is kept row-major: torch's bf16 products on a transposed view (the tall view
    of a wide matrix handed to `top_singular_values`) took 438-478 ms each instead of 6-10 ms on
    a 4096 x 11008 matrix (Intel Xeon with AMX, one thread), and 3-5 ms instead of 0.4-0.5 ms on
    768 x 3072; a strided batch (every other matrix of a stack) 33 ms instead of 4 ms at
    4096 x 4096. The scan's loader lays every batch out tall and contiguous, so there it is never
    copied; other callers of a wide or strided bf16 batch pay one copy. float32 and float64
    products keep the view: MKL took about as long either way.
    """

    def __init__(self, a: torch.Tensor, low: bool) -> None:
        if a.dtype == torch.bfloat16:
            a = a.contiguous() if low else a  # row-major for bf16 products (above)
            # A BF16 checkpoint loaded as stored (pss_cli/pipeline/loader.py): the matrix is its
            # own bf16 copy, and the compute-dtype products convert it a slab at a time. With
            # `low` False (the fp32 retry of a matrix bf16 could not vouch for) every product is
            # such a slab product: a float32 copy of the matrix would double its memory (an
            # 11008 x 4096 matrix: 180 MB beside the 90 MB one), and the scan's memory plan
            # counts on it not existing (pss_cli/pipeline/memory.py: batch_peak_bytes).
            self.low: torch.Tensor | None = a if low else None
            self.compute = torch.float32
        else:
            self.low = a.to(torch.bfloat16, memory_format=torch.contiguous_format) if low else None
            self.compute = a.dtype
        self.a = a
        # The batch rows still iterating. Converged matrices are dropped from this list, never
        # from `a`: compacting a (B, m, n) batch copied every remaining matrix (fp32 and bf16)
        # each time one converged, 50 ms per 11008 x 4096 matrix (AMD EPYC Zen 4, 2 threads),
        # and the copy did not even free memory (the caller still holds the whole batch).
        self.rows = list(range(a.shape[0]))

    def matrix(self, local: int) -> torch.Tensor:
        """The compute-dtype matrix of active row ``local``: a view, or for a bf16 batch a
        converted copy (only the rare full-SVD fallback asks for it)."""
        matrix = self.a[self.rows[local]]
        return matrix if matrix.dtype == self.compute else matrix.to(self.compute)

    def exact_product(self, local: int, right: torch.Tensor) -> torch.Tensor:
        """A @ right for active row ``local`` with compute-dtype products (the Rayleigh-Ritz
        step's one product per matrix)."""
        matrix = self.a[self.rows[local]]
        if matrix.dtype == self.compute:
            return matrix @ right
        return _upcast_product(matrix, right, self.compute)

    def _batched(self, source: torch.Tensor, block: torch.Tensor, adjoint: bool) -> torch.Tensor:
        if source.dtype != block.dtype:
            # bf16 storage, compute-dtype products (the retry): one slab product per matrix.
            product = _upcast_adjoint if adjoint else _upcast_product
            return torch.stack(
                [product(source[row], block[i], block.dtype) for i, row in enumerate(self.rows)]
            )
        if len(self.rows) == source.shape[0]:
            return _product(source, block, adjoint)
        return torch.stack(
            [_product(source[row], block[i], adjoint) for i, row in enumerate(self.rows)]
        )

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.low is None:
            return self._batched(self.a, v, adjoint=False)
        return self._batched(self.low, v.to(torch.bfloat16), adjoint=False).to(v.dtype)

    def adjoint(self, u: torch.Tensor) -> torch.Tensor:
        if self.low is None:
            return self._batched(self.a, u, adjoint=True)
        return self._batched(self.low, u.to(torch.bfloat16), adjoint=True).to(u.dtype)

    def select(self, keep: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in keep.tolist()]


def _product(a: torch.Tensor, block: torch.Tensor, adjoint: bool) -> torch.Tensor:
    """A @ block, or A^T @ block: in the compute dtype as ``a.mT @ block``; in bf16 as
    (block^T A)^T (see `Products`)."""
    if not adjoint:
        return a @ block
    if a.dtype == torch.bfloat16:
        return (block.mT @ a).mT
    return a.mT @ block


def _upcast_product(matrix: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """matrix @ right in `dtype` for a bf16 matrix, converting ~4M entries at a time into one
    reused scratch buffer: the product of a compute-dtype GEMM without a compute-dtype copy of
    the matrix (torch's CPU bf16 GEMM returns bf16, rounding the product to 8 bits)."""
    out = torch.empty(matrix.shape[0], right.shape[-1], dtype=dtype, device=matrix.device)
    for first, last, part in _upcast_slabs(matrix, dtype):
        torch.mm(part, right, out=out[first:last])
    return out


def _upcast_adjoint(matrix: torch.Tensor, left: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """matrix^T @ left in `dtype` for a bf16 matrix, a slab of rows at a time as in
    `_upcast_product`; the slabs' contributions are summed in row order (reproducible)."""
    out = torch.zeros(matrix.shape[1], left.shape[-1], dtype=dtype, device=matrix.device)
    for first, last, part in _upcast_slabs(matrix, dtype):
        out.addmm_(part.mT, left[first:last])
    return out


def _upcast_slabs(
    matrix: torch.Tensor, dtype: torch.dtype
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(first row, last row, those rows in `dtype`), the rows ~4M entries at a time, each slab
    converted into the same scratch buffer (valid until the next one)."""
    m, n = matrix.shape
    rows = max(1, UPCAST_CHUNK_ENTRIES // n)
    scratch = torch.empty(min(rows, m), n, dtype=dtype, device=matrix.device)
    for first in range(0, m, rows):
        last = min(m, first + rows)
        part = scratch[: last - first]
        part.copy_(matrix[first:last])
        yield first, last, part


def rayleigh_ritz(
    ops: Products,
    chosen: list[int],
    v_all: torch.Tensor,
    ritz_vectors: torch.Tensor,
    ritz: torch.Tensor,
    k: int,
    settings: KrylovSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of A on the top right Ritz vectors, with compute-dtype products; and per matrix
    whether they agree with the bf16 Ritz values `ritz` within the tolerances.

    chosen: D active rows of `ops`; v_all: (D, n, J*b) their right Krylov bases; ritz_vectors:
    (D, J*b, width) the top right singular vectors X_k of the block bidiagonal
    (krylov_basis.top_right_vectors; width: k rounded up to whole blocks, so the one
    compute-dtype product runs at a Krylov step's width). V_k = V X_k gives
    sigma_i(A V_k) <= sigma_i(A): Ritz values of the true matrix. Costs one compute-dtype
    product per matrix (a Krylov step of ~2 bf16 products costs about as much on a CPU where
    bf16 is 2.5x faster).
    """
    right = v_all @ ritz_vectors.to(device=v_all.device, dtype=v_all.dtype)
    product = torch.stack([ops.exact_product(local, right[i]) for i, local in enumerate(chosen)])
    with deterministic_lapack(right):
        refined = torch.linalg.svdvals(product)[:, :k]
    # The bf16 values carry rounding the fp32 ones do not: a gap beyond the tolerance means the
    # bf16 recurrence's convergence test was judging noise.
    # Compared in float64 on the CPU, where the Ritz values are (krylov_basis.ritz_values).
    exact = refined.to("cpu", torch.float64)
    gap = (ritz.to("cpu", torch.float64) - exact).abs() / relative_scale(exact)
    agrees = (gap[:, 0] <= settings.tol_sigma_max) & (gap.amax(dim=1) <= settings.tol_top_k)
    return refined, agrees
