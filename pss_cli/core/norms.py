"""Norms of weight matrices: exact float64 Frobenius norms in a thread-count-independent order,
non-finite counts, and the exact power-of-two scaling to unit norm. Tensors in, numbers out."""

from __future__ import annotations

import math

import torch

# Entries per chunk of the norm: 8 MiB of float64 scratch, which stays in the last-level cache
# between its write and its read. 4M entries (32 MiB, the whole L3 of an AMD EPYC Zen 4) took
# 3x longer: 0.133 s against 0.045 s for the Llama block's 202M BF16 entries, 2 threads; 256K and
# smaller chunks were slower again (per-chunk overhead).
NORM_CHUNK_ENTRIES = 2**20
# Row width of the two-level sum of squares (see `sum_of_squares`).
_NORM_ROW = 1024


def buffer_norm(matrix: torch.Tensor) -> float:
    """||W||_F of a float32/64 matrix, exact in float64: chunks of ~1M entries copied into one
    reused float64 scratch buffer, then rows of 1024 reduced in float64.

    Converting each chunk into a fresh float64 tensor (the previous way) cost ~4x more (AMD
    EPYC Zen 4, 2 threads, shared: 953 vs 229 ms for an 11008 x 4096 matrix in one run; fresh
    allocations, not arithmetic, dominate: NOTES on `copy_` into a reused buffer), and torch's
    float64-accumulating norm of float32 data ~2.3x more. A float32 sum over millions of entries
    was off by 4e-5 (relative). NaN/Inf propagate (the caller then counts them).
    """
    rows_per_chunk = max(1, NORM_CHUNK_ENTRIES // max(1, matrix.shape[-1]))
    scratch = torch.empty(
        min(matrix.numel(), rows_per_chunk * matrix.shape[-1]),
        dtype=torch.float64,
        device=matrix.device,
    )
    total = 0.0
    for chunk in torch.split(matrix, rows_per_chunk):
        flat = scratch[: chunk.numel()]
        flat.copy_(chunk.reshape(-1))
        total += sum_of_squares(flat)
    return math.sqrt(total)


def sum_of_squares(flat: torch.Tensor) -> float:
    """sum(x^2) of a float64 vector in an order that does not depend on the thread count.

    A whole-vector reduction (torch.dot, .sum()) splits the work among threads, so its rounding
    changes with OMP_NUM_THREADS, and a distributed scan (torchrun sets one thread per process)
    would then differ from a single-process one in the last bits. Rows of 1024 are each reduced
    by one thread (torch splits an inner-dimension reduction by rows), and the few thousand row
    sums stay below torch's parallel grain size.
    """
    body = flat.numel() - flat.numel() % _NORM_ROW
    total = 0.0
    if body:
        norms = torch.linalg.vector_norm(flat[:body].view(-1, _NORM_ROW), dim=1)
        total += float(norms.mul(norms).sum())
    if body < flat.numel():
        tail = flat[body:]
        total += float(tail.mul(tail).sum())
    return total


def count_nonfinite(source: torch.Tensor) -> int:
    return int(source.numel() - torch.isfinite(source).sum())


def frobenius_norm(source: torch.Tensor) -> float:
    """||W||_F accumulated in float64, safe from overflow/underflow of the squares.

    torch's vector_norm squares without scaling: float64 weights near 1e300 give inf, near 1e-200
    give 0. Only then is the (costlier) rescaled form used.
    """
    norm = float(torch.linalg.vector_norm(source, dtype=torch.float64))
    if 0.0 < norm < float("inf"):
        return norm
    largest = float(source.abs().max())
    if largest == 0.0:
        return 0.0
    return largest * float(torch.linalg.vector_norm(source.to(torch.float64) / largest))


def scale_back(values: torch.Tensor, exponent: int) -> torch.Tensor:
    """values x 2**exponent, exactly, for the exponent a buffer was divided by (`scale_to_unit`
    returns it): float64 weights with a norm of 2**1023 or more have a unit scale that is not a
    float (math.ldexp overflowed and the scan failed with "math range error"). A copy; the two
    power-of-two factors are exact."""
    half = exponent // 2
    return values * math.ldexp(1.0, half) * math.ldexp(1.0, exponent - half)


def unit_scale(norm: float) -> float:
    """The power of two the buffer is divided by: norm / unit_scale(norm) lies in [0.5, 1).

    A power of two, not the norm itself, so that the scaling is exact: a BF16 or F16
    checkpoint's values stay exactly representable in their own dtype, and the bf16 products
    (pss_cli.core.spectra) see the stored matrix, not a rounded copy of it.
    """
    return math.ldexp(1.0, math.frexp(norm)[1])


# A bfloat16 buffer whose norm lies in [2**-BF16_UNSCALED_EXPONENT, 2**BF16_UNSCALED_EXPONENT]
# is left as stored (`scale_to_unit`).
BF16_UNSCALED_EXPONENT = 32


def scale_to_unit(target: torch.Tensor, norm: float) -> int:
    """Divide `target` by unit_scale(norm) in place, exactly; return the exponent it was divided
    by (2**exponent), which `scale_back` multiplies the singular values by.

    A bfloat16 buffer of moderate norm is not divided (exponent 0). Why: torch's bf16
    elementwise kernels convert every entry to float32 and back, so the division was the
    loader's costliest step, 49 ms per 11008 x 4096 matrix against 18 ms for the same division
    of a float32 one of twice the bytes (Intel Xeon with AMX, one thread). Why it is safe: such
    a buffer feeds only the bf16 Krylov products (pipeline/loader.py: `buffer_dtype`), which
    accumulate in float32 with unit-norm blocks, so every partial sum stays below the norm,
    2**95 below float32's overflow; and every value is at most 2**32 smaller than when scaled,
    so float32's underflow starts at 2**-94 x the norm instead of 2**-126, far below what the
    solver resolves (RELATIVE_FLOOR x sigma_1). A power-of-two factor is exact, and the scan's
    values were bit for bit those of the scaled buffer on the tests' and benchmarks' inputs.
    Not on every input (cause not isolated; the products are exact, so likely the magnitude
    thresholds inside LAPACK's norms): a matrix and a power-of-two multiple of it can differ in
    values at rounding level (the zeros of an exactly rank-one matrix, ~1e-7 x sigma_1: up to
    2e-1 relative to themselves) and, near the 2**-32 boundary, in the 7th digit of a small
    genuine value (QA, 2026-12-06); every value stays within the accuracy goal, as the scaled
    buffer's did.
    """
    # Divide, never multiply by 1/scale: for a subnormal norm (5e-324) 1/scale overflows to inf
    # and 0 * inf = NaN reached LAPACK (found by tests/test_fuzz.py). A norm beyond float64's
    # range (inf without NaN/Inf entries) is reported as non-finite; the buffer is unused.
    if not 0.0 < norm < math.inf:
        target.zero_()
        return 0
    exponent = math.frexp(norm)[1]
    if target.dtype == torch.bfloat16 and abs(exponent) <= BF16_UNSCALED_EXPONENT:
        return 0
    divide_by_power_of_two(target, exponent)
    return exponent


def divide_by_power_of_two(target: torch.Tensor, exponent: int) -> None:
    """target /= 2**exponent in place, exactly, in steps the target's dtype can hold.

    torch turns the scalar divisor into the tensor's dtype: a float32 matrix of finite entries
    whose norm is above float32's largest value (entries ~1e37 x 64) has a unit scale of 2**129,
    which became inf, and the matrix divided by it became zeros (reported with no sigma_max and
    no flag). Each step is at most 2**(e - 2), 2**e being the first power of two above the
    dtype's largest value: a normal number in float32, bfloat16 and float64, so every division
    is by an exact power of two.
    """
    limit = math.frexp(torch.finfo(target.dtype).max)[1] - 2
    while exponent != 0:
        step = max(-limit, min(limit, exponent))
        target.div_(math.ldexp(1.0, step))
        exponent -= step
