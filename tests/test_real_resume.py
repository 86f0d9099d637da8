"""Repair and resume in the real frameworks (issue #17's "done when"): a tiny GPT-2 trained by
the Hugging Face Trainer and a tiny MLP trained by Lightning, both for real on CPU; pss scans,
trends and smooths their checkpoints, and the trainers resume from the repaired checkpoint at
the halved LR (`--lr-scale 0.5`) with the smoothed weights loaded."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.checkpoint.out_names import default_output
from tests.real_runs import RunRecord, lightning_run, trainer_run

LAYER = "transformer.h.0.mlp.c_fc.weight"


def _pss(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunRecord]:
    """RUN/checkpoint-10 and RUN/checkpoint-20 of a 40-step linear schedule stopped at 20."""
    run = tmp_path_factory.mktemp("hf") / "run"
    record = trainer_run(run, max_steps=40, stop_at=20)
    assert (run / "checkpoint-20" / "optimizer.pt").is_file()
    return run, record


def _resume_lrs(run_dir: Path, checkpoint: Path) -> RunRecord:
    return trainer_run(run_dir, max_steps=40, resume_from=checkpoint, save_total_limit=1)


def test_trainer_scan_trend_smooth_and_resume_at_half_lr(
    hf_run: tuple[Path, RunRecord], tmp_path: Path
) -> None:
    run, _ = hf_run
    work = tmp_path / "run"
    shutil.copytree(run, work)
    source = work / "checkpoint-20"
    code, out, err = _pss("scan", source, "-q")
    assert code in (0, 1), err
    assert LAYER in out

    # trend suggests an output outside the run folder, the same default `pss smooth` names
    code, out, err = _pss("trend", work, "-q", "--format", "json")
    assert code in (0, 1), err
    expected_out = default_output(source)
    assert expected_out == work.with_name("run-pss-checkpoint-20")
    code, _, err = _pss("smooth", source)
    assert code == 2 and str(expected_out) in err

    code, out, err = _pss(
        "smooth", source, "--layers", LAYER, "--method", "clip", "--lr-scale", "0.5",
        "--out", expected_out, "-q", "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    scaled = report["optimizer"]["lr_scale"]
    assert scaled["verified"] is True and scaled["factor"] == 0.5
    assert any(k.startswith("scheduler.pt: base_lrs") for k in scaled["scaled"])
    assert any(k.startswith("optimizer.pt: param_groups[0].lr") for k in scaled["scaled"])

    before = load_file(str(source / "model.safetensors"))
    original = _resume_lrs(tmp_path / "resume-original", source)
    repaired = _resume_lrs(work, expected_out)  # same output_dir as the run: rotation runs
    # the LR actually used after resuming is half the original schedule's, step for step
    assert repaired.steps == original.steps and len(repaired.lrs) == 20
    for half, full in zip(repaired.lrs, original.lrs, strict=True):
        assert math.isclose(half, 0.5 * full, rel_tol=1e-9)
    # the loaded weights are the repaired file's (tied lm_head/wte included)
    written = load_file(str(expected_out / "model.safetensors"))
    for name, tensor in written.items():
        assert torch.equal(repaired.start_weights[name], tensor), name
    assert not torch.equal(before[LAYER], written[LAYER])
    # Trainer's save_total_limit rotation ran in RUN (checkpoints 30 and 40 written, older
    # ones deleted) and the repaired checkpoint, outside RUN, survived it
    assert not (work / "checkpoint-10").exists() and not source.exists()
    assert (expected_out / "model.safetensors").is_file()


def test_trainer_rotation_glob_out_is_warned(
    hf_run: tuple[Path, RunRecord], tmp_path: Path
) -> None:
    run, _ = hf_run
    work = tmp_path / "run"
    shutil.copytree(run, work)
    inside = work / "checkpoint-20-pss-smoothed"
    code, _, err = _pss(
        "smooth", work / "checkpoint-20", "--layers", LAYER, "--method", "clip", "--out", inside
    )
    assert code == 0, err
    assert "save_total_limit rotation deletes checkpoint-*" in err
    assert str(default_output(work / "checkpoint-20")) in err


@pytest.fixture(scope="module")
def lightning_ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunRecord]:
    root = tmp_path_factory.mktemp("lightning")
    record = lightning_run(root, max_steps=20, every_n_steps=10)
    return root, record


def test_lightning_ckpt_scan_trend_smooth_and_resume_at_half_lr(
    lightning_ckpts: tuple[Path, RunRecord], tmp_path: Path
) -> None:
    root, _ = lightning_ckpts
    folder = root / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt"]
    source = folder / "epoch=1-step=20.ckpt"

    # the pathlib.Path hyperparameter needs the opt-in allow-list; without it, a hint names it
    code, _, err = _pss("scan", source, "-q")
    assert code == 3 and "--allow-pickle-types" in err and "pathlib" in err
    code, out, err = _pss("scan", source, "-q", "--allow-pickle-types", "--format", "json")
    assert code in (0, 1), err
    assert {x["name"] for x in json.loads(out)["layers"]} >= {"inp.weight", "hidden.weight"}
    code, out, err = _pss("check", source, "-q", "--allow-pickle-types")
    assert code in (0, 1), err

    # trend: explicit files in the wrong order are ordered by step (from their names)
    later, earlier = folder / "epoch=1-step=20.ckpt", folder / "epoch=0-step=10.ckpt"
    code, out, err = _pss(
        "trend", later, earlier, "-q", "--allow-pickle-types", "--format", "json", "--no-cache"
    )
    assert code in (0, 1), err
    assert json.loads(out)["steps"] == [10, 20]

    out_file = tmp_path / "repaired.ckpt"
    code, out, err = _pss(
        "smooth", source, "--layers", "hidden.weight", "--method", "clip", "--lr-scale", "0.5",
        "--allow-pickle-types", "--out", out_file, "-q", "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    assert out_file.is_file()
    report = json.loads(out)
    assert report["optimizer"]["lr_scale"]["verified"] is True

    original = lightning_run(tmp_path / "a", max_steps=30, resume_from=source)
    repaired = lightning_run(tmp_path / "b", max_steps=30, resume_from=out_file)
    assert len(repaired.lrs) == 10 and repaired.steps == original.steps
    for half, full in zip(repaired.lrs, original.lrs, strict=True):
        assert math.isclose(half, 0.5 * full, rel_tol=1e-9)
    import argparse
    import pathlib

    with torch.serialization.safe_globals([pathlib.PosixPath, argparse.Namespace]):
        written = torch.load(out_file, weights_only=True)["state_dict"]
    for name, tensor in written.items():
        assert torch.equal(repaired.start_weights[name], tensor), name


def test_trainer_reset_maps_the_repaired_parameter_exactly(
    hf_run: tuple[Path, RunRecord], tmp_path: Path
) -> None:
    """Trainer's optimizer ids are its decay group then its no-decay group, each in
    named_parameters() order: pss rebuilds that order and zeroes only the repaired tensor's
    moments; the id is checked against the optimizer a real Trainer builds."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    run, _ = hf_run
    out = tmp_path / "reset"
    code, stdout, err = _pss(
        "smooth", run / "checkpoint-20", "--layers", LAYER, "--method", "clip",
        "--optimizer-state", "reset", "--out", out, "-q", "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    optimizer = json.loads(stdout)["optimizer"]
    assert optimizer["mapping"] == "exact"
    assert not any("cannot tell" in m for m in optimizer["messages"])
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    )
    args = TrainingArguments(output_dir=str(tmp_path / "x"), report_to=[], use_cpu=True)
    real = Trainer(model=model, args=args).create_optimizer()
    by_param = {id(p): n for n, p in model.named_parameters()}
    order = [by_param[id(p)] for g in real.param_groups for p in g["params"]]
    assert optimizer["reset_param_ids"] == [order.index(LAYER)]
    state = torch.load(out / "optimizer.pt", weights_only=True)["state"]
    zeroed = [i for i, s in state.items() if not s["exp_avg"].any()]
    assert zeroed == [order.index(LAYER)]


def test_lightning_reset_maps_the_repaired_parameter_exactly(
    lightning_ckpts: tuple[Path, RunRecord], tmp_path: Path
) -> None:
    root, _ = lightning_ckpts
    out = tmp_path / "reset.ckpt"
    code, stdout, err = _pss(
        "smooth", root / "checkpoints" / "epoch=1-step=20.ckpt", "--layers", "hidden.weight",
        "--method", "clip", "--optimizer-state", "reset", "--allow-pickle-types", "--out", out,
        "-q", "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    optimizer = json.loads(stdout)["optimizer"]
    # configure_optimizers(self.parameters()): inp.weight, inp.bias, hidden.weight, ...
    assert optimizer["mapping"] == "exact" and optimizer["reset_param_ids"] == [2]
