"""LAPACK factorisations made reproducible, and the exact path (a full SVD) of the solvers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

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


def exact_singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """(B, m, n) -> (B, min(m, n)) all singular values, descending, in the input dtype.

    LAPACK was 2.5-3.5x slower on a wide matrix than on its transpose here: use the tall side.
    """
    tall = matrices if matrices.shape[-2] >= matrices.shape[-1] else matrices.mT
    with deterministic_lapack(tall):
        values: torch.Tensor = torch.linalg.svdvals(tall)
    return values
