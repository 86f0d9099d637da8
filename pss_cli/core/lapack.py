"""LAPACK factorisations made reproducible, and the exact path (a full SVD) of the solvers."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")

# torch keeps OpenMP's and MKL's thread counts per OS thread (`torch.set_num_threads` sets the
# calling thread's, and the count new threads start with): each thread saves and restores its own.
_THREAD = threading.local()


@contextlib.contextmanager
def deterministic_lapack(like: torch.Tensor) -> Iterator[None]:
    """Run the LAPACK factorisations (QR, SVD) inside on one CPU thread.

    Why: MKL's threaded geqrf/gesdd round differently with each thread count (measured: QR of a
    600 x 32 block and svdvals of a 512 x 2048 matrix give other last bits under
    OMP_NUM_THREADS=1 and 2), so the same scan printed other digits on another machine.
    GEMMs, the bulk of the Krylov work, are thread-count invariant and keep every thread; the
    factorisations are of (m, 32) blocks and small bidiagonals, or whole matrices with a short
    side <= 512. On a loaded 2-core CPU one thread was also 3-30x faster for them (MKL's
    threads oversubscribe). Nesting is allowed; the count is saved and restored per thread, so
    threads using it at once (the scan's two solvers, pss_cli/pipeline/solve.py) never set or
    restore each other's. CUDA tensors are left alone (the CPU thread count does not touch them).
    """
    if like.device.type != "cpu":
        yield
        return
    depth = getattr(_THREAD, "depth", 0)
    if depth == 0:
        _THREAD.saved = torch.get_num_threads()
        set_own_threads(1)
    _THREAD.depth = depth + 1
    try:
        yield
    finally:
        _THREAD.depth -= 1
        if _THREAD.depth == 0:
            set_own_threads(_THREAD.saved)


def set_own_threads(count: int) -> None:
    """Set the calling thread's torch thread count (OpenMP's and MKL's are kept per OS thread).

    torch gives a thread its count lazily, from the count new threads take, at the thread's
    first get_num_threads or parallel kernel: the get_num_threads here comes first, or that
    set-up would undo this. Only set when it changes: `torch.set_num_threads` also sets the
    count that threads starting afterwards take (a thread the host program starts during a
    scan), so a thread already on `count` (a one-thread solver, pss_cli/pipeline/solve.py)
    never touches it.
    """
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def per_matrix(like: torch.Tensor, count: int, solve: Callable[[int], T]) -> list[T]:
    """[solve(0), ..., solve(count - 1)]: one LAPACK call per matrix of a batch, each on one
    thread (`deterministic_lapack`), the matrices spread over the threads torch may use.

    Why: one LAPACK thread keeps results reproducible, but a batched call then runs its
    matrices one after another on one core while the others idle. Each matrix's call is the
    same single-threaded call whichever thread makes it (each pool thread sets its own count to
    one, and LAPACK and scipy release the GIL), so the results are bit-identical to the serial
    loop (tests/test_lapack.py).
    Nested inside `deterministic_lapack` (one thread already) or on a GPU, the loop is serial.
    """
    # torch's CPU thread budget, read before `deterministic_lapack` sets it to 1.
    workers = min(count, torch.get_num_threads()) if like.device.type == "cpu" else 1
    with deterministic_lapack(like):
        if workers <= 1:
            return [solve(i) for i in range(count)]
        # One task per worker, matrices dealt round-robin (a batch's matrices share a shape and
        # cost about the same): never more threads at work than torch's budget.
        shares = [range(first, count, workers) for first in range(workers)]
        futures = [_pool().submit(_solve_share, solve, share) for share in shares]
        # Every share finishes before the thread count is restored, even when one fails.
        wait(futures)
        results: list[T | None] = [None] * count
        for share, future in zip(shares, futures, strict=True):
            for index, value in zip(share, future.result(), strict=True):
                results[index] = value
    return results  # type: ignore[return-value]  # every index was filled above


def _solve_share(solve: Callable[[int], T], share: range) -> list[T]:
    # torch keeps MKL's and OpenMP's thread counts per OS thread and hands a new thread the
    # global count only when one of its own parallel kernels starts, never before a LAPACK call:
    # a pool thread's first QR ran MKL on every core (other last bits than one thread, for a
    # float32 600 x 32 block). Setting it here, inside `deterministic_lapack`, sets 1 again.
    set_own_threads(1)
    return [solve(index) for index in share]


def _forget_pool_in_child() -> None:
    # A forked child inherits the pool object but none of its threads: a task submitted there
    # waited forever (a library user's fork-based multiprocessing pool calling api.scan).
    # The lock too: another thread may have held it at the fork, and it never releases it in
    # the child.
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _pool() -> ThreadPoolExecutor:
    """The threads of `per_matrix`, created on first use and kept (starting two threads per
    call cost ~0.1 ms, and a scan makes hundreds of calls)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(min(32, os.cpu_count() or 1), "pss-lapack")
        return _POOL


def batched_qr(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR of a (B, m, b) batch, one matrix per `per_matrix` call: (Q, R), Q's matrices
    column-major as torch.linalg.qr returns them (krylov_basis.Basis copies Q^T contiguously)."""
    if blocks.device.type != "cpu":
        q, r = torch.linalg.qr(blocks)  # one batched call on a GPU
        return q, r
    # On the CPU always one call per matrix, even on one thread: a batched call hands LAPACK
    # matrix i at byte offset i*m*n*itemsize, and MKL rounded other last bits where that offset
    # is not a multiple of 16 (float32 with m*n = 2 mod 4), so the result depended on the
    # thread count and on the batch's other matrices. torch copies each single matrix into a
    # fresh, aligned buffer.
    parts = per_matrix(blocks, blocks.shape[0], lambda i: torch.linalg.qr(blocks[i]))
    return torch.stack([part.Q.mT for part in parts]).mT, torch.stack([part.R for part in parts])


def exact_singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """(B, m, n) -> (B, min(m, n)) all singular values, descending, in the input dtype.

    LAPACK was 2.5-3.5x slower on a wide matrix than on its transpose here: use the tall side.
    """
    tall = matrices if matrices.shape[-2] >= matrices.shape[-1] else matrices.mT
    if tall.device.type != "cpu":
        values: torch.Tensor = torch.linalg.svdvals(tall)
        return values
    # One call per matrix on the CPU, whatever the thread count (see `batched_qr`).
    return torch.stack(per_matrix(tall, tall.shape[0], lambda i: torch.linalg.svdvals(tall[i])))
