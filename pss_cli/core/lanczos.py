"""The block Golub-Kahan-Lanczos iteration behind pss_cli/core/spectra.py (the method and its
reasons are in that module's docstring), with its full-SVD fallback."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from pss_cli.core.krylov_basis import (
    Basis,
    block_bidiagonal,
    remaining_error,
    reorthogonalise,
    ritz_values,
    top_right_vectors,
)
from pss_cli.core.krylov_settings import (
    MIN_ITERATIONS,
    BatchSpectrum,
    KrylovSettings,
    iteration_budget,
)
from pss_cli.core.lapack import batched_qr, deterministic_lapack, exact_singular_values
from pss_cli.core.mixed_precision import Products, rayleigh_ritz


def block_lanczos(
    tall: torch.Tensor,
    k: int,
    start: torch.Tensor,
    settings: KrylovSettings,
    vectors: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> BatchSpectrum:
    """Block Golub-Kahan-Lanczos bidiagonalisation with full re-orthogonalisation (CGS2) of both
    Krylov bases, or of the right one alone with bf16 products (see the comment on `u_basis`).

    tall: (B, m, n) with m >= n. start: (B, n, b).
    Recurrence: A V_j = U_{j-1} S_{j-1}^T + U_j R_j and A^T U_j = V_j R_j^T + V_{j+1} S_j, so
    U^T A V is block upper-bidiagonal T (R_j on the diagonal, S_j^T above it); the singular values
    of T are the Ritz values, lower bounds that increase towards the true ones.
    With `vectors` given, it is filled with the Ritz vectors (left (m, k), right (n, k)) of each
    matrix, U Y_k and V X_k from T = Y diag(s) X^T.
    """
    batch, _, n = tall.shape
    block = start.shape[-1]
    max_iterations = iteration_budget(n, replace(settings, block_size=block))
    # Triplets for smoothing keep compute-dtype products: `pss smooth` edits along the vectors.
    # A bf16 batch (a BF16 checkpoint loaded as stored) without bf16 products is the retry below:
    # its compute-dtype products convert the matrix a slab at a time (mixed_precision.Products).
    low = settings.bf16_products and vectors is None
    if tall.dtype == torch.bfloat16 and vectors is not None:
        raise ValueError("singular vectors need a float32/float64 matrix, not bfloat16")
    retry: list[int] = []  # bf16 could not vouch for these: solved again with fp32 products

    active = torch.arange(batch, device=tall.device)
    ops = Products(tall, low)
    v_first, _ = batched_qr(start)
    v_last = v_first  # (B, n, b) the newest right block V_{j+1}
    u_last: torch.Tensor | None = None  # (B, m, b) the newest left block U_j
    # The Krylov vectors are in the compute dtype: the start block's (top_singular_values).
    # With bf16 products only V is re-orthogonalised (one-sided, Simon & Zha 2000): the
    # reported values are the compute-dtype Rayleigh-Ritz values of A on V's Ritz vectors
    # (mixed_precision.rayleigh_ritz), which need V orthonormal and nothing of U, and they are
    # checked against the Ritz values of T, so a T spoilt by U's drift is solved again with
    # compute-dtype products rather than reported. Measured on 25 matrices (Marchenko-Pastur
    # bulks with and without spikes, heavy-tailed, power-law, clustered, linear and the Llama
    # block's seven), 2 seeds, F32 and BF16 storage: the same iterations and the same errors
    # as two-sided; U's re-orthogonalisation was 0.24 s of a 3.4 s Llama-block scan (AMD EPYC
    # Zen 4, 2 threads). Without a Rayleigh-Ritz check (compute-dtype products, and singular
    # vectors) both sides stay re-orthogonalised.
    u_basis = None if low else Basis(batch, tall.shape[1], max_iterations * block, start)
    v_basis = Basis(batch, n, (max_iterations + 1) * block, start)
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
            # minus the recurrence term U_{j-1} S_{j-1}^T, fused into one GEMM
            w = torch.baddbmm(w, u_last, s_blocks[-1].mT, alpha=-1.0)
        if u_basis is not None:
            w = reorthogonalise(w, u_basis.view())
        u, r = batched_qr(w)
        if u_basis is not None:
            u_basis.append(u)
        r_blocks.append(r)
        z = torch.baddbmm(ops.adjoint(u), v_last, r.mT, alpha=-1.0)  # minus V_j R_j^T
        z = reorthogonalise(z, v_basis.view())
        v_last, s = batched_qr(z)
        u_last = u
        v_basis.append(v_last)
        s_blocks.append(s)

        if len(r_blocks) * block < k:
            continue
        history.append(ritz_values(r_blocks, s_blocks, k))
        if iteration < MIN_ITERATIONS or len(history) < 3:
            continue
        remaining = remaining_error(history[-3], history[-2], history[-1], noisy=low)
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
            width = min(len(r_blocks) * block, block * math.ceil(k / block))
            refined, agrees = rayleigh_ritz(
                ops,
                chosen.tolist(),
                v_basis.columns(len(r_blocks) * block)[chosen],
                top_right_vectors(
                    [x[chosen] for x in r_blocks], [x[chosen] for x in s_blocks], width
                ),
                history[-1][chosen],
                k,
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
        else:
            if vectors is not None:
                bidiagonal = block_bidiagonal(r_blocks, s_blocks)
                with deterministic_lapack(bidiagonal):
                    y, _, xh = torch.linalg.svd(bidiagonal)
                assert u_basis is not None  # vectors are never asked of the bf16 path
                u_all = u_basis.columns(u_basis.used)
                v_all = v_basis.columns(u_basis.used)  # V_1..V_J, without V_{J+1}
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
                    values[global_index] = exact_top(ops.matrix(local), k, vectors, global_index)
                    exact[global_index] = True
                break
        keep = torch.nonzero(~done).flatten()
        if keep.numel() == 0:
            break
        # Drop converged matrices from every piece of Krylov state, so that a spiky matrix that
        # converged in 3 iterations does not pay for a flat one that needs 15.
        active = active[keep]
        ops.select(keep)
        if u_basis is not None:
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
            values[global_index] = exact_top(ops.matrix(local), k, vectors, global_index)
            exact[global_index] = True
            iterations[global_index] = max_iterations
    if retry:
        # bf16 did not converge, or its Ritz values and the fp32 Rayleigh-Ritz ones disagreed
        # beyond the tolerance: the same start, compute-dtype products (which themselves fall
        # back to a full SVD when needed). Never a value the test could not vouch for.
        # This run's Krylov state goes first: the memory plan counts one set of bases
        # (pipeline/memory.py: batch_peak_bytes), and this frame kept its right basis alive
        # through the retry (21 MB for a 4096-wide matrix, beyond the planned peak).
        del ops, u_basis, v_basis, v_first, v_last, u_last, r_blocks, s_blocks, history
        chosen = torch.tensor(sorted(retry), device=tall.device)
        # The batch itself when every matrix is retried (no copy); a bf16 batch stays bf16.
        again_tall = tall if len(retry) == batch else tall[chosen]
        again = block_lanczos(again_tall, k, start[chosen], replace(settings, bf16_products=False))
        for row, global_index in enumerate(chosen.tolist()):
            values[global_index] = again.values[row]
            iterations[global_index] += again.iterations[row]
            exact[global_index] = again.exact[row]
    return BatchSpectrum(values=values, iterations=tuple(iterations), exact=tuple(exact))


def exact_top(
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
