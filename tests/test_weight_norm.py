"""Weight-normalised layers (torch's weight_norm: `weight_g` + `weight_v`; parametrize's
`original0` + `original1`) are analysed as the weight the model uses, g * v / ||v||, not as the
direction v alone; smooth leaves them, saying why."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.config import ScanConfig
from pss_cli.pipeline import scan_checkpoint
from pss_cli.repair import SmoothConfig, smooth_checkpoint


def _model() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A state dict with both kinds, and the weights the modules really use (from a forward)."""
    from torch.nn.utils.parametrizations import weight_norm as parametrized_weight_norm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated, still used
        conv = nn.utils.weight_norm(nn.Conv1d(24, 24, 8), name="weight", dim=2)  # Wav2Vec2's
    linear = parametrized_weight_norm(nn.Linear(40, 32))
    with torch.no_grad():
        conv.weight_g.mul_(torch.linspace(0.1, 30.0, 8).reshape(1, 1, 8))
        linear.parametrizations.weight.original0.mul_(torch.linspace(0.1, 50.0, 32)[:, None])
        conv(torch.randn(1, 24, 20))  # the pre-forward hook recomputes conv.weight from g, v
    state = {f"pos_conv.{k}": v for k, v in conv.state_dict().items()}
    state |= {f"proj.{k}": v for k, v in linear.state_dict().items()}
    used = {
        "pos_conv.weight_v": conv.weight.detach().reshape(24, -1),
        "proj.parametrizations.weight.original1": linear.weight.detach(),
    }
    return state, used


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_the_weight_the_model_uses_is_analysed(tmp_path: Path, suffix: str) -> None:
    state, used = _model()
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    report = scan_checkpoint(path, ScanConfig())
    layers = {layer.name: layer for layer in report.layers}
    assert set(layers) == set(used)
    for name, weight in used.items():
        values = torch.linalg.svdvals(weight.double())
        assert layers[name].sigma_max == pytest.approx(float(values[0]), rel=1e-5)
        expected = float(weight.double().square().sum() / values[0] ** 2)
        assert layers[name].stable_rank == pytest.approx(expected, rel=1e-5)
    assert layers["pos_conv.weight_v"].scale_tensor == "pos_conv.weight_g"
    reasons = {entry.name: entry.reason for entry in report.skipped}
    assert reasons["pos_conv.weight_g"].startswith("weight-norm magnitude g of 'pos_conv.weight_v'")
    assert "proj.parametrizations.weight.original0" in reasons


def test_smooth_leaves_a_weight_normalised_layer_and_says_why(tmp_path: Path) -> None:
    state, _ = _model()
    path = tmp_path / "model.pt"
    torch.save(state, path)
    report = smooth_checkpoint(
        path,
        tmp_path / "out.pt",
        SmoothConfig(layers=("proj.parametrizations.weight.original1",)),
    )
    assert report.layers == ()
    (left,) = report.not_smoothed
    assert "weight-normalised" in left.reason and "remove_weight_norm" in left.reason
    result = CliRunner().invoke(app, ["scan", str(path), "-f", "json"])
    assert json.loads(result.stdout)["summary"]["matrices"] == 2
