"""Smoke test of the divergence experiment (examples/divergence): the pipeline end to end on a
tiny config (train, checkpoint, pss trend, pss scan, pss smooth, resume, table, plots). It checks
that every stage runs and leaves consistent, finite output, not the scientific outcome."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "divergence"
sys.path.insert(0, str(EXAMPLE_DIR))

from experiment import (  # noqa: E402
    Arm,
    Detection,
    ExperimentConfig,
    explosion_step,
    grad_spike_step,
    pss_trend_available,
    smoothed,
    steps_to_recover,
)
from model import ModelConfig, TinyGPT  # noqa: E402
from run_experiment import run  # noqa: E402
from train import TrainConfig, load_checkpoint, train  # noqa: E402

TINY_MODEL = ModelConfig(context=16, width=32, n_layer=2, n_head=2)


def _tiny_train(**overrides: object) -> TrainConfig:
    base = TrainConfig(
        lr=1e-2,
        warmup_steps=5,
        max_steps=20,
        batch_size=4,
        save_every=10,
        eval_every=10,
        eval_batches=2,
        log_every=5,
        threads=1,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_experiment_pipeline_end_to_end(tmp_path: Path) -> None:
    exp = ExperimentConfig(
        model=TINY_MODEL,
        base=_tiny_train(),
        resume_steps=10,
        resume_eval_every=5,
        seeds=(0,),
        arms=(Arm("unchanged"), Arm("cap/reset", smooth_method="cap", optimizer_state="reset")),
        detection=Detection(window=3, ignore_first=5),
        control_lr=1e-3,
        assume_explosion_at=15,  # the tiny run need not explode: resume at 10 and 20 anyway
        workers=1,
    )
    results = run(tmp_path / "run", exp, img_dir=None)
    out = tmp_path / "run"

    # Training and HF-like checkpoints.
    for step in (10, 20):
        folder = out / "base" / f"checkpoint-{step}"
        for name in ("model.safetensors", "optimizer.pt", "trainer_state.json", "config.json"):
            assert (folder / name).is_file(), folder / name
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == step
        logged = [e for e in state["log_history"] if "loss" in e]
        assert [e["step"] for e in logged] == list(range(5, step + 1, 5))
        assert all(math.isfinite(e["loss"]) and e["grad_norm"] > 0 for e in logged)
        assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == list(
            range(10, step + 1, 10)
        )
    base = results["base"]
    assert base["steps"] == list(range(1, 21))
    assert all(math.isfinite(x) for x in base["losses"] + base["grad_norms"])

    # Warning: pss trend when it exists, else the documented per-checkpoint scan rule.
    assert set(base["spectra"]) == {"10", "20"}
    expected_source = "pss trend" if pss_trend_available() else "pss scan"
    assert base["first_warning"]["source"].startswith(expected_source)
    if pss_trend_available():
        assert (out / "analysis" / "trend.json").is_file()
        assert base["trend"]["verdict"]["status"]
        kinds = {"floor", "nonfinite", "drop", "sigma_growth"}
        assert set(base["trend"]["first_warning_by_kind"]) <= kinds
    else:
        assert base["trend"] is None
    control = results["control"]
    assert control["lr"] == 1e-3 and set(control["spectra"]) == {"10", "20"}
    assert control["steps"] == base["steps"] and control["losses"] != base["losses"]

    # Smoothing and resumes from the checkpoints around the assumed explosion.
    assert results["starts"]["pre"]["step"] == 10 and results["starts"]["post"]["step"] == 20
    smoothed_dir = out / "smoothed" / "pre" / "cap-reset" / "checkpoint-10"
    assert (smoothed_dir / "model.safetensors").is_file()
    report = json.loads((smoothed_dir.parent / "checkpoint-10.smooth.json").read_text())
    assert report["command"] == "smooth" and report["parameters"]["optimizer_state"] == "reset"
    assert len(results["runs"]) == 4  # 2 starts x 2 arms x 1 seed
    for row in results["runs"]:
        start_step = results["starts"][row["start"]]["step"]
        assert row["steps"] == list(range(start_step + 1, start_step + 11))
        assert math.isfinite(row["final_eval_loss"])
        assert row["evals"][-1][0] == start_step + 10
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + 4
    assert "| pre | cap/reset |" in table and "| post | unchanged |" in table
    assert (out / "experiment-base.png").stat().st_size > 10_000
    assert (out / "experiment-resumes.png").stat().st_size > 10_000
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(results["table"]))


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    """Resuming from checkpoint-10 with the same seed replays steps 11-20 exactly: model,
    optimizer and data position are all restored."""
    straight = train(tmp_path / "a", TINY_MODEL, _tiny_train(max_steps=20))
    resumed = train(
        tmp_path / "b",
        TINY_MODEL,
        _tiny_train(max_steps=20),
        resume_from=tmp_path / "a" / "checkpoint-10",
    )
    assert resumed.steps == list(range(11, 21))
    assert resumed.losses == straight.losses[10:]
    assert resumed.grad_norms == straight.grad_norms[10:]
    # A different data seed gives a different continuation.
    other = train(
        tmp_path / "c",
        TINY_MODEL,
        _tiny_train(max_steps=20, seed=1),
        resume_from=tmp_path / "a" / "checkpoint-10",
    )
    assert other.losses != straight.losses[10:]


def test_checkpoint_without_optimizer_resumes_fresh(tmp_path: Path) -> None:
    train(tmp_path / "a", TINY_MODEL, _tiny_train(max_steps=10))
    folder = tmp_path / "a" / "checkpoint-10"
    (folder / "optimizer.pt").unlink()  # what `pss smooth --optimizer-state drop` leaves
    model = TinyGPT(TINY_MODEL)
    optimizer = torch.optim.AdamW(model.parameters())
    step, history, restored = load_checkpoint(folder, model, optimizer)
    assert (step, restored) == (10, False)
    assert history and optimizer.state_dict()["state"] == {}


@pytest.mark.parametrize("nonfinite", [math.nan, math.inf])
def test_detectors(nonfinite: float) -> None:
    det = Detection(
        window=2, loss_jump=1.0, grad_spike_factor=10.0, grad_spike_history=3, ignore_first=0
    )
    steps = list(range(1, 9))
    assert smoothed([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    assert smoothed([1.0, nonfinite, 1.0, 1.0], 2) == [1.0, math.inf, math.inf, 1.0]
    losses = [4.0, 3.0, 2.0, 2.0, 2.0, 4.0, 5.0, 5.0]
    # Smoothed: 4, 3.5, 2.5, 2, 2, 3, 4.5: best 2, first > 3 at step 7.
    assert explosion_step(steps, losses, det) == 7
    assert explosion_step(steps, losses, replace(det, ignore_first=7)) == 8
    assert explosion_step(steps, [2.0] * 7 + [nonfinite], det) == 8
    # Against a reference (a resumed run): already above 1.5 + 1 at the first step.
    assert explosion_step(steps, [3.0] * 8, det, reference=1.5) == 1
    assert explosion_step(steps, [3.0] * 8, det, reference=2.5) is None
    grads = [1.0, 1.0, 1.0, 5.0, 1.0, 11.0, 1.0, 1.0]
    assert grad_spike_step(steps, grads, det) == 6
    assert grad_spike_step(steps, [1.0] * 4 + [nonfinite] + [1.0] * 3, det) == 5
    # Back within 2.0 for good at the third step; the later excursion above 2.0 (but not above
    # the 4.0 ceiling) does not undo it; an excursion above the ceiling does.
    assert steps_to_recover([11, 12, 13, 14], [3.0, 3.0, 1.0, 1.0], 2.0, 4.0, 1) == 3
    assert steps_to_recover([11, 12, 13, 14], [3.0, 1.0, 3.0, 1.0], 2.0, 4.0, 1) == 2
    assert steps_to_recover([11, 12, 13, 14], [3.0, 1.0, 5.0, 1.0], 2.0, 4.0, 1) == 4
    assert steps_to_recover([11, 12], [3.0, 3.0], 2.0, 4.0, 2) is None
    assert steps_to_recover([11, 12], [1.0, nonfinite], 2.0, 4.0, 1) is None
