"""`pss smooth --lr-scale` on the other training layouts, resumed by their own loaders: an
accelerate `save_state` folder (optimizer.bin + scheduler.bin, `load_state`) and a DCP folder
(`torch.distributed.checkpoint.load` + `set_state_dict`)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from typer.testing import CliRunner

from pss_cli.app import app
from tests.spectra_factory import spiky, with_spectrum


def _pss(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    with torch.no_grad():  # one collapsed matrix for the default selection to find
        model[0].weight.copy_(with_spectrum(48, 32, spiky(32, (9.0,)), seed=1).float())
    return model


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object) -> None:
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.ones(4, 32)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]


def _schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50, eta_min=1e-4)


def _accelerate_state(folder: Path, model: torch.nn.Module) -> float:
    """Train `model` a few steps under accelerate and `save_state` it; returns its last LR."""
    import accelerate  # in the `test` extra: a missing package fails, never skips

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = _schedule(optimizer)
    acc = accelerate.Accelerator(cpu=True)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    _train(model, optimizer, scheduler)
    acc.save_state(str(folder))
    return float(optimizer.param_groups[0]["lr"])


def _accelerate_resume(folder: Path, model: torch.nn.Module) -> tuple[Any, Any]:
    """The optimizer and scheduler `load_state` restores from `folder`."""
    import accelerate

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = _schedule(optimizer)
    acc = accelerate.Accelerator(cpu=True)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    acc.load_state(str(folder))
    return optimizer, scheduler


def test_accelerate_save_state_resumes_at_half_lr(tmp_path: Path) -> None:
    lr_before = _accelerate_state(tmp_path / "state", _model())
    assert (tmp_path / "state" / "scheduler.bin").is_file()

    code, out, err = _pss(
        "smooth", tmp_path / "state", "--lr-scale", "0.5", "--out", tmp_path / "fixed",
        "-q", "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["optimizer"]["lr_scale"]["verified"] is True

    optimizer, scheduler = _accelerate_resume(tmp_path / "fixed", _model())
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.5 * lr_before, rel_tol=1e-9)
    assert math.isclose(scheduler.scheduler.eta_min, 0.5e-4, rel_tol=1e-9)


def test_dcp_resumes_at_half_lr(tmp_path: Path) -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = _schedule(optimizer)
    _train(model, optimizer, scheduler)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict()},
            checkpoint_id=str(tmp_path / "dcp"),
            no_dist=True,
        )
    reference = []
    for _ in range(5):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    code, out, err = _pss(
        "smooth", tmp_path / "dcp", "--lr-scale", "0.5", "--out", tmp_path / "fixed",
        "-q", "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["optimizer"]["lr_scale"]["verified"] is True

    model2 = _model()
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    scheduler2 = _schedule(optimizer2)
    model_sd2, optim_sd2 = get_state_dict(model2, optimizer2)
    target = {"model": model_sd2, "optimizer": optim_sd2, "scheduler": scheduler2.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=str(tmp_path / "fixed"), no_dist=True)
    set_state_dict(
        model2, optimizer2, model_state_dict=target["model"], optim_state_dict=target["optimizer"]
    )
    scheduler2.load_state_dict(target["scheduler"])
    resumed = []
    for _ in range(5):
        resumed.append(optimizer2.param_groups[0]["lr"])
        optimizer2.step()
        scheduler2.step()
    for half, full in zip(resumed, reference, strict=True):
        assert math.isclose(half, 0.5 * full, rel_tol=1e-9)


def test_lr_scale_without_optimizer_state_is_refused_before_computing(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": with_spectrum(48, 32, spiky(32, (9.0,)), seed=1).float()}, str(path))
    code, _, err = _pss("smooth", path, "--lr-scale", "0.5", "--out", tmp_path / "o.safetensors")
    assert code == 2 and "--lr-scale has nothing to scale" in err
    code, _, err = _pss("smooth", path, "--lr-scale", "0", "--out", tmp_path / "o.safetensors")
    assert code == 2 and "positive" in err


def test_lr_scale_alone_on_a_healthy_checkpoint_writes_it_with_the_scaled_lr(
    tmp_path: Path,
) -> None:
    # The README's first advice: roll back to the last healthy checkpoint at a lower LR. Nothing
    # there needs smoothing, and before, smooth exited 0 with "nothing was written": the
    # --lr-scale was dropped without a word.
    def healthy() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))

    lr_before = _accelerate_state(tmp_path / "state", healthy())

    code, out, err = _pss(
        "smooth", tmp_path / "state", "--lr-scale", "0.5", "--out", tmp_path / "fixed",
        "--format", "json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["layers"] == [] and report["output"] == str(tmp_path / "fixed")
    assert report["optimizer"]["lr_scale"]["verified"] is True
    assert any("written as they are" in m for m in report["messages"])
    assert "To resume" in err  # the recipe, for the rolled-back run too
    for name in ("model.safetensors", "optimizer.bin"):
        assert (tmp_path / "fixed" / name).is_file()
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "state" / "model.safetensors"))
    after = load_file(str(tmp_path / "fixed" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the weights as they were

    optimizer, _ = _accelerate_resume(tmp_path / "fixed", healthy())
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.5 * lr_before, rel_tol=1e-9)
    # Without --lr-scale the same input still writes nothing.
    code, out, err = _pss("smooth", tmp_path / "state", "--out", tmp_path / "nothing")
    assert code == 0 and not (tmp_path / "nothing").exists()
    assert "nothing was written" in out
