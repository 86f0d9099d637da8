"""Matrices whose values are all 0 or 1 (a causal mask or other buffer kept in a state dict) are
not weights: scan lists them as skipped with the reason, check does not fail on them, and smooth
leaves them bit-identical (it used to flag a causal mask and rewrite its zeros)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.config import ScanConfig
from pss_cli.pipeline import scan_checkpoint
from pss_cli.pipeline.plan import MASK_REASON
from pss_cli.pipeline.solve import _is_mask

T = 48


def _state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    u, v = torch.randn(64, 1, generator=generator), torch.randn(1, 64, generator=generator)
    return {
        "h.0.attn.weight": torch.randn(64, 64, generator=generator),
        "h.0.mlp.weight": torch.randn(64, 64, generator=generator) + 3.0 * u @ v,  # collapsed
        "h.0.attn.mask": torch.tril(torch.ones(T, T)),  # causal mask, stable rank ~1.2
        "h.1.attn.mask": torch.tril(torch.ones(2, T, T)),  # a stack: each matrix skipped
        "h.0.attn.window": torch.ones(T, T).triu(-4).tril(4).to(torch.bfloat16),
        "ones": torch.ones(40, 30),
        # 0/1 pattern on the Krylov path (short side above 512), stored as BF16.
        "big.mask": (torch.rand(600, 700, generator=generator) < 0.3).to(torch.bfloat16),
    }


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(_state(torch.Generator().manual_seed(0)), str(path))
    return path


def test_masks_are_skipped_with_the_reason(checkpoint: Path) -> None:
    report = scan_checkpoint(checkpoint, ScanConfig(), None)
    assert [layer.name for layer in report.layers] == ["h.0.attn.weight", "h.0.mlp.weight"]
    skipped = {entry.name: entry for entry in report.skipped}
    for name in (
        "h.0.attn.mask",
        "h.1.attn.mask[0]",
        "h.1.attn.mask[1]",
        "h.0.attn.window",
        "ones",
        "big.mask",
    ):
        assert skipped[name].reason == MASK_REASON
    assert skipped["big.mask"].dtype == "BF16" and skipped["h.1.attn.mask[0]"].shape == (2, T, T)
    assert report.summary.matrices == 2 and report.summary.flagged == 1  # the collapsed one


def test_check_fails_only_on_the_weight_and_smooth_leaves_masks_alone(
    checkpoint: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    check = json.loads(runner.invoke(app, ["check", str(checkpoint), "-f", "json"]).stdout)
    assert {finding["tensor"] for finding in check["findings"]} == {"h.0.mlp.weight"}
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["smooth", str(checkpoint), "--out", str(out), "--all"])
    assert result.exit_code == 0, result.output
    before, after = load_file(str(checkpoint)), load_file(str(out))
    assert not torch.equal(before["h.0.mlp.weight"], after["h.0.mlp.weight"])
    for name in ("h.0.attn.mask", "h.1.attn.mask", "h.0.attn.window", "ones", "big.mask"):
        assert torch.equal(before[name], after[name]), name


def test_a_torch_state_dict_mask_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(_state(torch.Generator().manual_seed(1)), path)
    data = json.loads(CliRunner().invoke(app, ["scan", str(path), "-f", "json"]).stdout)
    assert [layer["name"] for layer in data["layers"]] == ["h.0.attn.weight", "h.0.mlp.weight"]
    assert {s["name"] for s in data["skipped"] if s["reason"] == MASK_REASON} >= {
        "h.0.attn.mask",
        "big.mask",
    }


@pytest.mark.parametrize(
    "matrix",
    [
        torch.tril(torch.ones(T, T)) * 1.0000001,  # not exactly 1
        torch.tril(torch.ones(T, T)) * 0.5,  # a constant other than 1
        torch.tril(torch.ones(T, T)) - 2 * torch.eye(T),  # 0, 1 and -1
        torch.tril(torch.ones(T, T)) * 4.0,  # 0 and 4: squared norm is an integer too
        torch.eye(T) * 3.0 + torch.tril(torch.ones(T, T), -1),  # 0, 1 and 3
        torch.randn(T, T, generator=torch.Generator().manual_seed(2)),
    ],
)
def test_anything_but_zeros_and_ones_is_a_weight(matrix: torch.Tensor) -> None:
    frobenius = float(torch.linalg.vector_norm(matrix.double()))
    # The buffer arrives divided by a power of two; the test must not depend on it.
    assert not _is_mask(matrix / 8.0, frobenius)
    assert not _is_mask(matrix, frobenius)


def test_zeros_and_ones_at_any_power_of_two_scale_are_a_mask() -> None:
    mask = torch.tril(torch.ones(T, T))
    frobenius = float(torch.linalg.vector_norm(mask.double()))
    assert _is_mask(mask, frobenius) and _is_mask(mask / 32.0, frobenius)
