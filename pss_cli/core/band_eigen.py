"""The top eigenpairs of a symmetric band matrix from LAPACK's dsbevx, called without the GIL.

Why not scipy.linalg.eig_banded: its f2py wrapper holds Python's GIL for the whole LAPACK call,
so two threads never ran two of these solves at once (32 calls at n = 256: 82-104 ms serial,
91-103 ms on two threads; AMD EPYC Zen 4). The Ritz values of a batch's matrices then ran one
after another on one core while the other idled: 0.37 s of a 2.95 s Llama-block scan.
scipy publishes the same LAPACK's routines as C function pointers for Cython
(`scipy.linalg.cython_lapack.__pyx_capi__`, a documented, stable interface); called through
ctypes, which releases the GIL for a foreign call, two solves run side by side (8 solves at
n = 480: 56.5 ms serial, 29.1 ms on two threads) and give bit-identical results to
eig_banded: the same routine of the same library with the same arguments
(tests/test_band_eigen.py).

Where scipy does not publish the pointer, eig_banded answers (same results, GIL held).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

# dsbevx's absolute eigenvalue tolerance as scipy's eig_banded sets it: 2 * dlamch('S'), which
# is 2 * the smallest normal float64 (dlamch returns it where 1/huge is smaller, as in IEEE
# double). A different value would give other last bits than eig_banded.
_ABSTOL = 2.0 * float(np.finfo(np.float64).tiny)

# dsbevx's parameters, all pointers (Fortran calling convention): c char, i 32-bit int, d double.
# JOBZ RANGE UPLO N KD AB LDAB Q LDQ VL VU IL IU ABSTOL M W Z LDZ WORK IWORK IFAIL INFO.
_DSBEVX_KINDS = "cccii" + "didi" + "ddii" + "didd" + "idiii"
_ARGUMENTS = len(_DSBEVX_KINDS)
_routine: Callable[..., None] | None = None
_resolved = False
_lock = threading.Lock()


class BandEigenError(ArithmeticError):
    """dsbevx failed to converge (info > 0); the caller falls back to a dense method."""


def top_band_eigen(
    band: np.ndarray[Any, np.dtype[np.float64]], count: int, vectors: bool
) -> tuple[np.ndarray[Any, np.dtype[np.float64]], np.ndarray[Any, np.dtype[np.float64]] | None]:
    """The top `count` eigenvalues (ascending, float64) of the symmetric band matrix given in
    LAPACK's upper band storage (kd + 1, n), and with `vectors` their eigenvectors (n, count).

    Raises BandEigenError where LAPACK reports non-convergence.
    """
    routine = _dsbevx()
    if routine is None:
        return _with_scipy(band, count, vectors)
    rows, n = band.shape
    if not 1 <= count <= n:
        raise ValueError(f"count {count} outside 1..{n}")
    # A column-major copy: LAPACK reads Fortran order and overwrites AB with the reduction.
    ab = np.array(band, dtype=np.float64, order="F")
    c_int, c_double = ctypes.c_int, ctypes.c_double
    size, width = c_int(n), c_int(rows)
    # With vectors, dsbevx keeps the band's orthogonal reduction Q (n, n) and writes the
    # eigenvectors to Z (n, count); without, both are unreferenced (leading dimension 1).
    lead = c_int(n if vectors else 1)
    q = np.zeros((n, n) if vectors else 1, dtype=np.float64, order="F")
    z = np.zeros((n, count) if vectors else 1, dtype=np.float64, order="F")
    w = np.zeros(n, dtype=np.float64)
    work = np.zeros(7 * n, dtype=np.float64)
    iwork = np.zeros(5 * n, dtype=np.intc)
    ifail = np.zeros(n, dtype=np.intc)
    found, info = c_int(0), c_int(0)
    ref = ctypes.byref
    routine(
        ref(ctypes.c_char(b"V" if vectors else b"N")),  # JOBZ
        ref(ctypes.c_char(b"I")),  # RANGE: the IL-th to IU-th smallest
        ref(ctypes.c_char(b"U")),  # UPLO: upper band storage
        ref(size), ref(c_int(rows - 1)), ab.ctypes.data, ref(width),  # N, KD, AB, LDAB
        q.ctypes.data, ref(lead),  # Q, LDQ
        ref(c_double(0.0)), ref(c_double(0.0)),  # VL, VU: unused with RANGE = I
        ref(c_int(n - count + 1)), ref(size),  # IL, IU: Fortran's 1-based index range
        ref(c_double(_ABSTOL)), ref(found), w.ctypes.data,  # ABSTOL, M, W
        z.ctypes.data, ref(lead),  # Z, LDZ
        work.ctypes.data, iwork.ctypes.data, ifail.ctypes.data, ref(info),
    )  # fmt: skip
    if info.value < 0:
        raise ValueError(f"dsbevx: argument {-info.value} had an illegal value (a bug in pss)")
    if info.value > 0:
        raise BandEigenError(f"dsbevx: {info.value} eigenvectors failed to converge")
    count = found.value
    return w[:count].copy(), (np.ascontiguousarray(z[:, :count]) if vectors else None)


def _with_scipy(
    band: np.ndarray[Any, np.dtype[np.float64]], count: int, vectors: bool
) -> tuple[np.ndarray[Any, np.dtype[np.float64]], np.ndarray[Any, np.dtype[np.float64]] | None]:
    from scipy.linalg import LinAlgError, eig_banded  # lazy: ~0.17 s to import

    n = band.shape[1]
    try:
        found = eig_banded(
            band,
            lower=False,
            eigvals_only=not vectors,
            select="i",
            select_range=(n - count, n - 1),
            check_finite=False,
        )
    except LinAlgError as error:
        raise BandEigenError(str(error)) from error
    if vectors:
        values, right = found
        return values, right
    return found, None


def _dsbevx() -> Callable[..., None] | None:
    """scipy's dsbevx as a ctypes function (releases the GIL), or None where unavailable."""
    global _routine, _resolved
    with _lock:
        if not _resolved:
            _routine = _load()
            _resolved = True
        return _routine


def _load() -> Callable[..., None] | None:
    try:
        from scipy.linalg import cython_lapack
    except ImportError:
        return None
    capsule = getattr(cython_lapack, "__pyx_capi__", {}).get("dsbevx")
    if capsule is None:
        return None
    # Own prototypes rather than setting argtypes on ctypes.pythonapi's shared functions.
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
        ("PyCapsule_GetName", ctypes.pythonapi)
    )
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi)
    )
    signature = get_name(capsule)
    # The capsule's name is its C signature: call it only if it is exactly dsbevx's LP64 one.
    if signature is None or _kinds(signature) != _DSBEVX_KINDS:
        return None
    pointer = get_pointer(capsule, signature)
    if not pointer:
        return None
    # CFUNCTYPE, not PYFUNCTYPE: ctypes drops the GIL around the call.
    prototype = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * _ARGUMENTS))
    return prototype(pointer)


def _kinds(signature: bytes) -> str | None:
    """The parameter kinds of a capsule's C signature ("void (char *, int *, ...)"), or None."""
    text = signature.decode("ascii", "replace")
    if not text.startswith("void (") or not text.endswith(")"):
        return None
    kinds = []
    for parameter in text[len("void (") : -1].split(","):
        kind = {"char *": "c", "int *": "i", "double *": "d"}.get(parameter.strip())
        # scipy spells double as a typedef: __pyx_t_5scipy_6linalg_13cython_lapack_d.
        if kind is None and parameter.strip().endswith("cython_lapack_d *"):
            kind = "d"
        if kind is None:
            return None
        kinds.append(kind)
    return "".join(kinds)
