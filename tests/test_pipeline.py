"""scan_checkpoint end to end on files written here: dtypes, views, flags, determinism."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pss_cli.config import ComputeDtype, ScanConfig
from pss_cli.pipeline import matrix_seed, scan_checkpoint
from pss_cli.report.json_report import render_json
from tests.safetensors_factory import write_index, write_tensors
from tests.spectra_factory import flat_bulk, power_law, spiky, with_spectrum

SMALL = ScanConfig()  # exact path for everything below 512 on the short side
FORCE_KRYLOV = ScanConfig(exact_max_dim=0)


def _exact_top(matrix: torch.Tensor, k: int = 16) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.to(torch.float64))[:k]


def _layer(report, name: str, index: int | None = None):
    return next(x for x in report.layers if x.name == name and x.index == index)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("config", [SMALL, FORCE_KRYLOV], ids=["exact-path", "krylov"])
def test_every_float_dtype_matches_exact(tmp_path: Path, dtype: torch.dtype, config) -> None:
    weight = with_spectrum(700, 600, power_law(600), seed=1).to(dtype)
    path = write_tensors(tmp_path / "m.safetensors", {"layers.0.mlp.up_proj.weight": weight})
    report = scan_checkpoint(path, config)
    layer = report.layers[0]
    stored = weight.to(torch.float64)  # the reference is the stored (rounded) matrix
    reference = _exact_top(stored)
    assert (
        layer.dtype
        == {
            torch.float16: "F16",
            torch.bfloat16: "BF16",
            torch.float32: "F32",
            torch.float64: "F64",
        }[dtype]
    )
    assert abs(layer.sigma_max - reference[0].item()) / reference[0].item() <= 1e-3
    top = torch.tensor(layer.top_singular_values, dtype=torch.float64)
    assert ((top - reference) / reference).abs().max() <= 1e-2
    frob = torch.linalg.vector_norm(stored).item()
    assert layer.frobenius_norm == pytest.approx(frob, rel=1e-12)
    assert layer.stable_rank == pytest.approx(frob**2 / reference[0].item() ** 2, rel=2e-3)
    assert layer.role == "mlp_up" and layer.block == 0


def test_conv_and_stacked_views(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(32, 16, 3, 3, generator=g)
    experts = torch.stack(
        [
            with_spectrum(48, 40, s, seed=i).float()
            for i, s in enumerate([power_law(40), spiky(40, (9.0,))])
        ]
    )
    path = write_tensors(
        tmp_path / "m.safetensors",
        {
            "encoder.conv1.weight": conv,
            "model.layers.1.mlp.experts.down_proj": experts,
        },
    )
    report = scan_checkpoint(path, SMALL)
    conv_layer = _layer(report, "encoder.conv1.weight")
    assert conv_layer.view == "conv" and conv_layer.matrix_shape == (32, 144)
    assert conv_layer.sigma_max == pytest.approx(
        _exact_top(conv.reshape(32, 144))[0].item(), rel=1e-6
    )
    for index in range(2):
        expert = _layer(report, "model.layers.1.mlp.experts.down_proj", index)
        assert expert.view == "stacked" and expert.matrix_shape == (48, 40)
        assert expert.sigma_max == pytest.approx(_exact_top(experts[index])[0].item(), rel=1e-6)
    assert _layer(report, "model.layers.1.mlp.experts.down_proj", 1).flags == ("low_stable_rank",)


def test_nonfinite_and_zero_matrices_are_flagged_and_the_scan_goes_on(tmp_path: Path) -> None:
    bad = torch.randn(20, 30)
    bad[3, 4] = float("nan")
    bad[5, 6] = float("inf")
    path = write_tensors(
        tmp_path / "m.safetensors",
        {
            "a.weight": bad,
            "b.weight": torch.zeros(20, 30),
            "c.weight": torch.randn(20, 30),
        },
    )
    report = scan_checkpoint(path, SMALL)
    a, b, c = (_layer(report, n) for n in ("a.weight", "b.weight", "c.weight"))
    assert a.nonfinite_count == 2 and a.flags == ("nonfinite",)
    assert a.sigma_max is None and a.stable_rank is None and a.frobenius_norm is None
    assert b.flags == ("zero_matrix",) and b.sigma_max == 0.0 and b.stable_rank is None
    assert c.flags == () and c.stable_rank is not None
    assert report.summary.nonfinite_matrices == 1
    text = render_json(report)
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)


def test_skipped_tensors_carry_reasons(tmp_path: Path) -> None:
    path = write_tensors(
        tmp_path / "m.safetensors",
        {
            "ln.weight": torch.ones(8),
            "q.weight": torch.zeros(4, 4, dtype=torch.int8),
            "row.weight": torch.randn(1, 9),
            "ok.weight": torch.randn(6, 5),
        },
    )
    report = scan_checkpoint(path, SMALL)
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["ln.weight"].startswith("1-D")
    assert "I8" in reasons["q.weight"]
    assert "dimension of 1" in reasons["row.weight"]
    assert [x.name for x in report.layers] == ["ok.weight"]


def test_include_exclude(tmp_path: Path) -> None:
    tensors = {f"h.{i}.attn.c_attn.weight": torch.randn(8, 24) for i in range(3)}
    tensors["h.0.mlp.c_fc.weight"] = torch.randn(8, 32)
    path = write_tensors(tmp_path / "m.safetensors", tensors)
    report = scan_checkpoint(path, replace(SMALL, include=("*attn*",), exclude=("h.1.*",)))
    assert [x.name for x in report.layers] == ["h.0.attn.c_attn.weight", "h.2.attn.c_attn.weight"]


def test_sharded_checkpoint(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    first = {"h.0.w": torch.randn(10, 12, generator=g)}
    second = {"h.1.w": torch.randn(12, 10, generator=g), "h.1.b": torch.randn(10, generator=g)}
    write_tensors(tmp_path / "model-00001-of-00002.safetensors", first)
    write_tensors(tmp_path / "model-00002-of-00002.safetensors", second)
    write_index(
        tmp_path / "model.safetensors.index.json",
        {
            "h.0.w": "model-00001-of-00002.safetensors",
            "h.1.w": "model-00002-of-00002.safetensors",
            "h.1.b": "model-00002-of-00002.safetensors",
        },
    )
    report = scan_checkpoint(tmp_path, SMALL)
    assert report.layout == "sharded"
    assert {(x.name, x.file) for x in report.layers} == {
        ("h.0.w", "model-00001-of-00002.safetensors"),
        ("h.1.w", "model-00002-of-00002.safetensors"),
    }


def _mixed_checkpoint(tmp_path: Path) -> Path:
    tensors = {}
    for i, spectrum in enumerate([flat_bulk(600), power_law(600), spiky(600)]):
        tensors[f"layers.{i}.w"] = with_spectrum(640, 600, spectrum, seed=i).float()
        tensors[f"layers.{i}.wt"] = tensors[f"layers.{i}.w"].T.contiguous() * 2
    return write_tensors(tmp_path / "m.safetensors", tensors)


def _without_timings(report) -> dict:
    data = json.loads(render_json(report))
    del data["timings"]
    return data


def test_same_seed_same_json_and_batching_does_not_matter(tmp_path: Path) -> None:
    path = _mixed_checkpoint(tmp_path)
    one = scan_checkpoint(path, FORCE_KRYLOV)
    two = scan_checkpoint(path, FORCE_KRYLOV)
    assert _without_timings(one) == _without_timings(two)
    # One matrix per batch instead of all six in one: results must not change beyond rounding.
    tiny_batches = scan_checkpoint(path, replace(FORCE_KRYLOV, cpu_batch_bytes=1))
    for a, b in zip(one.layers, tiny_batches.layers, strict=True):
        assert a.name == b.name
        assert b.sigma_max == pytest.approx(a.sigma_max, rel=1e-5)
        assert b.stable_rank == pytest.approx(a.stable_rank, rel=1e-5)


def test_other_seed_changes_only_rounding(tmp_path: Path) -> None:
    path = _mixed_checkpoint(tmp_path)
    one = scan_checkpoint(path, FORCE_KRYLOV)
    other = scan_checkpoint(path, replace(FORCE_KRYLOV, seed=123))
    for a, b in zip(one.layers, other.layers, strict=True):
        assert b.sigma_max == pytest.approx(a.sigma_max, rel=2e-3)


def test_float64_compute_and_exact_mode(tmp_path: Path) -> None:
    path = _mixed_checkpoint(tmp_path)
    exact = scan_checkpoint(path, replace(SMALL, exact=True))
    assert exact.method == "exact"
    assert all(x.entropy_effective_rank is not None for x in exact.layers)
    f64 = scan_checkpoint(path, replace(FORCE_KRYLOV, compute_dtype=ComputeDtype.FLOAT64))
    for a, b in zip(exact.layers, f64.layers, strict=True):
        assert b.sigma_max == pytest.approx(a.sigma_max, rel=1e-3)
        assert b.entropy_effective_rank is None


def test_matrix_seed_is_stable() -> None:
    # Pinned: changing it would silently change every report's numbers for a given --seed.
    assert matrix_seed(0, "a", None) == matrix_seed(0, "a", None)
    assert matrix_seed(0, "a", None) != matrix_seed(1, "a", None)
    assert matrix_seed(0, "a", 0) != matrix_seed(0, "a", 1)


def test_a_float64_norm_beyond_2_to_the_1023_is_scaled_back(tmp_path: Path) -> None:
    # unit_scale(norm) = 2**1024 is not a float: the scan failed with "math range error".
    weight = with_spectrum(64, 48, power_law(48), seed=0) * 2e307
    path = write_tensors(tmp_path / "m.safetensors", {"w": weight})
    layer = scan_checkpoint(path, SMALL).layers[0]
    expected = float(torch.linalg.svdvals(weight / 1e300)[0]) * 1e300
    assert layer.sigma_max == pytest.approx(expected, rel=1e-6)


def test_huge_float64_values_do_not_overflow_float32(tmp_path: Path) -> None:
    weight = with_spectrum(40, 30, power_law(30), seed=0) * 1e300
    path = write_tensors(tmp_path / "m.safetensors", {"w": weight})
    layer = scan_checkpoint(path, SMALL).layers[0]
    assert layer.sigma_max == pytest.approx(1e300, rel=1e-5)
    assert layer.stable_rank == pytest.approx(float((power_law(30) ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [SMALL, FORCE_KRYLOV], ids=["exact-path", "krylov"])
@pytest.mark.parametrize("magnitude", [1e38, 1e-39], ids=["norm-above-dtype-max", "subnormal"])
def test_extreme_but_finite_entries_give_exact_values(
    tmp_path: Path, dtype: torch.dtype, config: ScanConfig, magnitude: float
) -> None:
    # Finite entries whose norm is above the dtype's largest value: the power-of-two unit
    # scale (2**129) once became inf in float32, the matrix zeros, and the layer was reported
    # with no sigma_max and no flag (so `pss check --max-sigma-max` passed it). At the other
    # end, subnormal entries (below 1.2e-38).
    spectrum = torch.linspace(1.0, 0.5, 96, dtype=torch.float64)  # ||W||_F = 7.6 sigma_1
    weight = (with_spectrum(160, 96, spectrum, seed=1) * magnitude).to(dtype)
    assert bool(torch.isfinite(weight).all())
    path = write_tensors(tmp_path / "m.safetensors", {"w": weight})
    layer = scan_checkpoint(path, config).layers[0]
    exact = torch.linalg.svdvals(weight.to(torch.float64))
    assert not {"nonfinite", "zero"} & {str(flag) for flag in layer.flags}
    assert layer.sigma_max == pytest.approx(float(exact[0]), rel=1e-3)
    frobenius = float(torch.linalg.vector_norm(weight.to(torch.float64)))
    assert layer.stable_rank == pytest.approx((frobenius / float(exact[0])) ** 2, rel=2e-3)


def test_samples_flag_exactly_the_collapsed_layers() -> None:
    samples = Path(__file__).resolve().parent.parent / "sample_checkpoints"
    healthy = scan_checkpoint(samples / "healthy" / "model.safetensors", SMALL)
    diverged = scan_checkpoint(samples / "diverged" / "model.safetensors", SMALL)
    assert healthy.summary.flagged == 0
    assert {x.name for x in diverged.layers if x.flags} == {
        "transformer.h.2.mlp.c_fc.weight",
        "transformer.h.3.mlp.c_fc.weight",
        "transformer.h.3.attn.c_attn.weight",
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scan_matches_cpu(tmp_path: Path) -> None:
    path = _mixed_checkpoint(tmp_path)
    cpu = scan_checkpoint(path, replace(FORCE_KRYLOV, device="cpu"))
    gpu = scan_checkpoint(path, replace(FORCE_KRYLOV, device="cuda"))
    assert gpu.device.startswith("cuda")
    for a, b in zip(cpu.layers, gpu.layers, strict=True):
        assert b.sigma_max == pytest.approx(a.sigma_max, rel=1e-3)
        assert b.frobenius_norm == pytest.approx(a.frobenius_norm, rel=1e-9)


def test_quantized_weights_with_a_scale_are_dequantized(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    weight = with_spectrum(96, 64, power_law(64), seed=4).float()
    scale = weight.abs().amax(dim=1, keepdim=True) / 127.0  # (96, 1) per output channel
    q = torch.round(weight / scale).to(torch.int8)
    fp8 = weight.to(torch.float8_e4m3fn)
    path = write_tensors(
        tmp_path / "q.safetensors",
        {
            "layers.0.mlp.up_proj.weight.qweight": q,
            "layers.0.mlp.up_proj.weight.scale": scale,
            "layers.1.mlp.down_proj.weight": fp8,
            "layers.1.mlp.down_proj.weight_scale": torch.ones(()),
            "layers.2.lonely.weight": torch.randint(-5, 5, (8, 8), generator=g).to(torch.int8),
        },
    )
    report = scan_checkpoint(path, SMALL)
    up = _layer(report, "layers.0.mlp.up_proj.weight.qweight")
    assert up.role == "mlp_up" and up.dtype == "I8"
    assert up.scale_tensor == "layers.0.mlp.up_proj.weight.scale"
    dequantized = q.double() * scale.double()
    assert up.sigma_max == pytest.approx(_exact_top(dequantized)[0].item(), rel=1e-6)
    down = _layer(report, "layers.1.mlp.down_proj.weight")
    assert down.scale_tensor == "layers.1.mlp.down_proj.weight_scale"
    assert down.sigma_max == pytest.approx(_exact_top(fp8.double())[0].item(), rel=1e-6)
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["layers.0.mlp.up_proj.weight.scale"].startswith("scale of quantized")
    assert "without a scale tensor found" in reasons["layers.2.lonely.weight"]


def test_asymmetric_and_block_wise_quantization_are_dequantized(tmp_path: Path) -> None:
    # compressed-tensors' asymmetric uint8 (per-row scale and zero point): ignoring the zero
    # point analysed q ~ 128 + W / s, a rank-1 spike (stable rank 1.15 instead of ~20).
    weight = with_spectrum(96, 64, power_law(64), seed=5).float()
    low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    scale = (high - low) / 255.0
    zero = torch.round(-low / scale).clamp(0, 255)
    q = torch.round(weight / scale + zero).clamp(0, 255).to(torch.uint8)
    # DeepSeek-V3-style FP8 with one float32 `weight_scale_inv` per 128 x 128 block (partial
    # blocks at the edges: 300 x 200 -> 3 x 2 scales), multiplied in.
    big = with_spectrum(300, 200, power_law(200), seed=6).float()
    block_scale = torch.tensor([[0.5, 2.0], [1.0, 0.25], [4.0, 1.0]])
    tiled = block_scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    fp8 = (big / tiled).to(torch.float8_e4m3fn)
    # Group-wise asymmetric (a scale and a zero point per 128 columns of each row): the zero
    # point tiles like its scale (it was once dropped, a rank-1 artefact again).
    grouped = with_spectrum(64, 512, power_law(64), seed=7).float()
    groups = grouped.reshape(64, 4, 128)
    g_low, g_high = groups.amin(-1), groups.amax(-1)
    g_scale = (g_high - g_low) / 255.0
    g_zero = torch.round(-g_low / g_scale).clamp(0, 255)
    g_q = (
        torch.round(groups / g_scale[..., None] + g_zero[..., None])
        .clamp(0, 255)
        .reshape(64, 512)
        .to(torch.uint8)
    )
    path = write_tensors(
        tmp_path / "q.safetensors",
        {
            "l0.mlp.up_proj.weight": q,
            "l0.mlp.up_proj.weight_scale": scale,
            "l0.mlp.up_proj.weight_zero_point": zero.to(torch.uint8),
            "l1.mlp.down_proj.weight": fp8,
            "l1.mlp.down_proj.weight_scale_inv": block_scale,
            "l2.mlp.up_proj.weight": g_q,
            "l2.mlp.up_proj.weight_scale": g_scale,
            "l2.mlp.up_proj.weight_zero_point": g_zero.to(torch.uint8),
            "l3.mlp.up_proj.weight": q.clone(),
            "l3.mlp.up_proj.weight_scale": scale.clone(),
            "l3.mlp.up_proj.weight_zero_point": torch.zeros(3, 5, dtype=torch.uint8),
        },
    )
    report = scan_checkpoint(path, SMALL)
    group = _layer(report, "l2.mlp.up_proj.weight")
    tile = torch.repeat_interleave
    g_reference = (g_q.double() - tile(g_zero.double(), 128, 1)) * tile(g_scale.double(), 128, 1)
    assert group.sigma_max == pytest.approx(_exact_top(g_reference)[0].item(), rel=1e-6)
    g_float_rank = float((power_law(64) ** 2).sum() / power_law(64)[0] ** 2)
    assert group.stable_rank == pytest.approx(g_float_rank, rel=0.05)
    up = _layer(report, "l0.mlp.up_proj.weight")
    dequantized = (q.double() - zero.double()) * scale.double()
    assert up.sigma_max == pytest.approx(_exact_top(dequantized)[0].item(), rel=1e-6)
    frobenius = float(dequantized.norm())
    assert up.stable_rank == pytest.approx((frobenius / up.sigma_max) ** 2, rel=1e-6)
    # The float weights' spectrum (8-bit rounding aside), not a zero-point spike.
    float_stable_rank = float((power_law(64) ** 2).sum() / power_law(64)[0] ** 2)
    assert up.stable_rank == pytest.approx(float_stable_rank, rel=0.05)
    down = _layer(report, "l1.mlp.down_proj.weight")
    assert down.scale_tensor == "l1.mlp.down_proj.weight_scale_inv"
    reference = fp8.double() * tiled.double()
    assert down.sigma_max == pytest.approx(_exact_top(reference)[0].item(), rel=1e-6)
    reasons = {x.name: x.reason for x in report.skipped}
    assert reasons["l0.mlp.up_proj.weight_zero_point"].startswith("zero point of quantized")
    # A zero point that fits neither the tensor nor its scale: skipped, never ignored.
    assert "does not fit its scale" in reasons["l3.mlp.up_proj.weight"]
    assert reasons["l1.mlp.down_proj.weight_scale_inv"].startswith("scale of quantized")


def test_quantization_metadata_is_never_analysed_as_a_weight(tmp_path: Path) -> None:
    # GPTQ/AWQ: int32-packed qweight, and 2-D float16 `scales` (groups x out) that once were
    # analysed as an MLP matrix, flagged, and rewritten by `pss smooth`.
    g = torch.Generator().manual_seed(7)
    n = "model.layers.0.mlp.up_proj"
    path = write_tensors(
        tmp_path / "gptq.safetensors",
        {
            f"{n}.qweight": torch.randint(-(2**31), 2**31 - 1, (64, 256), generator=g).int(),
            f"{n}.qzeros": torch.randint(0, 2**31 - 1, (4, 32), generator=g).int(),
            f"{n}.scales": (torch.rand(4, 256, generator=g) * 0.01 + 0.01).half(),
            f"{n}.g_idx": torch.arange(512, dtype=torch.int32) // 128,
            "model.layers.0.self_attn.k_proj.weight.absmax": torch.rand(8, 8, generator=g),
            "model.layers.0.mlp.gate_proj.input_scale": torch.rand(4, 4, generator=g),
            "model.layers.0.mlp.down_proj.weight": with_spectrum(
                64, 48, power_law(48), seed=8
            ).float(),
        },
    )
    report = scan_checkpoint(path, SMALL)
    assert [x.name for x in report.layers] == ["model.layers.0.mlp.down_proj.weight"]
    reasons = {x.name: x.reason for x in report.skipped}
    assert reasons[f"{n}.qweight"].startswith("packed quantized weights")
    # In a float checkpoint the same names are the model's own weights.
    float_only = write_tensors(
        tmp_path / "float.safetensors",
        {"m.attn.scale": with_spectrum(32, 24, power_law(24), seed=9).float()},
    )
    assert [x.name for x in scan_checkpoint(float_only, SMALL).layers] == ["m.attn.scale"]
    for name in (
        f"{n}.scales",
        f"{n}.qzeros",
        "model.layers.0.self_attn.k_proj.weight.absmax",
        "model.layers.0.mlp.gate_proj.input_scale",
    ):
        assert reasons[name].startswith("quantization metadata"), name


def test_files_beside_an_index_that_it_does_not_name_are_reported(tmp_path: Path) -> None:
    import shutil

    samples = Path(__file__).resolve().parent.parent / "sample_checkpoints"
    for file in (samples / "sharded").iterdir():
        shutil.copy(file, tmp_path / file.name)
    shutil.copy(samples / "diverged" / "model.safetensors", tmp_path / "consolidated.safetensors")
    report = scan_checkpoint(tmp_path, SMALL)
    stray = [s for s in report.skipped if s.file == "consolidated.safetensors"]
    assert len(stray) == 1 and "not named by the index" in stray[0].reason
    assert report.summary.flagged == 0  # the index's tensors only


def test_stacked_fp8_experts_with_a_block_scale_per_expert(tmp_path: Path) -> None:
    # transformers 5 keeps DeepSeek-V3's FP8 experts stacked: `experts.gate_up_proj` (E, m, n)
    # with `experts.gate_up_proj_scale_inv` (E, ceil(m/128), ceil(n/128)). Each expert is
    # dequantized with its own block grid (they were skipped as "without a scale tensor found",
    # and check passed without analysing a routed expert).
    experts = torch.stack(
        [
            with_spectrum(300, 200, power_law(200, 0.4 + 0.2 * e), seed=10 + e).float()
            for e in range(3)
        ]
    )
    generator = torch.Generator().manual_seed(3)
    block_scale = torch.rand(3, 3, 2, generator=generator) * 4 + 0.25
    tiled = block_scale.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :300, :200]
    fp8 = (experts / tiled).to(torch.float8_e4m3fn)
    name = "model.layers.3.mlp.experts.gate_up_proj"
    path = write_tensors(
        tmp_path / "moe.safetensors", {name: fp8, f"{name}_scale_inv": block_scale}
    )
    report = scan_checkpoint(path, SMALL)
    assert [(x.name, x.index) for x in report.layers] == [(name, e) for e in range(3)]
    for e, layer in enumerate(report.layers):
        assert layer.scale_tensor == f"{name}_scale_inv"
        reference = fp8[e].double() * tiled[e].double()
        assert layer.sigma_max == pytest.approx(_exact_top(reference)[0].item(), rel=1e-6)
        frobenius = float(reference.norm())
        assert layer.stable_rank == pytest.approx((frobenius / layer.sigma_max) ** 2, rel=1e-6)
    reasons = {x.name: x.reason for x in report.skipped}
    assert reasons[f"{name}_scale_inv"].startswith("scale of quantized")
