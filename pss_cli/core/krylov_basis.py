"""The Krylov bookkeeping of the block Lanczos iteration (pss_cli/core/lanczos.py): the
orthonormal basis and its re-orthogonalisation, the projected block bidiagonal, and the
convergence estimate of the Ritz values."""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable

import torch

from pss_cli.core.band_eigen import BandEigenError, top_band_eigen
from pss_cli.core.krylov_settings import relative_scale
from pss_cli.core.lapack import per_matrix


class Basis:
    """Orthonormal Krylov blocks kept in one preallocated buffer, so that re-orthogonalisation
    multiplies by a view instead of concatenating every iteration (the concatenations took ~8 %
    of a GPT-2-small scan).

    The buffer is (B, capacity, d): each block is stored transposed, one row per basis vector.
    QR hands its Q back column-major, so a block's transpose is contiguous and appending it is a
    plain copy; storing the columns side by side in a (B, d, capacity) buffer made every append
    a strided transposing copy (0.18 s of a 3.6 s Llama-block scan, AMD EPYC Zen 4, 2 threads).
    """

    def __init__(self, batch: int, dim: int, capacity: int, like: torch.Tensor) -> None:
        self.buffer = like.new_empty(batch, capacity, dim)
        self.used = 0

    def append(self, block: torch.Tensor) -> None:
        width = block.shape[-1]
        self.buffer[:, self.used : self.used + width] = block.mT
        self.used += width

    def columns(self, count: int) -> torch.Tensor:
        """The first `count` basis vectors as columns: a (B, d, count) view."""
        return self.buffer[:, :count].mT

    def view(self) -> torch.Tensor | None:
        return self.columns(self.used) if self.used else None

    def select(self, keep: torch.Tensor) -> None:
        self.buffer = self.buffer[keep]


def reorthogonalise(block: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Full re-orthogonalisation against every earlier block: one classical Gram-Schmidt pass,
    and a second only when the first removed a large part of the block.

    The three-term recurrence has already been subtracted, so what is left along the basis is
    rounding-level drift and one pass normally suffices; when a column lost more than half its
    norm, cancellation may have left it inexact and a second pass restores orthogonality
    ("twice is enough", Giraud et al. 2005). Full re-orthogonalisation keeps Lanczos free of
    ghost copies of converged values.
    block: (B, d, b); basis: (B, d, J*b) orthonormal columns, or None.
    The norm before the pass follows from Pythagoras (||x||^2 = ||Q^T x||^2 + ||x - Q Q^T x||^2
    for orthonormal Q), so only the (J*b, b) coefficients and the result are reduced.
    """
    if basis is None:
        return block
    coefficients = basis.mT @ block
    block = torch.baddbmm(block, basis, coefficients, alpha=-1.0)
    after = torch.linalg.vector_norm(block, dim=-2).square()
    removed = torch.linalg.vector_norm(coefficients, dim=-2).square()
    # after < 0.5 * before  <=>  after^2 < (after^2 + removed^2) / 4  <=>  3 after^2 < removed^2
    again = (3.0 * after < removed).any(dim=-1)  # (B,) per matrix
    if bool(again.any()):
        # Decided per matrix, so that a matrix's result never depends on its batch-mates.
        twice = torch.baddbmm(block, basis, basis.mT @ block, alpha=-1.0)
        block = torch.where(again[:, None, None], twice, block)
    return block


def block_bidiagonal(r_blocks: list[torch.Tensor], s_blocks: list[torch.Tensor]) -> torch.Tensor:
    """Assemble T = U^T A V (B, J*b, J*b): R_j on the diagonal, S_j^T on the superdiagonal."""
    count = len(r_blocks)
    batch, block, _ = r_blocks[0].shape
    t = r_blocks[0].new_zeros(batch, count * block, count * block)
    for j in range(count):
        rows = slice(j * block, (j + 1) * block)
        t[:, rows, rows] = r_blocks[j]
        if j + 1 < count:
            t[:, rows, (j + 1) * block : (j + 2) * block] = s_blocks[j].mT
    return t


def import_lapack_in_background() -> None:
    """Start importing scipy.linalg's LAPACK (the band eigensolver of band_eigen.py) on a thread.

    Importing it costs ~0.19 s (AMD EPYC Zen 4), a cost the first Ritz values would otherwise
    pay on the critical path of every `pss scan` process. Started when a scan has Krylov work,
    it overlaps the first batch's reads and products; Python's per-module import lock makes a
    caller that arrives early wait only for the rest. Not a daemon: an interpreter never exits
    in the middle of an import.
    """
    if "scipy.linalg.cython_lapack" not in sys.modules:
        threading.Thread(
            target=importlib.import_module,
            args=("scipy.linalg.cython_lapack",),
            name="pss-import",
        ).start()


def ritz_values(r_blocks: list[torch.Tensor], s_blocks: list[torch.Tensor], k: int) -> torch.Tensor:
    """Top-k singular values of the block bidiagonal T (`block_bidiagonal`): (B, k) float64 on
    the CPU, descending, as the square roots of the top eigenvalues of the banded T^T T.

    Why not svdvals(T): it treats T as dense and costs O(n^3) per iteration, 0.6 s of a 3.6 s
    Llama-block scan (AMD EPYC Zen 4, 2 threads); T is upper triangular with bandwidth b
    (R_j upper triangular, S_j^T lower triangular), so T^T T is symmetric with bandwidth b and
    LAPACK's dsbevx reduces the band in O(n^2 b) and bisects only the k wanted values: 2.1x
    less over a 15-iteration solve, 2.6x at n = 448 (same CPU, one thread).
    Precision: T^T T is formed in float64 from the blocks; an eigenvalue's absolute error is
    ~eps64 * sigma_1^2, so sigma_i's relative error is ~1e-16 (sigma_1 / sigma_i)^2, below
    1e-10 for every value the convergence test resolves (>= RELATIVE_FLOOR * sigma_1), and
    below the fp32 svdvals this replaces.
    Column block j of T holds S_{j-1}^T (row block j-1) and R_j (row block j), so
    (T^T T)_{jj} = R_j^T R_j + S_{j-1} S_{j-1}^T and (T^T T)_{j,j+1} = R_j^T S_j^T.
    """
    return _per_matrix(r_blocks, s_blocks, lambda r, s: _band_top_values(r, s, k))


def top_right_vectors(
    r_blocks: list[torch.Tensor], s_blocks: list[torch.Tensor], width: int
) -> torch.Tensor:
    """The top `width` right singular vectors X of T, as eigenvectors of T^T T: (B, J*b, width)
    float64 on the CPU, columns in descending order of their values.

    For the Rayleigh-Ritz step of the bf16 path, which needs only their span (its values come
    from the true matrix and are checked against the Ritz values): LAPACK's dsbevx on the band
    of T^T T for the top `width` pairs, 18 ms at n = 448 against 25 ms for the full SVD of T
    (AMD EPYC Zen 4, one thread). Not dsyevr on the dense Gram matrix, though it took 9.5 ms:
    its tridiagonal reduction wakes scipy's OpenBLAS threads, which then spin for tens of
    milliseconds on the cores torch's next GEMMs need (the next 20 (2048 x 2048) @ (2048 x 32)
    products ran 3.4x slower; a 768 x 768 bf16 solve took 72 ms instead of 36 ms).
    """
    return _per_matrix(r_blocks, s_blocks, lambda r, s: _gram_top_vectors(r, s, width))


def _per_matrix(
    r_blocks: list[torch.Tensor],
    s_blocks: list[torch.Tensor],
    solve: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    count = len(r_blocks)
    r_all = torch.stack(r_blocks, dim=1).to("cpu", torch.float64)  # (B, J, b, b)
    s_all = (
        torch.stack(s_blocks[: count - 1], dim=1).to("cpu", torch.float64) if count > 1 else None
    )
    # One matrix per call: a batched product's blocking (hence its last bits) may depend on the
    # batch size, and a matrix's result must not depend on its batch-mates. Each call on one
    # thread: the (J, b, b) float64 products gave other last bits under 1 and 2 threads (AMD
    # EPYC Zen 4). The matrices are spread over torch's threads (lapack.per_matrix): dsbevx is
    # called without the GIL (band_eigen.py), so two solves run at once.
    return torch.stack(
        per_matrix(
            r_all,
            r_all.shape[0],
            lambda i: solve(r_all[i], None if s_all is None else s_all[i]),
        )
    )


def _gram_strips(r: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """Column strip j of the upper triangle of T^T T: rows of block j-1 (the block above the
    diagonal, lower triangular) over rows of block j (the diagonal block, of which only the
    upper triangle counts). r: (J, b, b), s: S_0..S_{J-2} (J-1, b, b) or None -> (J, 2b, b)."""
    count, block, _ = r.shape
    strips = r.new_zeros(count, 2 * block, block)
    strips[:, block:] = r.mT @ r
    if s is not None:
        strips[1:, block:] += s @ s.mT
        strips[1:, :block] = r[:-1].mT @ s.mT
    return strips


def _gram_band(r: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """T^T T in LAPACK's upper band storage, (b + 1, J*b): band[b + row - col, col] = G[row, col].
    Within strip j the band's column q is strip rows q..q+b, a constant-stride walk (b + 1)."""
    count, block, _ = r.shape
    strips = _gram_strips(r, s)
    size = (count, block + 1, block)
    stride = (2 * block * block, block, block + 1)
    return strips.as_strided(size, stride).permute(1, 0, 2).reshape(block + 1, count * block)


def _band_top_values(r: torch.Tensor, s: torch.Tensor | None, k: int) -> torch.Tensor:
    values, _ = _gram_top(r, s, min(k, r.shape[0] * r.shape[1]), vectors=False)
    return values


def _gram_top_vectors(r: torch.Tensor, s: torch.Tensor | None, width: int) -> torch.Tensor:
    _, vectors = _gram_top(r, s, width, vectors=True)
    assert vectors is not None
    return vectors


def _gram_top(
    r: torch.Tensor, s: torch.Tensor | None, count: int, vectors: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The top `count` singular values of one matrix's T (descending, float64) from dsbevx on
    the band of T^T T, and with `vectors` its top right singular vectors ((J*b, count))."""
    try:
        eigen, right = top_band_eigen(_gram_band(r, s).numpy(), count, vectors)
    except BandEigenError:
        # dsbevx did not converge (not seen in practice): the dense SVD of T answers.
        if not vectors:
            dense_values: torch.Tensor = torch.linalg.svdvals(_dense(r, s))
            return dense_values[:count], None
        _, dense_all, vh = torch.linalg.svd(_dense(r, s))
        return dense_all[:count], vh[:count].mT
    # Ascending eigenvalues of a Gram matrix; rounding may leave a zero one slightly below 0.
    values = torch.from_numpy(eigen).flip(0).clamp_min(0.0).sqrt()
    return values, None if right is None else torch.from_numpy(right).flip(-1)


def _dense(r: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """The dense (J*b, J*b) T of one matrix's blocks (the fallback of the two solvers above)."""
    s_blocks = [] if s is None else list(s[:, None])
    # block_bidiagonal reads S_j only for j + 1 < J: pad to J blocks.
    s_blocks.append(torch.zeros_like(r[:1]))
    return block_bidiagonal(list(r[:, None]), s_blocks)[0]


def remaining_error(
    older: torch.Tensor, previous: torch.Tensor, latest: torch.Tensor, noisy: bool = False
) -> torch.Tensor:
    """Estimated remaining relative error of each Ritz value: (B, k).

    Ritz values grow monotonically to the true values, roughly geometrically once the Krylov space
    has found them. With the last two increments d1, d0 and rate rho = d1/d0, the rest of the
    geometric series is d1 * rho / (1 - rho). Rho is capped at 0.95 (a 20x tail) so that a
    stalled-looking sequence is not taken as converged. Measured here on flat and spiky spectra
    (2048^2 to 11008x4096), stopping at 3e-4 / 3e-3 left true errors <= 1.5e-4 / 4.6e-3.

    noisy (bf16 products): Ritz values of a recurrence with rounded products are not monotone;
    a decrease is rounding, not convergence, so increments count by their size: the test then
    passes only once the rounding jitter itself is below the tolerance.
    """
    d1 = latest - previous
    d0 = previous - older
    if noisy:
        d1, d0 = d1.abs(), d0.abs()
    else:
        d1, d0 = d1.clamp_min(0), d0.clamp_min(0)
    rho = (d1 / d0.clamp_min(torch.finfo(latest.dtype).tiny)).clamp(0.0, 0.95)
    # Each value's error relative to itself (a bulk under large spikes must be right too), with
    # the floor of `relative_scale` for values at rounding level.
    return d1 * rho / (1 - rho) / relative_scale(latest)
