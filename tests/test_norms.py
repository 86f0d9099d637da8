"""The float64 Frobenius norm of the loader (pss_cli/core/norms.py) against exact references.

Tolerance: 4 float64 ulps relative to a correctly rounded sum (math.fsum) for a few hundred
thousand entries; 1e-13 for two million.
"""

from __future__ import annotations

import math

import pytest
import torch

from pss_cli.core import norms
from pss_cli.core.norms import buffer_norm, frobenius_norm, scale_to_unit, unit_scale


def _reference(matrix: torch.Tensor) -> float:
    return math.sqrt(math.fsum(float(x) ** 2 for x in matrix.double().flatten().tolist()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1000, 2**12, 2**20])
def test_buffer_norm_is_exact_across_chunks(dtype: torch.dtype, chunk: int, monkeypatch) -> None:
    # 333 x 301: the chunks end mid-row, and neither a chunk nor the matrix is a whole number of
    # the 1024-entry rows the sum of squares reduces by.
    monkeypatch.setattr(norms, "NORM_CHUNK_ENTRIES", chunk)
    generator = torch.Generator().manual_seed(chunk)
    matrix = (torch.randn(333, 301, generator=generator) * 3.0).to(dtype)
    assert buffer_norm(matrix) == pytest.approx(_reference(matrix), rel=4 * 2.0**-52)


def test_buffer_norm_keeps_large_and_small_entries() -> None:
    # Squares far apart in magnitude: a float32 accumulation would be off by ~1e-8 here (the
    # 2M small squares are 2e-2 next to 1e6); float64 rows of 1024 stay within ~1e-15.
    matrix = torch.full((2048, 1024), 1e-4, dtype=torch.float32)
    matrix[0, 0] = 1e3
    expected = math.sqrt(1e6 + (matrix.numel() - 1) * float(torch.tensor(1e-4)) ** 2)
    assert buffer_norm(matrix) == pytest.approx(expected, rel=1e-13)


def test_buffer_norm_propagates_nan_and_frobenius_norm_survives_overflow() -> None:
    matrix = torch.ones(700, 600)
    matrix[5, 7] = float("nan")
    assert math.isnan(buffer_norm(matrix))
    huge = torch.full((4, 4), 1e300, dtype=torch.float64)
    assert frobenius_norm(huge) == pytest.approx(4e300, rel=1e-15)


@pytest.mark.parametrize(
    ("dtype", "factor", "divided"),
    [
        (torch.float32, 1.0, True),
        (torch.float64, 1.0, True),
        (torch.bfloat16, 2.0**-40, True),  # beyond BF16_UNSCALED_EXPONENT: divided
        (torch.bfloat16, 2.0**40, True),
        (torch.bfloat16, 1.0, False),  # a moderate norm: left as stored
        (torch.bfloat16, 2.0**-20, False),
        (torch.bfloat16, 2.0**20, False),
    ],
)
def test_unit_scaling_is_exact_and_returns_its_exponent(
    dtype: torch.dtype, factor: float, divided: bool
) -> None:
    matrix = (torch.randn(64, 48, generator=torch.Generator().manual_seed(1)) * factor).to(dtype)
    norm = buffer_norm(matrix)
    scaled = matrix.clone()
    exponent = scale_to_unit(scaled, norm)
    if divided:
        assert 2.0**exponent == unit_scale(norm)
        assert 0.5 <= buffer_norm(scaled) < 1.0
    else:
        assert exponent == 0
    assert abs(exponent) > norms.BF16_UNSCALED_EXPONENT or exponent == 0 or dtype != torch.bfloat16
    assert torch.equal(scaled.double() * 2.0**exponent, matrix.double())


def test_a_zero_or_non_finite_norm_zeroes_the_buffer() -> None:
    for norm in (0.0, math.inf):
        target = torch.ones(4, 3, dtype=torch.bfloat16)
        assert scale_to_unit(target, norm) == 0
        assert not target.any()


@pytest.mark.parametrize(
    ("dtype", "exponent"),
    [(torch.bfloat16, e) for e in (128, 127, -128, 0, 1, -1)]
    + [(torch.float32, e) for e in (128, 127, -140, 0, 1, -1)]
    + [(torch.float64, e) for e in (1023, 1000, -1040, 0, 1, -1)],
)
def test_division_by_a_power_of_two_beyond_the_dtype_range_is_exact(
    dtype: torch.dtype, exponent: int
) -> None:
    # 2**128 is inf in float32 and bfloat16: one division by it zeroed a matrix whose entries
    # were finite. The values are exact in the dtype before and after the division (subnormal
    # ones included).
    values = torch.tensor([0.375, -0.1875, 0.09375, 0.0], dtype=torch.float64)
    target = (values * 2.0**exponent).to(dtype)
    assert bool(torch.isfinite(target).all())
    norms.divide_by_power_of_two(target, exponent)
    assert torch.equal(target.to(torch.float64), values)
