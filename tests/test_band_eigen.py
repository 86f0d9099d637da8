"""pss_cli/core/band_eigen.py: dsbevx through scipy's Cython LAPACK pointers, without the GIL,
bit-identical to scipy.linalg.eig_banded."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from scipy.linalg import eig_banded

from pss_cli.core import band_eigen
from pss_cli.core.band_eigen import BandEigenError, top_band_eigen


def _band(n: int, kd: int, seed: int, rank: int | None = None) -> np.ndarray:
    """Upper band storage (kd + 1, n) of the banded part of a random Gram matrix."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rank or n, n))
    gram = a.T @ a
    band = np.zeros((kd + 1, n))
    for column in range(n):
        for row in range(max(0, column - kd), column + 1):
            band[kd + row - column, column] = gram[row, column]
    return band


CASES = [(1, 0, 1), (40, 32, 16), (200, 32, 16), (200, 8, 200), (300, 32, 32)]


@pytest.mark.parametrize(("n", "kd", "count"), CASES)
def test_values_are_bit_identical_to_eig_banded(n: int, kd: int, count: int) -> None:
    band = _band(n, kd, seed=n + kd)
    expected = eig_banded(
        band, lower=False, eigvals_only=True, select="i", select_range=(n - count, n - 1)
    )
    values, vectors = top_band_eigen(band, count, vectors=False)
    assert vectors is None
    assert values.dtype == np.float64 and values.shape == (count,)
    assert np.array_equal(values, expected)


@pytest.mark.parametrize(("n", "kd", "count"), CASES)
def test_vectors_are_bit_identical_to_eig_banded(n: int, kd: int, count: int) -> None:
    band = _band(n, kd, seed=7 * n + kd)
    expected_values, expected_vectors = eig_banded(
        band, lower=False, select="i", select_range=(n - count, n - 1)
    )
    values, vectors = top_band_eigen(band, count, vectors=True)
    assert vectors is not None and vectors.shape == (n, count)
    assert np.array_equal(values, expected_values)
    assert np.array_equal(vectors, expected_vectors)


def test_rank_deficient_band_matches_eig_banded() -> None:
    # A Gram matrix of rank 5: most eigenvalues are rounding-level zeros.
    band = _band(120, 32, seed=3, rank=5)
    expected = eig_banded(
        band, lower=False, eigvals_only=True, select="i", select_range=(120 - 16, 119)
    )
    values, _ = top_band_eigen(band, 16, vectors=False)
    assert np.array_equal(values, expected)


def test_the_input_band_is_left_alone() -> None:
    band = _band(64, 32, seed=1)
    before = band.copy()
    top_band_eigen(band, 8, vectors=True)
    assert np.array_equal(band, before)


def test_a_count_outside_the_matrix_is_refused() -> None:
    with pytest.raises(ValueError, match="count"):
        top_band_eigen(_band(10, 2, seed=0), 11, vectors=False)


def test_without_the_cython_pointer_scipy_answers_the_same(monkeypatch) -> None:
    band = _band(100, 32, seed=9)
    expected = top_band_eigen(band, 16, vectors=True)
    monkeypatch.setattr(band_eigen, "_dsbevx", lambda: None)
    values, vectors = top_band_eigen(band, 16, vectors=True)
    assert vectors is not None and expected[1] is not None
    assert np.array_equal(values, expected[0]) and np.array_equal(vectors, expected[1])


def test_scipy_non_convergence_becomes_band_eigen_error(monkeypatch) -> None:
    import scipy.linalg

    def fail(*args: object, **kwargs: object) -> None:
        raise scipy.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(band_eigen, "_dsbevx", lambda: None)
    monkeypatch.setattr(scipy.linalg, "eig_banded", fail)
    with pytest.raises(BandEigenError, match="did not converge"):
        top_band_eigen(_band(20, 4, seed=0), 4, vectors=False)


def test_lapack_non_convergence_becomes_band_eigen_error(monkeypatch) -> None:
    def routine(*args: object) -> None:
        import ctypes

        # dsbevx's last argument is INFO: > 0 means eigenvectors failed to converge.
        info = ctypes.cast(args[-1], ctypes.POINTER(ctypes.c_int))  # type: ignore[call-overload]
        info[0] = 2

    monkeypatch.setattr(band_eigen, "_dsbevx", lambda: routine)
    with pytest.raises(BandEigenError, match="2 eigenvectors"):
        top_band_eigen(_band(20, 4, seed=0), 4, vectors=True)


def test_the_call_releases_the_gil() -> None:
    # While one thread is inside dsbevx, another keeps running Python. Measured as a rate, not
    # a longest pause (one OS descheduling on a loaded machine made that flaky): the main
    # thread's loop rate while the solves run, over its rate alone. With the GIL held for the
    # whole call (scipy's f2py wrapper, or a PYFUNCTYPE prototype) it runs only between calls:
    # a ratio near 0; with the GIL released, near 1 (0.5 on a saturated machine).
    band = _band(900, 32, seed=2)

    def loop_rate(until: threading.Event | None, seconds: float) -> float:
        count, start = 0, time.perf_counter()
        while (until is None or not until.is_set()) and (
            until is not None or time.perf_counter() - start < seconds
        ):
            count += 1
        return count / (time.perf_counter() - start)

    alone = loop_rate(None, 0.1)
    done = threading.Event()

    def solve() -> None:
        for _ in range(4):
            top_band_eigen(band, 16, vectors=False)
        done.set()

    # A short switch interval: a thread holding the GIL between calls hands it over at once,
    # so the main thread's share then is the worker's Python time alone (tiny), not 5 ms
    # slices that would let it run a quarter of the time.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        worker = threading.Thread(target=solve)
        worker.start()
        during = loop_rate(done, 0.0)
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert during / alone > 0.25, (during, alone)


def test_only_dsbevx_s_exact_signature_is_called() -> None:
    # The pointer is called only when the capsule's C signature is dsbevx's LP64 one; anything
    # else (an ILP64 build's long *, another routine) leaves scipy's wrapper to answer.
    double = "__pyx_t_5scipy_6linalg_13cython_lapack_d *"
    kinds = {"c": "char *", "i": "int *", "d": double}
    good = "void (" + ", ".join(kinds[k] for k in band_eigen._DSBEVX_KINDS) + ")"
    assert band_eigen._kinds(good.encode()) == band_eigen._DSBEVX_KINDS
    assert band_eigen._kinds(good.replace("int *", "long *", 1).encode()) is None
    assert band_eigen._kinds(b"int (char *)") is None
    assert band_eigen._kinds(good.replace(", char *", ", int *", 1).encode()) != (
        band_eigen._DSBEVX_KINDS
    )
    assert band_eigen._dsbevx() is not None  # this scipy publishes it


def test_concurrent_calls_give_the_serial_results() -> None:
    # Four threads at once inside LAPACK (the GIL released): every result still bit-identical.
    from concurrent.futures import ThreadPoolExecutor

    bands = [_band(n, 32, seed=n) for n in (64, 160, 256)]
    serial = [top_band_eigen(band, 32, vectors=True) for band in bands]

    def solve(index: int) -> bool:
        values, vectors = top_band_eigen(bands[index % 3], 32, vectors=True)
        expected_values, expected_vectors = serial[index % 3]
        assert vectors is not None and expected_vectors is not None
        return np.array_equal(values, expected_values) and np.array_equal(vectors, expected_vectors)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(solve, range(24)))
