"""Default cap targets (issue #17, defect 5): peers of the same known role and shape only, else
the matrix's own history from the trend cache, else the mildest edit; never the embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.config import ScanConfig
from pss_cli.repair import FALLBACK_TARGET_FACTOR, SmoothConfig, smooth_checkpoint
from tests.spectra_factory import power_law, spiky, with_spectrum


def _collapsed(m: int, n: int, seed: int) -> torch.Tensor:
    return with_spectrum(m, n, spiky(min(m, n), (12.0,)), seed).float()


def _healthy(m: int, n: int, seed: int, exponent: float = 0.3) -> torch.Tensor:
    return with_spectrum(m, n, power_law(min(m, n), exponent), seed).float()


def test_unknown_role_never_takes_its_target_from_the_embedding(tmp_path: Path) -> None:
    """Custom names (role 'other'): the head's target must not be the embedding's SR."""
    path = tmp_path / "m.safetensors"
    save_file({"emb.weight": _healthy(64, 32, 1, 0.1), "head.weight": _collapsed(64, 32, 2)}, path)
    report = smooth_checkpoint(path, None, SmoothConfig(dry_run=True))
    (layer,) = report.layers
    assert layer.name == "head.weight" and layer.role == "other"
    assert layer.target_stable_rank == FALLBACK_TARGET_FACTOR * ScanConfig().min_stable_rank
    assert "role unknown" in (layer.target_source or "")


def test_known_role_uses_peers_of_the_same_role_and_shape_only(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {
        "model.embed_tokens.weight": _healthy(64, 32, 1, 0.05),  # high SR: must not be used
        "model.layers.0.mlp.down_proj.weight": _collapsed(32, 64, 2),
        "model.layers.1.mlp.down_proj.weight": _healthy(32, 64, 3, 0.2),
        "model.layers.2.mlp.down_proj.weight": _healthy(32, 64, 4, 0.25),
        "model.layers.0.mlp.up_proj.weight": _healthy(64, 32, 5, 0.1),  # other role
    }
    save_file(tensors, path)
    report = smooth_checkpoint(path, None, SmoothConfig(dry_run=True))
    (layer,) = report.layers
    from pss_cli.pipeline import scan_checkpoint

    scan = {x.name: x.stable_rank for x in scan_checkpoint(path, ScanConfig()).layers}
    expected = sorted(
        [scan["model.layers.1.mlp.down_proj.weight"], scan["model.layers.2.mlp.down_proj.weight"]]
    )
    assert layer.target_stable_rank is not None
    assert abs(layer.target_stable_rank - sum(expected) / 2) < 1e-9
    assert "2 healthy mlp_down matrices of shape 32x64" in (layer.target_source or "")


def test_own_history_from_the_trend_cache(tmp_path: Path) -> None:
    """A healthy checkpoint-10, a collapsed checkpoint-20: after `pss trend`, smoothing
    checkpoint-20's unknown-role matrix aims at its own stable rank at step 10."""
    run = tmp_path / "run"
    for step, weight in ((10, _healthy(48, 32, 1, 0.4)), (20, _collapsed(48, 32, 2))):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        save_file({"head.weight": weight}, run / f"checkpoint-{step}" / "model.safetensors")
    result = CliRunner().invoke(app, ["trend", str(run), "-q"])
    assert result.exit_code in (0, 1), result.stderr
    report = smooth_checkpoint(run / "checkpoint-20", None, SmoothConfig(dry_run=True))
    (layer,) = report.layers
    assert layer.target_source == "its own stable rank at step 10 (trend cache)"
    from pss_cli.pipeline import scan_checkpoint

    before = scan_checkpoint(run / "checkpoint-10", ScanConfig()).layers[0].stable_rank
    assert layer.target_stable_rank is not None and before is not None
    assert abs(layer.target_stable_rank - before) < 1e-6


def test_history_is_judged_by_this_runs_threshold_not_the_caches(tmp_path: Path) -> None:
    """A cache written by `pss trend --min-stable-rank 2` holds checkpoint-15 unflagged at a
    stable rank below 5: smoothing with the default 5 must not aim at it (the "repaired"
    matrix stayed flagged), but at checkpoint-10, healthy by 5."""
    run = tmp_path / "run"
    sagging = with_spectrum(48, 32, spiky(32, (3.0,)), 3).float()  # stable rank ~3.0
    weights = ((10, _healthy(48, 32, 1, 0.4)), (15, sagging), (20, _collapsed(48, 32, 2)))
    for step, weight in weights:
        (run / f"checkpoint-{step}").mkdir(parents=True)
        save_file({"head.weight": weight}, run / f"checkpoint-{step}" / "model.safetensors")
    from pss_cli.pipeline import scan_checkpoint

    ranks = {
        s: scan_checkpoint(run / f"checkpoint-{s}", ScanConfig()).layers[0].stable_rank
        for s, _ in weights
    }
    assert ranks[15] is not None and 2 < ranks[15] < 5, ranks  # flagged at 5, not at 2
    result = CliRunner().invoke(app, ["trend", str(run), "-q", "--min-stable-rank", "2"])
    assert result.exit_code in (0, 1), result.stderr
    report = smooth_checkpoint(run / "checkpoint-20", None, SmoothConfig(dry_run=True))
    (layer,) = report.layers
    assert layer.target_source == "its own stable rank at step 10 (trend cache)"
    assert layer.target_stable_rank is not None and ranks[10] is not None
    assert abs(layer.target_stable_rank - ranks[10]) < 1e-6
