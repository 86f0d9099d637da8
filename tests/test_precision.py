"""bf16 Krylov products: the accuracy goal on every machine, the precision-aware fallback, and the
measured dispatch (`--precision auto|fp32|bf16`).

These run wherever the suite runs: on a CPU without a bf16 kernel (AVX2-only: bf16 GEMM 50-300x
slower than fp32) the bf16 path is slow but must be just as right, so the matrices stay small
(short side 700: a few seconds there). Goals: relative error <= 1e-3 on sigma_max and <= 1e-2 on
each top-16 value, flat bulks included (pss_cli/core/spectra.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.config import BF16_MIN_SPEEDUP, ProductPrecision, ScanConfig
from pss_cli.core import precision as precision_module
from pss_cli.core.mixed_precision import Products
from pss_cli.core.precision import bf16_time_ratio, choose_precision
from pss_cli.core.spectra import (
    KrylovSettings,
    exact_singular_values,
    gaussian_start,
    iteration_budget,
    top_singular_triplets,
    top_singular_values,
)
from pss_cli.pipeline import scan_checkpoint
from tests.safetensors_factory import write_tensors
from tests.spectra_factory import flat_bulk, power_law, spiky, with_spectrum

BF16 = KrylovSettings(exact_max_dim=0, bf16_products=True)
FP32 = KrylovSettings(exact_max_dim=0)
SIGMA_MAX_TOL = 1e-3
TOP_K_TOL = 1e-2
SPECTRA = {"spiky": spiky, "power_law": power_law, "flat_bulk": flat_bulk}


def _errors(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return ((estimate - reference) / reference).abs()


def _unit(a: torch.Tensor) -> torch.Tensor:
    return a / 2.0 ** torch.frexp(torch.linalg.vector_norm(a.double())).exponent.item()


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32], ids=["BF16", "F32"])
@pytest.mark.parametrize("kind", sorted(SPECTRA))
def test_bf16_products_meet_the_accuracy_goal(kind: str, stored: torch.dtype) -> None:
    # A BF16 checkpoint's matrix is exact in bf16; an F32 one is rounded for the products only
    # (the Rayleigh-Ritz step sees the float32 matrix).
    truth = SPECTRA[kind](700)
    a = _unit(with_spectrum(900, 700, truth, seed=5).to(stored).to(torch.float32))[None]
    reference = exact_singular_values(a.double())[0, :16]
    result = top_singular_values(a, 16, gaussian_start([1], 700, 32), BF16)
    errors = _errors(result.values[0], reference)
    assert errors[0] <= SIGMA_MAX_TOL, (kind, errors[0].item())
    assert errors.max() <= TOP_K_TOL, (kind, errors.max().item())
    assert result.iterations[0] >= 3  # (a full SVD may answer where the budget ran out)


@pytest.mark.parametrize("rank", [5, 40])
def test_bf16_products_on_a_low_rank_matrix(rank: int) -> None:
    # Only the right basis is re-orthogonalised with bf16 products (core/lanczos.py). Rank 5:
    # the Krylov space is invariant after one block and the left block of the next step is
    # rounding noise; rank 40: it fills up within two blocks. Either way the values are the
    # true ones, and the zeros are zeros (relative to sigma_1).
    truth = torch.linspace(5.0, 1.0, rank, dtype=torch.float64)
    a = _unit(with_spectrum(900, 700, truth, seed=8).to(torch.bfloat16).float())[None]
    reference = exact_singular_values(a.double())[0, :16]
    result = top_singular_values(a, 16, gaussian_start([4], 700, 32), BF16)
    top = min(rank, 16)
    assert _errors(result.values[0, :top], reference[:top]).max() <= 1e-4
    if rank < 16:
        assert result.values[0, rank:].abs().max() <= 1e-3 * reference[0]


def test_bf16_products_on_a_cluster_wider_than_k() -> None:
    # 24 equal values above a flat bulk: k = 16 of them, any 16 directions of the cluster. A
    # left basis that drifted would show up as Ritz values of T beyond the cluster's value.
    truth = torch.cat([torch.full((24,), 2.0, dtype=torch.float64), flat_bulk(676)])
    a = _unit(with_spectrum(900, 700, truth, seed=9).to(torch.bfloat16).float())[None]
    reference = exact_singular_values(a.double())[0, :16]
    result = top_singular_values(a, 16, gaussian_start([5], 700, 32), BF16)
    assert result.exact == (False,)
    assert _errors(result.values[0], reference).max() <= SIGMA_MAX_TOL


@pytest.mark.parametrize("spikes", [(8.0, 5.0), (3.0, 2.0, 1.5)])
def test_bf16_products_vouch_for_their_own_values(spikes: tuple[float, ...]) -> None:
    # The bf16 recurrence must reach values its Rayleigh-Ritz check accepts, not lean on the
    # fp32 retry (iterations beyond the budget) or the full SVD: spikes converge first, and a
    # right basis that lost them (a basis left unorthogonalised) comes back with ghost copies.
    n = 1100
    truth = spiky(n, spikes)
    a = _unit(with_spectrum(1400, n, truth, seed=6).to(torch.bfloat16).float())[None]
    reference = exact_singular_values(a.double())[0, :16]
    result = top_singular_values(a, 16, gaussian_start([2], n, 32), BF16)
    assert result.exact == (False,)
    assert result.iterations[0] <= iteration_budget(n, BF16)
    assert _errors(result.values[0], reference).max() <= TOP_K_TOL


def test_bf16_values_never_exceed_the_true_values() -> None:
    # The reported values come from A V_k with the float32 A: Ritz values of the true matrix,
    # lower bounds whatever bf16 did to the subspace (beyond float32 rounding).
    truth = flat_bulk(700)
    a = _unit(with_spectrum(800, 700, truth, seed=6).to(torch.bfloat16).float())[None]
    reference = exact_singular_values(a.double())[0, :16]
    result = top_singular_values(a, 16, gaussian_start([2], 700, 32), BF16)
    assert result.exact == (False,)  # the Rayleigh-Ritz values, not a fallback's
    assert (result.values[0] <= reference * (1 + 1e-6)).all()


def test_bf16_and_fp32_products_agree_on_a_batch() -> None:
    matrices = torch.stack(
        [
            _unit(with_spectrum(800, 700, f(700), seed=i).to(torch.bfloat16).float())
            for i, f in enumerate(SPECTRA.values())
        ]
    )
    start = gaussian_start([0, 1, 2], 700, 32)
    low = top_singular_values(matrices, 16, start, BF16).values
    high = top_singular_values(matrices, 16, start, FP32).values
    assert _errors(low[:, 0], high[:, 0]).max() <= 2 * SIGMA_MAX_TOL
    assert _errors(low, high).max() <= 2 * TOP_K_TOL


def test_bf16_batched_equals_looped() -> None:
    # Matrices that converge at different iterations: once one is done, the others' products
    # run on views of their own rows (nothing is compacted), and each result is its own.
    matrices = torch.stack(
        [
            _unit(with_spectrum(800, 700, f(700), seed=i).to(torch.bfloat16).float())
            for i, f in enumerate(SPECTRA.values())
        ]
    )
    seeds = list(range(len(matrices)))
    batched = top_singular_values(matrices, 16, gaussian_start(seeds, 700, 32), BF16)
    assert len(set(batched.iterations)) > 1  # the partial-batch path ran
    for i in seeds:
        alone = top_singular_values(matrices[i : i + 1], 16, gaussian_start([i], 700, 32), BF16)
        torch.testing.assert_close(batched.values[i], alone.values[0], rtol=1e-6, atol=0.0)
        assert batched.iterations[i] == alone.iterations[0]


def test_noise_beyond_the_tolerance_is_never_reported() -> None:
    # Tolerances far below bf16's rounding: the bf16 test cannot pass, so the matrix is solved
    # again with fp32 products, which cannot either within 6 iterations: a full SVD answers.
    settings = KrylovSettings(
        exact_max_dim=0, bf16_products=True, tol_sigma_max=1e-12, tol_top_k=1e-12, max_iterations=6
    )
    truth = flat_bulk(700)
    a = _unit(with_spectrum(800, 700, truth, seed=7).float())[None]
    result = top_singular_values(a, 16, gaussian_start([3], 700, 32), settings)
    assert result.exact == (True,)
    assert result.iterations[0] == 12  # 6 in bf16, then 6 in fp32
    torch.testing.assert_close(
        result.values[0], exact_singular_values(a.double())[0, :16], rtol=1e-5, atol=0
    )


def test_choice_follows_the_request_and_the_measurement(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert choose_precision("fp32", cpu, torch.float32, 1.5).products == "fp32"
    assert choose_precision("bf16", cpu, torch.float32, 1.5).basis == "requested"
    assert choose_precision("auto", cpu, torch.float64, 1.5).products == "fp64"
    monkeypatch.setitem(precision_module._CACHE, "cpu", 0.4)  # bf16 2.5x faster
    fast = choose_precision("auto", cpu, torch.float32, 1.5)
    assert (fast.products, fast.basis, fast.bf16_time_ratio) == ("bf16", "measured", 0.4)
    monkeypatch.setitem(precision_module._CACHE, "cpu", 0.8)  # only 1.25x: not worth it
    assert choose_precision("auto", cpu, torch.float32, 1.5).products == "fp32"
    monkeypatch.setitem(precision_module._CACHE, "cpu", 120.0)  # no bf16 kernel
    assert choose_precision("auto", cpu, torch.float32, 1.5).products == "fp32"


def test_the_measurement_is_real_and_cached(monkeypatch) -> None:
    monkeypatch.delitem(precision_module._CACHE, "cpu", raising=False)
    ratio = bf16_time_ratio(torch.device("cpu"))
    assert 0.0 < ratio < float("inf")
    monkeypatch.setattr(precision_module, "_measure", lambda device: pytest.fail("measured twice"))
    assert bf16_time_ratio(torch.device("cpu")) == ratio


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tensors = {
        f"layers.{i}.mlp.up_proj.weight": with_spectrum(700, 600, f(600), seed=i).to(torch.bfloat16)
        for i, f in enumerate(SPECTRA.values())
    }
    return write_tensors(tmp_path_factory.mktemp("bf16") / "m.safetensors", tensors)


@pytest.mark.parametrize("precision", [ProductPrecision.BF16, ProductPrecision.FP32])
def test_scan_records_its_products_and_meets_the_goal(
    bf16_checkpoint: Path, precision: ProductPrecision
) -> None:
    report = scan_checkpoint(bf16_checkpoint, ScanConfig(exact_max_dim=0, precision=precision))
    assert report.settings.precision == str(precision)
    assert report.settings.products == str(precision)
    assert report.settings.precision_basis == "requested"
    assert report.settings.bf16_min_speedup == BF16_MIN_SPEEDUP
    exact = scan_checkpoint(bf16_checkpoint, ScanConfig(exact=True))
    for layer, reference in zip(report.layers, exact.layers, strict=True):
        assert layer.solver == "krylov"
        assert layer.frobenius_norm == reference.frobenius_norm
        top = torch.tensor(layer.top_singular_values, dtype=torch.float64)
        truth = torch.tensor(reference.top_singular_values, dtype=torch.float64)
        errors = _errors(top, truth)
        assert errors[0] <= SIGMA_MAX_TOL and errors.max() <= TOP_K_TOL, layer.name


def test_auto_states_its_measurement(bf16_checkpoint: Path) -> None:
    report = scan_checkpoint(bf16_checkpoint, ScanConfig(exact_max_dim=0))
    assert report.settings.precision == "auto"
    assert report.settings.precision_basis == "measured"
    ratio = report.timings["bf16_time_ratio"]  # run-dependent: a timing, not a setting
    expected = "bf16" if ratio * BF16_MIN_SPEEDUP <= 1.0 else "fp32"
    assert report.settings.products == expected


def test_nothing_to_measure_without_krylov_work(tmp_path: Path) -> None:
    path = write_tensors(tmp_path / "s.safetensors", {"w": torch.randn(64, 96)})
    report = scan_checkpoint(path, ScanConfig())
    assert report.settings.precision_basis == "no-krylov"
    assert "bf16_time_ratio" not in report.timings


def test_cli_precision_option(bf16_checkpoint: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(
        app, ["scan", str(bf16_checkpoint), "-f", "json", "-q", "--precision", "bf16"]
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["settings"]["products"] == "bf16"
    bad = runner.invoke(app, ["scan", str(bf16_checkpoint), "--precision", "fp8"])
    assert bad.exit_code == 2
    for command in ("check", "smooth"):
        assert "--precision" in runner.invoke(app, [command, "--help"]).stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee-fp32", "tf32-allowed"])
@pytest.mark.parametrize("kind", sorted(SPECTRA))
def test_cuda_bf16_products_meet_the_goal(kind: str, tf32: bool, monkeypatch) -> None:
    # pss leaves TF32 as the user set it; with it on, the Rayleigh-Ritz product is TF32 too and
    # the values must still meet the goal.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    truth = SPECTRA[kind](700)
    a = _unit(with_spectrum(900, 700, truth, seed=5).to(torch.bfloat16).to(torch.float32))[None]
    reference = exact_singular_values(a.double())[0, :16]
    result = top_singular_values(a.cuda(), 16, gaussian_start([1], 700, 32), BF16)
    errors = _errors(result.values[0], reference)
    assert errors[0] <= SIGMA_MAX_TOL and errors.max() <= TOP_K_TOL, (kind, tf32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_measures_on_the_gpu(bf16_checkpoint: Path) -> None:
    report = scan_checkpoint(bf16_checkpoint, ScanConfig(device="cuda", exact_max_dim=0))
    assert report.settings.precision_basis == "measured"
    assert report.timings["bf16_time_ratio"] > 0
    assert "cuda" in precision_module._CACHE or "cuda:0" in precision_module._CACHE


def test_a_bf16_matrix_is_multiplied_as_stored() -> None:
    # A BF16 checkpoint's batch arrives as bf16 (pss_cli/pipeline/loader.py): the solver
    # multiplies it as it is. Its Krylov products are the same as those of the bf16 copy of the
    # float32 buffer (same values), so the iterations match, and the Rayleigh-Ritz product
    # (float32, converted a slab at a time) differs only in its rounding order.
    truth = flat_bulk(700)
    stored = _unit(with_spectrum(900, 700, truth, seed=8).to(torch.bfloat16).float())
    start = gaussian_start([4], 700, 32)
    native = top_singular_values(stored.to(torch.bfloat16)[None], 16, start, BF16)
    copied = top_singular_values(stored[None], 16, start, BF16)
    assert native.iterations == copied.iterations and native.exact == (False,)
    torch.testing.assert_close(native.values, copied.values, rtol=1e-6, atol=0.0)
    reference = exact_singular_values(stored.double()[None])[0, :16]
    errors = _errors(native.values[0], reference)
    assert errors[0] <= SIGMA_MAX_TOL and errors.max() <= TOP_K_TOL
    # bf16 values have only bf16 products to offer, whatever the settings ask.
    assert top_singular_values(stored.to(torch.bfloat16)[None], 16, start, FP32).iterations == (
        native.iterations
    )


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_a_wide_matrix_gets_the_bf16_products_of_its_row_major_tall_copy(
    stored: torch.dtype,
) -> None:
    # top_singular_values works on the tall view of a wide batch. bf16 products on a transposed
    # view were 8-75x slower (mixed_precision.Products), so the bf16 matrix is made row-major
    # first: the same bits as for the tall matrix laid out row-major, as the scan's loader does.
    wide = _unit(with_spectrum(600, 900, flat_bulk(600), seed=12).to(torch.bfloat16).float())
    wide = wide.to(stored)[None]
    start = gaussian_start([6], 600, 32)
    from_view = top_singular_values(wide, 16, start, BF16)
    from_rows = top_singular_values(wide.mT.contiguous(), 16, start, BF16)
    assert from_view.iterations == from_rows.iterations
    if stored == torch.bfloat16:
        assert torch.equal(from_view.values, from_rows.values)
    else:
        # The one float32 product of the Rayleigh-Ritz step multiplies the caller's float32
        # matrix, view or not: MKL may round that product differently (it did under AVX2 caps).
        torch.testing.assert_close(from_view.values, from_rows.values, rtol=1e-6, atol=0.0)
    ops = Products(wide.mT, low=True)
    assert ops.low is not None and ops.low.is_contiguous()
    torch.testing.assert_close(ops.low.float(), wide.mT.to(torch.bfloat16).float(), rtol=0, atol=0)
    # A strided batch (every other matrix of a stack) was as slow (33 against 4 ms at 4096^2).
    stack = torch.randn(4, 40, 30).to(torch.bfloat16)
    every_other = Products(stack[::2], low=True).low
    assert every_other is not None and every_other.is_contiguous()
    assert torch.equal(every_other, stack[::2])
    # A contiguous batch, as the scan's loader makes, is used as it is: no copy.
    as_loaded = Products(stack, low=True).low
    assert as_loaded is not None and as_loaded.data_ptr() == stack.data_ptr()


def test_a_bf16_matrix_that_cannot_be_vouched_for_is_converted() -> None:
    # The retry (fp32 products) and the full-SVD fallback need the float32 matrix: converted
    # from the bf16 values, which are exact, so the answer is the exact one.
    settings = KrylovSettings(
        exact_max_dim=0, bf16_products=True, tol_sigma_max=1e-12, tol_top_k=1e-12, max_iterations=6
    )
    stored = _unit(with_spectrum(800, 700, flat_bulk(700), seed=9).to(torch.bfloat16).float())
    result = top_singular_values(
        stored.to(torch.bfloat16)[None], 16, gaussian_start([5], 700, 32), settings
    )
    assert result.exact == (True,) and result.iterations[0] == 12
    torch.testing.assert_close(
        result.values[0], exact_singular_values(stored.double()[None])[0, :16], rtol=1e-5, atol=0
    )


def test_a_bf16_matrix_has_no_singular_vectors() -> None:
    # Smoothing edits along the vectors: it needs compute-dtype products, never bf16 ones.
    matrix = torch.randn(800, 700).to(torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        top_singular_triplets(matrix, 16, gaussian_start([0], 700, 32)[0], FP32)


@pytest.mark.parametrize(
    ("stored", "precision", "expected"),
    [
        (torch.bfloat16, ProductPrecision.BF16, torch.bfloat16),
        (torch.bfloat16, ProductPrecision.FP32, torch.float32),
        (torch.float16, ProductPrecision.BF16, torch.float32),  # fp16 values are not bf16 values
        (torch.float32, ProductPrecision.BF16, torch.float32),
    ],
    ids=["BF16-bf16", "BF16-fp32", "F16-bf16", "F32-bf16"],
)
def test_the_loader_keeps_bf16_only_where_it_is_exact(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stored: torch.dtype,
    precision: ProductPrecision,
    expected: torch.dtype,
) -> None:
    import pss_cli.pipeline.solve as solve_module

    seen: list[torch.dtype] = []
    original = solve_module.top_singular_values

    def spy(matrices: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen.append(matrices.dtype)
        return original(matrices, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(solve_module, "top_singular_values", spy)
    tensors = {
        "wide.weight": with_spectrum(700, 900, spiky(700), seed=1).to(stored),
        "tall.weight": with_spectrum(900, 700, flat_bulk(700), seed=2).to(stored),
    }
    path = write_tensors(tmp_path / "m.safetensors", tensors)
    report = scan_checkpoint(path, ScanConfig(exact_max_dim=0, precision=precision))
    assert seen and set(seen) == {expected}
    exact = scan_checkpoint(path, ScanConfig(exact=True))
    for layer, reference in zip(report.layers, exact.layers, strict=True):
        assert layer.solver == "krylov"
        assert layer.frobenius_norm == reference.frobenius_norm  # the norm of the stored values
        errors = _errors(
            torch.tensor(layer.top_singular_values, dtype=torch.float64),
            torch.tensor(reference.top_singular_values, dtype=torch.float64),
        )
        assert errors[0] <= SIGMA_MAX_TOL and errors.max() <= TOP_K_TOL, layer.name


@pytest.mark.parametrize("wide", [False, True], ids=["tall", "wide"])
def test_a_bf16_buffer_left_unscaled_gives_the_values_of_a_scaled_one(
    tmp_path: Path, wide: bool
) -> None:
    # A moderate norm is left as stored (core/norms.py: scale_to_unit), 2**+-40 times it is
    # divided by its unit scale: the same matrix up to a power of two, under the same name (the
    # start block is seeded by it), so the same values up to that power of two. Bit for bit
    # where every partial product stays a normal float32, as here; the tolerance is a tenth of
    # the accuracy goal, far above any rounding difference and far below a missing or doubled
    # 2**exponent.
    from pss_cli.core.norms import BF16_UNSCALED_EXPONENT

    # A short side of 1100 allows 17 iterations and this matrix needs 12 (with a native bf16
    # GEMM and with an emulated one: an Intel Xeon with and without AVX2 caps). At 900 x 700 it
    # needed all of its budget of 10, and an emulated kernel's rounding tipped it into the
    # full-SVD fallback, which bypasses the scaling this test is about.
    base = with_spectrum(1300, 1100, spiky(1100), seed=4)
    if wide:
        base = base.mT.contiguous()
    layers = {}
    for factor in (1.0, 2.0**20, 2.0**-20, 2.0**40, 2.0**-40):
        path = write_tensors(
            tmp_path / f"{factor}.safetensors", {"w.weight": (base * factor).to(torch.bfloat16)}
        )
        (layer,) = scan_checkpoint(path, ScanConfig(precision=ProductPrecision.BF16)).layers
        assert layer.solver == "krylov"
        unscaled = abs(math.frexp(layer.frobenius_norm)[1]) <= BF16_UNSCALED_EXPONENT
        assert unscaled == (abs(math.log2(factor)) < 40)
        layers[factor] = layer
    reference = torch.tensor(layers[1.0].top_singular_values, dtype=torch.float64)
    for factor, layer in layers.items():
        values = torch.tensor(layer.top_singular_values, dtype=torch.float64) / factor
        assert torch.allclose(values, reference, rtol=SIGMA_MAX_TOL / 10, atol=0), factor
        assert layer.iterations == layers[1.0].iterations
        assert layer.stable_rank == pytest.approx(layers[1.0].stable_rank, rel=SIGMA_MAX_TOL / 10)


def test_fp32_products_of_a_bf16_matrix_convert_a_slab_at_a_time(monkeypatch) -> None:
    # The retry of a bf16 batch (fp32 products) keeps the bf16 matrix and converts slabs: the
    # products equal those of the float32 matrix, with no float32 copy of it.
    from pss_cli.core import mixed_precision

    monkeypatch.setattr(mixed_precision, "UPCAST_CHUNK_ENTRIES", 700 * 97)  # 97-row slabs
    stored = torch.randn(2, 900, 700, generator=torch.Generator().manual_seed(3)).bfloat16()
    ops = mixed_precision.Products(stored, low=False)
    assert ops.low is None and ops.a is stored
    right = torch.randn(2, 700, 32, dtype=torch.float32)
    left = torch.randn(2, 900, 32, dtype=torch.float32)
    wide = stored.float()
    torch.testing.assert_close(ops.forward(right), wide @ right, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ops.adjoint(left), wide.mT @ left, rtol=1e-5, atol=1e-4)
    ops.select(torch.tensor([1]))
    torch.testing.assert_close(ops.adjoint(left[1:]), wide[1:].mT @ left[1:], rtol=1e-5, atol=1e-4)


def test_the_retry_of_a_bf16_matrix_starts_after_its_bases_are_freed(monkeypatch) -> None:
    # The memory plan counts one set of Krylov bases per batch: the bf16 pass's must be gone
    # when the fp32 retry allocates its own.
    import gc
    import weakref

    from pss_cli.core import krylov_basis, lanczos

    buffers: list[weakref.ref[torch.Tensor]] = []
    alive_at_retry: list[int] = []
    init, select, original = krylov_basis.Basis.__init__, krylov_basis.Basis.select, None

    def recorded_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        buffers.append(weakref.ref(self.buffer))

    def recorded_select(self, keep):  # type: ignore[no-untyped-def]
        select(self, keep)
        buffers.append(weakref.ref(self.buffer))

    def recorded(tall, k, start, settings, vectors=None):  # type: ignore[no-untyped-def]
        gc.collect()
        alive_at_retry.append(sum(ref() is not None for ref in buffers))
        assert original is not None
        return original(tall, k, start, settings, vectors)

    monkeypatch.setattr(krylov_basis.Basis, "__init__", recorded_init)
    monkeypatch.setattr(krylov_basis.Basis, "select", recorded_select)
    original = lanczos.block_lanczos
    monkeypatch.setattr(lanczos, "block_lanczos", recorded)
    stored = _unit(with_spectrum(800, 700, power_law(700, 0.5), seed=4).to(torch.bfloat16).float())
    strict = KrylovSettings(exact_max_dim=0, tol_sigma_max=1e-9, tol_top_k=1e-3)
    top_singular_values(stored.to(torch.bfloat16)[None], 16, gaussian_start([2], 700, 32), strict)
    assert len(alive_at_retry) == 1  # the retry ran
    assert buffers and alive_at_retry == [0]


def test_the_retry_of_a_bf16_matrix_keeps_it_in_bf16(monkeypatch) -> None:
    # A matrix the bf16 products cannot vouch for is solved again with fp32 products on the bf16
    # matrix itself (the memory plan counts no float32 copy of it), to the same result as on
    # its float32 copy.
    from pss_cli.core import lanczos

    calls: list[tuple[torch.dtype, bool]] = []
    original = lanczos.block_lanczos

    def recorded(tall, k, start, settings, vectors=None):  # type: ignore[no-untyped-def]
        calls.append((tall.dtype, settings.bf16_products))
        return original(tall, k, start, settings, vectors)

    monkeypatch.setattr(lanczos, "block_lanczos", recorded)
    stored = _unit(with_spectrum(800, 700, power_law(700, 0.5), seed=4).to(torch.bfloat16).float())
    start = gaussian_start([2], 700, 32)
    # A tolerance bf16 Ritz values never meet against the fp32 ones, but fp32 products do.
    strict = KrylovSettings(exact_max_dim=0, tol_sigma_max=1e-9, tol_top_k=1e-3)
    native = top_singular_values(stored.to(torch.bfloat16)[None], 16, start, strict)
    # (spectra.py calls the first, bf16-product, pass by its own name: only the retry shows)
    assert calls == [(torch.bfloat16, False)]
    converted = top_singular_values(stored[None], 16, start, strict)  # fp32 products throughout
    assert native.exact == converted.exact == (False,)
    torch.testing.assert_close(native.values, converted.values, rtol=1e-6, atol=0.0)
