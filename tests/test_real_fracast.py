"""Real weights: the `fracast` PyPI package ships a model in F32 and an int8 twin (symmetric,
per-output-channel scales). Dequantized int8 spectra must match the F32 ones (.ci/run installs
it with --no-deps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pss_cli.config import ScanConfig
from pss_cli.pipeline import scan_checkpoint


def _weights() -> Path | None:
    spec = importlib.util.find_spec("fracast")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "weights"
    return folder if (folder / "model.int8.safetensors").is_file() else None


WEIGHTS = _weights()


@pytest.mark.skipif(WEIGHTS is None, reason="pip install --no-deps fracast to run this test")
def test_int8_twin_matches_float32() -> None:
    assert WEIGHTS is not None
    full = scan_checkpoint(WEIGHTS / "model.safetensors", ScanConfig())
    quantized = scan_checkpoint(WEIGHTS / "model.int8.safetensors", ScanConfig())
    by_name = {layer.name: layer for layer in full.layers}
    matched = 0
    for layer in quantized.layers:
        twin = by_name[layer.name.removesuffix(".qweight")]
        assert layer.stable_rank is not None and twin.stable_rank is not None
        # int8 rounding moves the spectrum a little: measured <= 0.15 % on this model.
        assert layer.stable_rank == pytest.approx(twin.stable_rank, rel=1e-2), layer.name
        assert layer.sigma_max == pytest.approx(twin.sigma_max, rel=1e-2), layer.name
        matched += layer.scale_tensor is not None
    assert len(quantized.layers) == len(full.layers) == 20
    assert matched == 19  # every quantized matrix; head.queries is stored in F32 in both
