"""Verification that cannot fail on precision alone (issue #17, defect 6).

A GPT-2-like rank-one spike (sigma_1/sigma_2 = 600 over a fast-decaying tail) stored in
float32: before the float64 refinement of the changed directions (core/refine.py), `pss smooth`
computed the cap in float32 and its own verification failed ("stable rank after writing 5.6,
expected 6.1"; with --target-stable-rank 10: "8.7, expected 10").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pss_cli.config import ScanConfig
from pss_cli.core.refine import refine_float64
from pss_cli.core.smoothing import SmoothingParams
from pss_cli.core.spectra import KrylovSettings, gaussian_start, top_singular_triplets
from pss_cli.pipeline import scan_checkpoint
from pss_cli.repair import TARGET_TOLERANCE, SmoothConfig, smooth_checkpoint
from tests.safetensors_factory import write_tensors
from tests.spectra_factory import power_law, with_spectrum

M, N = 256, 1024
SPIKE = 600.0


def _spiked() -> torch.Tensor:
    values = torch.cat([torch.tensor([SPIKE], dtype=torch.float64), power_law(M - 1, 1.0)])
    return with_spectrum(M, N, values, seed=0)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    write_tensors(
        path,
        {
            "h.0.mlp.c_fc.weight": _spiked().float(),
            "h.1.mlp.c_fc.weight": with_spectrum(M, N, power_law(M, 0.5), seed=1).float(),
        },
    )
    return path


@pytest.mark.parametrize("target", [None, 10.0])
def test_float32_cap_on_a_600x_spike_is_verified(
    checkpoint: Path, tmp_path: Path, target: float | None
) -> None:
    config = SmoothConfig(params=SmoothingParams(target_stable_rank=target))
    report = smooth_checkpoint(checkpoint, tmp_path / "out.safetensors", config)
    (layer,) = report.layers
    assert layer.verified is True
    expected = target if target is not None else layer.target_stable_rank
    assert expected is not None and layer.stable_rank_after is not None
    # the stable rank reached, measured independently in float64, within the F32 tolerance
    rescan = scan_checkpoint(
        tmp_path / "out.safetensors",
        ScanConfig(include=("h.0.*",), compute_dtype="float64"),  # type: ignore[arg-type]
    )
    assert abs(rescan.layers[0].stable_rank - expected) <= TARGET_TOLERANCE["F32"] * expected


def test_float64_refinement_recovers_the_tail_energy() -> None:
    """float32 triplets imply a tail energy off by percents; refined ones by ~1e-9."""
    exact = _spiked()
    unit = exact / torch.linalg.matrix_norm(exact)
    true_tail = 1.0 - float(torch.linalg.svdvals(unit)[0] ** 2)
    start = gaussian_start([0], M, KrylovSettings().block_size)[0]
    rough = top_singular_triplets(unit.float(), 16, start, KrylovSettings())
    refined = refine_float64(unit, rough)
    rough_tail = 1.0 - float(rough.values[0].double() ** 2)
    refined_tail = 1.0 - float(refined.values[0] ** 2)
    assert abs(refined_tail - true_tail) <= 1e-9 * 1.0
    assert abs(refined_tail - true_tail) < abs(rough_tail - true_tail) / 10
