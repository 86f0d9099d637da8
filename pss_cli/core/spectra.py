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
re-orthogonalisation, the QR factorisations and the projected bidiagonal problem stay in the
compute dtype (fp32/fp64). The reported values then come from a final Rayleigh-Ritz step with the
compute-dtype matrix: the singular values of A V_k, V_k the top Ritz vectors, are Ritz values of
the true A (lower bounds of the true values), so bf16 rounding can bias the subspace but never
inflate a reported value. The convergence test is made precision-aware: bf16 rounding makes the
Ritz values jitter, and a jitter that reads as a negative increment must not pass for
convergence (see `_remaining_error`); if the bf16 Ritz values and the fp32 Rayleigh-Ritz values
disagree by more than the tolerance, the matrix is solved again with compute-dtype products.
Where a CPU has no bf16 kernel (AVX2-only: 50-300x slower than fp32) `auto` keeps fp32.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

# Block width of the Krylov blocks. Products of width < 32 ran far below peak here (width 8: 4x
# slower per flop than width 32 on 4096x4096), while width 32 reached ~75 % of the fp32 GEMM peak.
DEFAULT_BLOCK_SIZE = 32
# Convergence tolerances on the *estimated remaining* relative error of the Ritz values (see
# `_remaining_error`). The product goal is 1e-3 on sigma_max and 1e-2 on each top-16 value; these
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


_LAPACK_LOCK = threading.Lock()
_lapack_users = 0
_saved_threads = 0


@contextlib.contextmanager
def deterministic_lapack(like: torch.Tensor) -> Iterator[None]:
    """Run the LAPACK factorisations (QR, SVD) inside on one CPU thread.

    Why: MKL's threaded geqrf/gesdd round differently with each thread count (measured: QR of a
    600 x 32 block and svdvals of a 512 x 2048 matrix give other last bits under
    OMP_NUM_THREADS=1 and 2), so the same scan printed other digits on another machine.
    GEMMs, the bulk of the Krylov work, are thread-count invariant and keep every thread; the
    factorisations are of (m, 32) blocks and small bidiagonals, or whole matrices with a short
    side <= 512. On a loaded 2-core CPU one thread was also 3-30x faster for them (MKL's
    threads oversubscribe). Nested and concurrent users share one saved thread count.
    CUDA tensors are left alone (the CPU thread count does not touch them).
    """
    global _lapack_users, _saved_threads
    if like.device.type != "cpu":
        yield
        return
    with _LAPACK_LOCK:
        if _lapack_users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _lapack_users += 1
    try:
        yield
    finally:
        with _LAPACK_LOCK:
            _lapack_users -= 1
            if _lapack_users == 0:
                torch.set_num_threads(_saved_threads)


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


def exact_singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """(B, m, n) -> (B, min(m, n)) all singular values, descending, in the input dtype.

    LAPACK was 2.5-3.5x slower on a wide matrix than on its transpose here: use the tall side.
    """
    tall = matrices if matrices.shape[-2] >= matrices.shape[-1] else matrices.mT
    with deterministic_lapack(tall):
        values: torch.Tensor = torch.linalg.svdvals(tall)
    return values


def top_singular_values(
    matrices: torch.Tensor,
    k: int,
    start: torch.Tensor | None,
    settings: KrylovSettings = KrylovSettings(),
) -> BatchSpectrum:
    """Top-k singular values of each matrix of a batch.

    matrices: (B, m, n) finite values, float32 or float64, on the compute device.
    start: (B, min(m, n), block_size) Gaussian start blocks (see `gaussian_start`); may be None
        only when the exact path is certain to be taken (`uses_exact_path`).
    """
    batch, m, n = matrices.shape
    k = min(k, m, n)
    if uses_exact_path(m, n, k, settings):
        values = exact_singular_values(matrices)[:, :k]
        return BatchSpectrum(
            values=values.detach().to("cpu", torch.float64),
            iterations=(0,) * batch,
            exact=(True,) * batch,
        )
    if start is None:
        raise ValueError("the Krylov path needs start blocks")
    # Work on the tall orientation: the Krylov vectors of the short side are cheaper to keep.
    tall = matrices if m >= n else matrices.mT
    result = _block_lanczos(
        tall, k, start.to(device=matrices.device, dtype=matrices.dtype), settings
    )
    return result


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


def _block_lanczos(
    tall: torch.Tensor,
    k: int,
    start: torch.Tensor,
    settings: KrylovSettings,
    vectors: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> BatchSpectrum:
    """Block Golub-Kahan-Lanczos bidiagonalisation with full re-orthogonalisation (CGS2).

    tall: (B, m, n) with m >= n. start: (B, n, b).
    Recurrence: A V_j = U_{j-1} S_{j-1}^T + U_j R_j and A^T U_j = V_j R_j^T + V_{j+1} S_j, so
    U^T A V is block upper-bidiagonal T (R_j on the diagonal, S_j^T above it); the singular values
    of T are the Ritz values, lower bounds that increase towards the true ones.
    With `vectors` given, it is filled with the Ritz vectors (left (m, k), right (n, k)) of each
    matrix, U Y_k and V X_k from T = Y diag(s) X^T.
    """
    batch, _, n = tall.shape
    block = start.shape[-1]
    max_iterations = _iteration_budget(n, replace(settings, block_size=block))
    # Triplets for smoothing keep compute-dtype products: `pss smooth` edits along the vectors.
    low = settings.bf16_products and vectors is None
    retry: list[int] = []  # bf16 could not vouch for these: solved again with fp32 products

    active = torch.arange(batch, device=tall.device)
    a = tall
    ops = _Products(a, low)
    with deterministic_lapack(start):
        v_first = torch.linalg.qr(start).Q
    v_last = v_first  # (B, n, b) the newest right block V_{j+1}
    u_last: torch.Tensor | None = None  # (B, m, b) the newest left block U_j
    u_basis = _Basis(batch, tall.shape[1], max_iterations * block, tall)
    v_basis = _Basis(batch, n, (max_iterations + 1) * block, tall)
    v_basis.append(v_first)
    r_blocks: list[torch.Tensor] = []
    s_blocks: list[torch.Tensor] = []
    history: list[torch.Tensor] = []  # (B_active, k) Ritz values per iteration

    values = torch.zeros(batch, k, dtype=torch.float64)
    iterations = [0] * batch
    exact = [False] * batch

    for iteration in range(1, max_iterations + 1):
        w = ops.forward(v_last)
        if u_last is not None:
            w = w - u_last @ s_blocks[-1].mT  # the recurrence term U_{j-1} S_{j-1}^T
        w = _reorthogonalise(w, u_basis.view())
        with deterministic_lapack(w):
            u, r = torch.linalg.qr(w)
        u_basis.append(u)
        r_blocks.append(r)
        z = ops.adjoint(u) - v_last @ r.mT  # minus the recurrence term V_j R_j^T
        z = _reorthogonalise(z, v_basis.view())
        with deterministic_lapack(z):
            v_last, s = torch.linalg.qr(z)
        u_last = u
        v_basis.append(v_last)
        s_blocks.append(s)

        bidiagonal = _block_bidiagonal(r_blocks, s_blocks)
        with deterministic_lapack(bidiagonal):
            ritz = torch.linalg.svdvals(bidiagonal)
        if ritz.shape[-1] < k:
            continue
        history.append(ritz[:, :k])
        if iteration < MIN_ITERATIONS or len(history) < 3:
            continue
        remaining = _remaining_error(history[-3], history[-2], history[-1], noisy=low)
        converged = (remaining[:, 0] <= settings.tol_sigma_max) & (
            remaining.amax(dim=1) <= settings.tol_top_k
        )
        done = torch.ones_like(converged) if iteration == max_iterations else converged
        if not bool(done.any()):
            continue
        done_cpu = done.cpu()
        if low:
            # Reported values: the fp32 Rayleigh-Ritz of the true matrix (module docstring).
            chosen = torch.nonzero(done).flatten()
            refined, agrees = _rayleigh_ritz(
                a[chosen],
                v_basis.buffer[chosen, :, : u_basis.used],
                bidiagonal[chosen],
                history[-1][chosen],
                k,
                block,
                settings,
            )
            accepted = converged.clone()
            accepted[chosen] &= agrees
            for row, local in enumerate(chosen.tolist()):
                global_index = int(active[local])
                iterations[global_index] = iteration
                if bool(accepted[local]):
                    values[global_index] = refined[row].to("cpu", torch.float64)
                else:
                    retry.append(global_index)
            if iteration == max_iterations:
                break
            keep = torch.nonzero(~done).flatten()
            if keep.numel() == 0:
                break
            active = active[keep]
            a = a[keep]
            ops.select(keep)
            u_basis.select(keep)
            v_basis.select(keep)
            v_last = v_last[keep]
            u_last = u_last[keep]
            r_blocks = [x[keep] for x in r_blocks]
            s_blocks = [x[keep] for x in s_blocks]
            history = [x[keep] for x in history]
            continue
        if vectors is not None:
            with deterministic_lapack(bidiagonal):
                y, _, xh = torch.linalg.svd(bidiagonal)
            u_all = u_basis.buffer[:, :, : u_basis.used]
            v_all = v_basis.buffer[:, :, : u_basis.used]  # V_1..V_J, without V_{J+1}
        for local in torch.nonzero(done_cpu).flatten().tolist():
            global_index = int(active[local])
            values[global_index] = history[-1][local].to("cpu", torch.float64)
            iterations[global_index] = iteration
            if vectors is not None:
                vectors[global_index] = (
                    u_all[local] @ y[local, :, :k],
                    v_all[local] @ xh[local, :k].mT,
                )
        if iteration == max_iterations:
            # Not converged within the budget: pay for the full SVD rather than report a value
            # that may be off (the flat-bulk trap of docs/DESIGN.md).
            not_converged = ~(
                (remaining[:, 0] <= settings.tol_sigma_max)
                & (remaining.amax(dim=1) <= settings.tol_top_k)
            )
            for local in torch.nonzero(not_converged.cpu()).flatten().tolist():
                global_index = int(active[local])
                values[global_index] = _exact_top(a[local], k, vectors, global_index)
                exact[global_index] = True
            break
        keep = torch.nonzero(~done).flatten()
        if keep.numel() == 0:
            break
        # Drop converged matrices from every piece of Krylov state, so that a spiky matrix that
        # converged in 3 iterations does not pay for a flat one that needs 15.
        active = active[keep]
        a = a[keep]
        ops.select(keep)
        u_basis.select(keep)
        v_basis.select(keep)
        v_last = v_last[keep]
        u_last = u_last[keep]
        r_blocks = [x[keep] for x in r_blocks]
        s_blocks = [x[keep] for x in s_blocks]
        history = [x[keep] for x in history]
    # Safety net: a matrix never assigned (its Krylov space never held k values) gets a full
    # SVD rather than zeros.
    for local, global_index in enumerate(active.tolist()):
        if iterations[global_index] == 0 and not exact[global_index]:
            values[global_index] = _exact_top(a[local], k, vectors, global_index)
            exact[global_index] = True
            iterations[global_index] = max_iterations
    if retry:
        # bf16 did not converge, or its Ritz values and the fp32 Rayleigh-Ritz ones disagreed
        # beyond the tolerance: the same start, compute-dtype products (which themselves fall
        # back to a full SVD when needed). Never a value the test could not vouch for.
        chosen = torch.tensor(sorted(retry), device=tall.device)
        again = _block_lanczos(
            tall[chosen], k, start[chosen], replace(settings, bf16_products=False)
        )
        for row, global_index in enumerate(chosen.tolist()):
            values[global_index] = again.values[row]
            iterations[global_index] += again.iterations[row]
            exact[global_index] = again.exact[row]
    return BatchSpectrum(values=values, iterations=tuple(iterations), exact=tuple(exact))


class _Products:
    """A V and A^T U, in the matrix's dtype or in bf16 (fp32 accumulation, bf16 result).

    The bf16 path keeps one bf16 copy of A and computes A^T U as (U^T A)^T: torch's bf16 product
    with a transposed A was 4-17x slower here (AMD EPYC Zen 4, (11008x4096)^T @ (11008x32):
    676 ms vs 40 ms for (U^T A)^T). A contiguous transposed bf16 copy would make the adjoint as
    fast as A V, but it cost about what it saves over a scan's ~13 adjoint products (machine
    shared, best of 7: 334 ms copy vs 13 x 16 ms saved at 4096x4096; 1726 ms vs 13 x 82 ms at
    11008x4096) and doubles the bf16 memory.
    A BF16 checkpoint's values arrive exactly (the buffer is scaled by a power of two, see the
    pipeline), so the bf16 copy adds no rounding of A for them.
    """

    def __init__(self, a: torch.Tensor, low: bool) -> None:
        self.a = a
        self.low: torch.Tensor | None = a.to(torch.bfloat16) if low else None

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.low is None:
            return self.a @ v
        return (self.low @ v.to(torch.bfloat16)).to(v.dtype)

    def adjoint(self, u: torch.Tensor) -> torch.Tensor:
        if self.low is None:
            return self.a.mT @ u
        return (u.to(torch.bfloat16).mT @ self.low).mT.to(u.dtype)

    def select(self, keep: torch.Tensor) -> None:
        self.a = self.a[keep]
        if self.low is not None:
            self.low = self.low[keep]


def _rayleigh_ritz(
    a: torch.Tensor,
    v_all: torch.Tensor,
    bidiagonal: torch.Tensor,
    ritz: torch.Tensor,
    k: int,
    block: int,
    settings: KrylovSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of A on the top right Ritz vectors, with compute-dtype products; and per matrix
    whether they agree with the bf16 Ritz values `ritz` within the tolerances.

    a: (D, m, n); v_all: (D, n, J*b) the right Krylov basis; bidiagonal: (D, J*b, J*b).
    The top `width` right Ritz vectors V_k = V X_k (width: k rounded up to whole blocks, so the
    one fp32 product runs at a Krylov step's width) give sigma_i(A V_k) <= sigma_i(A): Ritz
    values of the true matrix. Costs one compute-dtype product per matrix (a Krylov step of
    ~2 bf16 products costs about as much on a CPU where bf16 is 2.5x faster).
    """
    width = min(bidiagonal.shape[-1], block * math.ceil(k / block))
    with deterministic_lapack(bidiagonal):
        _, _, xh = torch.linalg.svd(bidiagonal, full_matrices=False)
    right = v_all @ xh[:, :width].mT
    with deterministic_lapack(right):
        refined = torch.linalg.svdvals(a @ right)[:, :k]
    # The bf16 values carry rounding the fp32 ones do not: a gap beyond the tolerance means the
    # bf16 recurrence's convergence test was judging noise.
    floor = refined[:, :1] * RELATIVE_FLOOR
    scale = torch.maximum(refined, floor).clamp_min(torch.finfo(refined.dtype).tiny)
    gap = (ritz - refined).abs() / scale
    agrees = (gap[:, 0] <= settings.tol_sigma_max) & (gap.amax(dim=1) <= settings.tol_top_k)
    return refined, agrees


def _exact_top(
    matrix: torch.Tensor,
    k: int,
    vectors: dict[int, tuple[torch.Tensor, torch.Tensor]] | None,
    index: int,
) -> torch.Tensor:
    """Full-SVD fallback for one (m, n) matrix: its top-k values (float64, CPU), and its top-k
    singular vectors stored in `vectors[index]` when vectors are wanted."""
    if vectors is None:
        full = exact_singular_values(matrix[None])[0]
    else:
        with deterministic_lapack(matrix):
            u, full, vh = torch.linalg.svd(matrix, full_matrices=False)
        vectors[index] = (u[:, :k], vh[:k].mT)
    return full[:k].to("cpu", torch.float64)


class _Basis:
    """Orthonormal Krylov blocks kept side by side in one preallocated (B, d, capacity) buffer,
    so that re-orthogonalisation multiplies by a view instead of concatenating every iteration
    (the concatenations took ~8 % of a GPT-2-small scan)."""

    def __init__(self, batch: int, dim: int, capacity: int, like: torch.Tensor) -> None:
        self.buffer = like.new_empty(batch, dim, capacity)
        self.used = 0

    def append(self, block: torch.Tensor) -> None:
        width = block.shape[-1]
        self.buffer[:, :, self.used : self.used + width] = block
        self.used += width

    def view(self) -> torch.Tensor | None:
        return self.buffer[:, :, : self.used] if self.used else None

    def select(self, keep: torch.Tensor) -> None:
        self.buffer = self.buffer[keep]


def _reorthogonalise(block: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Full re-orthogonalisation against every earlier block: one classical Gram-Schmidt pass,
    and a second only when the first removed a large part of the block.

    The three-term recurrence has already been subtracted, so what is left along the basis is
    rounding-level drift and one pass normally suffices; when a column lost more than half its
    norm, cancellation may have left it inexact and a second pass restores orthogonality
    ("twice is enough", Giraud et al. 2005). Full re-orthogonalisation keeps Lanczos free of
    ghost copies of converged values.
    block: (B, d, b); basis: (B, d, J*b) orthonormal columns, or None.
    """
    if basis is None:
        return block
    before = torch.linalg.vector_norm(block, dim=-2)
    block = block - basis @ (basis.mT @ block)
    after = torch.linalg.vector_norm(block, dim=-2)
    again = (after < 0.5 * before).any(dim=-1)  # (B,) per matrix
    if bool(again.any()):
        # Decided per matrix, so that a matrix's result never depends on its batch-mates.
        twice = block - basis @ (basis.mT @ block)
        block = torch.where(again[:, None, None], twice, block)
    return block


def _block_bidiagonal(r_blocks: list[torch.Tensor], s_blocks: list[torch.Tensor]) -> torch.Tensor:
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


def _remaining_error(
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
    # Each value's error relative to itself (a bulk under large spikes must be right too), but
    # never relative to less than RELATIVE_FLOOR * sigma_1: values at rounding level (rank-deficient
    # matrices) cannot be resolved relative to themselves.
    floor = latest[:, :1] * RELATIVE_FLOOR
    scale = torch.maximum(latest, floor).clamp_min(torch.finfo(latest.dtype).tiny)
    return d1 * rho / (1 - rho) / scale


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
    spectrum = _block_lanczos(
        tall, k, start.unsqueeze(0).to(device=matrix.device, dtype=matrix.dtype), settings, found
    )
    left, right = found[0]
    if transposed:
        left, right = right, left
    return Triplets(left, spectrum.values[0], right, spectrum.exact[0], spectrum.iterations[0])
