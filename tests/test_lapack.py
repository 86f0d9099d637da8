"""pss_cli/core/lapack.py: one-thread LAPACK calls spread over the thread budget, bit-identical
to the serial loop, and the thread count always restored."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from pss_cli.core import lapack
from pss_cli.core.lapack import (
    batched_qr,
    deterministic_lapack,
    exact_singular_values,
    per_matrix,
)


@pytest.fixture
def two_threads() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _batch(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float32)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_per_matrix_returns_every_result_in_order(two_threads: None, count: int) -> None:
    assert per_matrix(torch.zeros(1), count, lambda i: i * i) == [i * i for i in range(count)]


def test_per_matrix_spreads_matrices_over_the_thread_budget(two_threads: None) -> None:
    seen: set[str] = set()

    def solve(index: int) -> int:
        seen.add(threading.current_thread().name)
        time.sleep(0.02)  # long enough that one thread cannot take every share
        return index

    per_matrix(torch.zeros(1), 4, solve)
    assert len(seen) == 2


def test_each_call_runs_on_one_lapack_thread(two_threads: None) -> None:
    counts = per_matrix(torch.zeros(1), 4, lambda i: torch.get_num_threads())
    assert counts == [1, 1, 1, 1]
    assert torch.get_num_threads() == 2


def test_nested_and_single_thread_callers_stay_serial(two_threads: None) -> None:
    names: list[str] = []
    with deterministic_lapack(torch.zeros(1)):
        per_matrix(torch.zeros(1), 3, lambda i: names.append(threading.current_thread().name))
    torch.set_num_threads(1)
    per_matrix(torch.zeros(1), 3, lambda i: names.append(threading.current_thread().name))
    assert set(names) == {threading.current_thread().name}


def test_a_failing_matrix_raises_after_every_share_finished(two_threads: None) -> None:
    finished: list[int] = []

    def solve(index: int) -> int:
        if index == 0:
            raise ValueError("matrix 0 failed")
        time.sleep(0.05)
        finished.append(index)
        return index

    with pytest.raises(ValueError, match="matrix 0 failed"):
        per_matrix(torch.zeros(1), 2, solve)
    # The other share completed before the thread count came back: no LAPACK call ran on
    # two threads behind the caller's back.
    assert finished == [1]
    assert torch.get_num_threads() == 2


def _serial_qr(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with deterministic_lapack(blocks):
        q, r = torch.linalg.qr(blocks)
    return q, r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_qr_is_bit_identical_to_one_thread_lapack(
    two_threads: None, dtype: torch.dtype
) -> None:
    blocks = _batch(5, 600, 32, seed=1).to(dtype)
    q, r = batched_qr(blocks)
    q_ref, r_ref = _serial_qr(blocks)
    assert torch.equal(q, q_ref) and torch.equal(r, r_ref)
    # Q's matrices stay column-major, as LAPACK returns them: the Krylov basis copies Q^T.
    assert q.stride() == q_ref.stride()
    assert q[0].mT.is_contiguous()


def test_batched_qr_of_one_block_and_a_view(two_threads: None) -> None:
    wide = _batch(2, 32, 700, seed=2)
    blocks = wide.mT  # a non-contiguous view, as the Krylov recurrence may hand over
    q, r = batched_qr(blocks)
    q_ref, r_ref = _serial_qr(blocks.contiguous())
    assert torch.equal(q, q_ref) and torch.equal(r, r_ref)
    q1, r1 = batched_qr(blocks[:1])
    assert torch.equal(q1, q_ref[:1]) and torch.equal(r1, r_ref[:1])


@pytest.mark.parametrize("shape", [(3, 300, 200), (3, 200, 300), (1, 64, 64)])
def test_exact_singular_values_are_bit_identical_to_one_thread_lapack(
    two_threads: None, shape: tuple[int, int, int]
) -> None:
    matrices = _batch(*shape, seed=3)
    values = exact_singular_values(matrices)
    tall = matrices if shape[1] >= shape[2] else matrices.mT
    with deterministic_lapack(tall):
        reference = torch.linalg.svdvals(tall)
    assert torch.equal(values, reference)
    exact = torch.linalg.svdvals(matrices.double())
    assert torch.allclose(values.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.max()))


def test_the_threads_are_shared_across_calls(two_threads: None) -> None:
    per_matrix(torch.zeros(1), 2, lambda i: i)
    pool = lapack._POOL
    per_matrix(torch.zeros(1), 2, lambda i: i)
    assert pool is not None and lapack._POOL is pool


def test_a_forked_child_gets_threads_of_its_own(two_threads: None) -> None:
    # The pool object survives fork() but its threads do not: a child's first per-matrix call
    # waited forever (a library user's fork-based multiprocessing pool calling api.scan).
    import multiprocessing

    matrices = _batch(3, 40, 30, seed=4)
    expected = exact_singular_values(matrices)  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as children:
        result = children.apply_async(exact_singular_values, (matrices,))
        assert torch.equal(result.get(timeout=60), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_threads_or_batch_mates(dtype: torch.dtype) -> None:
    # 258 x 33 float32 (257 x 33 float64): matrix 1 of a batch starts at a byte offset that is
    # not a multiple of 16, where a batched MKL call rounded other last bits. One call per
    # matrix on any thread count gives each matrix the same bits, alone or in a batch.
    shape = (4, 258, 33) if dtype == torch.float32 else (4, 257, 33)
    matrices = _batch(*shape, seed=5).to(dtype)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = exact_singular_values(matrices)
        q1, r1 = batched_qr(matrices)
        torch.set_num_threads(2)
        two_threads = exact_singular_values(matrices)
        q2, r2 = batched_qr(matrices)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one_thread, two_threads)
    assert torch.equal(q1, q2) and torch.equal(r1, r2)
    for i in range(shape[0]):
        assert torch.equal(exact_singular_values(matrices[i : i + 1])[0], one_thread[i])


def test_threads_in_lapack_sections_at_once_keep_their_own_counts() -> None:
    # The scan's two solvers (pss_cli/pipeline/solve.py) enter and leave LAPACK sections at
    # once, each on its own thread count. One saved count shared between threads left the
    # thread that entered first at one thread for good, and the second one's LAPACK on two.
    entered = threading.Barrier(2)
    seen: dict[str, tuple[int, int]] = {}

    def worker(name: str, threads: int, leave_first: bool) -> None:
        torch.get_num_threads()  # torch's lazy per-thread set-up first, or it undoes the next
        torch.set_num_threads(threads)
        with deterministic_lapack(torch.zeros(1)):
            entered.wait()
            inside = torch.get_num_threads()
            if not leave_first:
                time.sleep(0.05)
        seen[name] = (inside, torch.get_num_threads())

    runners = [
        threading.Thread(target=worker, args=("first", 3, True)),
        threading.Thread(target=worker, args=("last", 2, False)),
    ]
    saved = torch.get_num_threads()
    try:
        for runner in runners:
            runner.start()
        for runner in runners:
            runner.join()
    finally:
        torch.set_num_threads(saved)
    assert seen == {"first": (1, 3), "last": (1, 2)}
