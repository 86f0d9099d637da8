"""Block-Krylov top singular values against exact references on matrices of known spectrum.

Tolerances are the product's stated goals (pss_cli/core/spectra.py): relative error <= 1e-3 on
sigma_max and <= 1e-2 on each of the top-16 values.
"""

from __future__ import annotations

import pytest
import torch

from pss_cli.core import krylov_basis
from pss_cli.core.band_eigen import BandEigenError
from pss_cli.core.krylov_basis import block_bidiagonal, ritz_values, top_right_vectors
from pss_cli.core.spectra import (
    KrylovSettings,
    exact_singular_values,
    gaussian_start,
    top_singular_values,
    uses_exact_path,
)
from tests.spectra_factory import flat_bulk, power_law, spiky, with_spectrum

FORCE_KRYLOV = KrylovSettings(exact_max_dim=0)
SIGMA_MAX_TOL = 1e-3
TOP_K_TOL = 1e-2
SPECTRA = {"spiky": spiky, "power_law": power_law, "flat_bulk": flat_bulk}


def _krylov(matrices: torch.Tensor, k: int = 16, seeds: list[int] | None = None):
    n = min(matrices.shape[-2:])
    seeds = seeds if seeds is not None else list(range(matrices.shape[0]))
    start = gaussian_start(seeds, n, FORCE_KRYLOV.block_size)
    return top_singular_values(matrices, k, start, FORCE_KRYLOV)


def _relative_errors(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return ((estimate - reference) / reference).abs()


@pytest.mark.parametrize("kind", sorted(SPECTRA))
@pytest.mark.parametrize("shape", [(900, 700), (700, 900), (1200, 800)])
def test_krylov_matches_known_spectrum(kind: str, shape: tuple[int, int]) -> None:
    m, n = shape
    truth = SPECTRA[kind](min(m, n))
    a = with_spectrum(m, n, truth, seed=m + n).to(torch.float32)[None]
    result = _krylov(a)
    errors = _relative_errors(result.values[0], truth[:16])
    assert errors[0] <= SIGMA_MAX_TOL, (kind, shape, errors[0].item())
    assert errors.max() <= TOP_K_TOL, (kind, shape, errors.max().item())
    assert result.iterations[0] >= 3


def test_spike_converges_to_float32_precision() -> None:
    truth = spiky(800, spikes=(20.0, 10.0, 6.0))
    a = with_spectrum(1000, 800, truth, seed=3).to(torch.float32)[None]
    values = _krylov(a).values[0]
    # A clear gap makes Krylov converge fast and far (docs/DESIGN.md: errors ~1e-6).
    assert _relative_errors(values[:3], truth[:3]).max() <= 1e-5


def test_ritz_values_never_exceed_true_values() -> None:
    # Ritz values are lower bounds (Cauchy interlacing); beyond rounding they never overshoot.
    truth = flat_bulk(700)
    a = with_spectrum(900, 700, truth, seed=5).to(torch.float32)[None]
    values = _krylov(a).values[0]
    assert (values <= truth[:16] * (1 + 1e-5)).all()


def test_batched_equals_looped() -> None:
    shapes = [spiky(640), power_law(640), flat_bulk(640), spiky(640, (3.0,))]
    stack = torch.stack(
        [with_spectrum(800, 640, s, seed=i).to(torch.float32) for i, s in enumerate(shapes)]
    )
    batched = _krylov(stack, seeds=[11, 12, 13, 14])
    for i in range(len(shapes)):
        alone = _krylov(stack[i : i + 1], seeds=[11 + i])
        torch.testing.assert_close(batched.values[i], alone.values[0], rtol=1e-6, atol=0.0)
        assert batched.iterations[i] == alone.iterations[0]


def test_same_seed_same_values_other_seed_close() -> None:
    a = with_spectrum(900, 700, flat_bulk(700), seed=1).to(torch.float32)[None]
    first, second = _krylov(a, seeds=[7]), _krylov(a, seeds=[7])
    assert torch.equal(first.values, second.values)
    other = _krylov(a, seeds=[8])
    assert _relative_errors(other.values[0], first.values[0]).max() <= 2 * TOP_K_TOL


def test_float64_compute() -> None:
    truth = power_law(700)
    a = with_spectrum(900, 700, truth, seed=2)[None]
    values = _krylov(a).values[0]
    assert _relative_errors(values, truth[:16]).max() <= TOP_K_TOL
    assert values.dtype == torch.float64


def test_low_rank_matrix_does_not_break_the_recurrence() -> None:
    # Rank 5 < k = 16: the Krylov space becomes invariant after one block; the rest are zeros.
    truth = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    a = with_spectrum(900, 700, truth, seed=4).to(torch.float32)[None]
    values = _krylov(a).values[0]
    assert _relative_errors(values[:5], truth).max() <= 1e-5
    assert values[5:].abs().max() <= 1e-4 * truth[0]


def test_unconverged_matrix_falls_back_to_exact() -> None:
    # One iteration budget cannot converge: the solver must pay for the full SVD, not guess.
    settings = KrylovSettings(exact_max_dim=0, max_iterations=1)
    truth = flat_bulk(700)
    a = with_spectrum(900, 700, truth, seed=6).to(torch.float32)[None]
    start = gaussian_start([0], 700, settings.block_size)
    result = top_singular_values(a, 16, start, settings)
    assert result.exact == (True,)
    assert _relative_errors(result.values[0], truth[:16]).max() <= 1e-5


def test_small_matrices_take_the_exact_path() -> None:
    settings = KrylovSettings()
    assert uses_exact_path(384, 1536, 16, settings)
    assert not uses_exact_path(3072, 768, 16, settings)
    truth = power_law(64)
    a = with_spectrum(64, 200, truth, seed=0).to(torch.float32)[None]
    result = top_singular_values(a, 16, None, settings)
    assert result.exact == (True,) and result.iterations == (0,)
    assert _relative_errors(result.values[0], truth[:16]).max() <= 1e-5


def test_k_larger_than_rank_is_clipped() -> None:
    a = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))[None]
    result = top_singular_values(a, 16, None, KrylovSettings())
    assert result.values.shape == (1, 3)
    torch.testing.assert_close(
        result.values[0], exact_singular_values(a.double())[0], rtol=1e-6, atol=0
    )


def test_wide_and_tall_give_the_same_values() -> None:
    a = with_spectrum(900, 700, power_law(700), seed=9).to(torch.float32)
    tall = _krylov(a[None], seeds=[1]).values[0]
    wide = _krylov(a.T.contiguous()[None], seeds=[1]).values[0]
    torch.testing.assert_close(tall, wide, rtol=1e-6, atol=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    a = with_spectrum(1200, 900, flat_bulk(900), seed=10).to(torch.float32)[None]
    cpu = _krylov(a, seeds=[3]).values[0]
    start = gaussian_start([3], 900, FORCE_KRYLOV.block_size)
    gpu = top_singular_values(a.cuda(), 16, start, FORCE_KRYLOV).values[0]
    assert _relative_errors(gpu, cpu).max() <= 1e-3


@pytest.mark.parametrize("shape", [(900, 700), (700, 900)])
@pytest.mark.parametrize("settings", [FORCE_KRYLOV, KrylovSettings()], ids=["krylov", "exact"])
def test_triplets_reconstruct_the_dominant_part(shape, settings) -> None:
    from pss_cli.core.spectra import top_singular_triplets

    m, n = shape
    truth = spiky(min(m, n), spikes=(20.0, 10.0, 6.0))
    a = with_spectrum(m, n, truth, seed=12).to(torch.float32)
    start = gaussian_start([4], min(m, n), settings.block_size)[0]
    t = top_singular_triplets(a, 16, start, settings)
    assert t.left.shape == (m, 16) and t.right.shape == (n, 16)
    # The spikes' triplets are accurate: A v_i = s_i u_i and A^T u_i = s_i v_i.
    s = t.values[:3].to(torch.float32)
    torch.testing.assert_close(a @ t.right[:, :3], t.left[:, :3] * s, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.T @ t.left[:, :3], t.right[:, :3] * s, rtol=0, atol=1e-4)
    assert _relative_errors(t.values[:3], truth[:3]).max() <= 1e-5


def test_k_beyond_the_krylov_budget_takes_the_exact_path() -> None:
    # 4 iterations of 32 cannot give 64 values three times over: exact, never zeros.
    settings = KrylovSettings(exact_max_dim=0, max_iterations=4)
    assert uses_exact_path(256, 256, 64, settings)
    truth = power_law(256)
    a = with_spectrum(256, 256, truth, seed=13).to(torch.float32)[None]
    result = top_singular_values(a, 64, None, settings)
    assert result.exact == (True,)
    assert _relative_errors(result.values[0], truth[:64]).max() <= 1e-4


def test_large_k_on_the_krylov_path() -> None:
    settings = KrylovSettings()
    assert not uses_exact_path(1100, 1100, 250, settings)
    truth = power_law(1100)
    a = with_spectrum(1100, 1100, truth, seed=13).to(torch.float32)[None]
    result = top_singular_values(a, 250, gaussian_start([0], 1100, 32), settings)
    errors = _relative_errors(result.values[0], truth[:250])
    assert errors[0] <= SIGMA_MAX_TOL and errors[:16].max() <= TOP_K_TOL
    assert (result.values[0] > 0).all()


@pytest.mark.parametrize("count", [1, 2, 7])
def test_banded_ritz_values_match_the_dense_bidiagonal(count: int) -> None:
    # The convergence test's Ritz values come from the banded T^T T (krylov_basis.ritz_values);
    # the reference is float64 svdvals of the dense block bidiagonal T. Rank-deficient blocks
    # (a zero column in R, as after an exhausted Krylov space) included.
    generator = torch.Generator().manual_seed(count)

    def triangle() -> torch.Tensor:
        return torch.linalg.qr(torch.randn(3, 200, 32, generator=generator)).R

    r_blocks = [triangle() for _ in range(count)]
    s_blocks = [triangle() * 0.6 for _ in range(count)]
    r_blocks[-1][1, :, -1] = 0.0
    dense = block_bidiagonal(r_blocks, s_blocks).double()
    k = min(16, 32 * count)
    reference = torch.linalg.svdvals(dense)[:, :k]
    values = ritz_values(r_blocks, s_blocks, k)
    assert values.dtype == torch.float64 and values.shape == (3, k)
    # 1e-12 of sigma_1: float64 eigenvalues of the Gram matrix (docstring's error bound).
    torch.testing.assert_close(values, reference, rtol=0.0, atol=1e-12 * float(reference.max()))
    # A matrix's values do not depend on its batch-mates, to the last bit.
    alone = ritz_values([r[1:2] for r in r_blocks], [s[1:2] for s in s_blocks], k)
    assert torch.equal(alone[0], values[1])


def test_gram_right_vectors_span_the_svd_ones() -> None:
    # The bf16 path's Rayleigh-Ritz step takes the top right singular vectors of T from the
    # eigenvectors of T^T T (krylov_basis.top_right_vectors): the same subspace as the SVD's.
    generator = torch.Generator().manual_seed(11)

    def triangle() -> torch.Tensor:
        return torch.linalg.qr(torch.randn(2, 200, 32, generator=generator)).R

    r_blocks = [triangle() for _ in range(5)]
    s_blocks = [triangle() * 0.6 for _ in range(5)]
    dense = block_bidiagonal(r_blocks, s_blocks).double()
    _, values, vh = torch.linalg.svd(dense)
    assert (values[:, 31] / values[:, 32]).min() > 1.001  # a gap: the subspace is defined
    reference = vh[:, :32].mT
    vectors = top_right_vectors(r_blocks, s_blocks, 32)
    assert vectors.shape == (2, 160, 32) and vectors.dtype == torch.float64
    torch.testing.assert_close(vectors @ vectors.mT, reference @ reference.mT, rtol=0.0, atol=1e-8)
    # Descending order: the first column is the top singular vector (up to sign).
    alignment = (vectors[:, :, 0] * reference[:, :, 0]).sum(-1).abs()
    torch.testing.assert_close(alignment, torch.ones(2, dtype=torch.float64))


def test_a_lapack_failure_falls_back_to_the_dense_bidiagonal(monkeypatch) -> None:
    # dsbevx reports non-convergence (band_eigen.BandEigenError): the dense SVD of T answers.
    calls: list[int] = []

    def fail(*args: object, **kwargs: object) -> None:
        calls.append(1)
        raise BandEigenError("did not converge")

    generator = torch.Generator().manual_seed(5)
    r_blocks = [torch.linalg.qr(torch.randn(1, 200, 32, generator=generator)).R for _ in range(3)]
    s_blocks = [torch.linalg.qr(torch.randn(1, 200, 32, generator=generator)).R for _ in range(3)]
    expected_values = ritz_values(r_blocks, s_blocks, 16)
    expected_vectors = top_right_vectors(r_blocks, s_blocks, 32)
    monkeypatch.setattr(krylov_basis, "top_band_eigen", fail)
    values = ritz_values(r_blocks, s_blocks, 16)
    vectors = top_right_vectors(r_blocks, s_blocks, 32)
    assert calls  # the failure happened, and was answered
    torch.testing.assert_close(values, expected_values, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(
        vectors @ vectors.mT, expected_vectors @ expected_vectors.mT, rtol=0.0, atol=1e-8
    )
