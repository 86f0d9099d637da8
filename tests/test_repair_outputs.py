"""Issue #17 defects 1, 2, 7 and 8 on small synthetic checkpoints: output checks before any
computation, stale staging entries, default output names and rotation, one-file torch outputs,
modes, plurals, hints (the real-framework replays are in tests/test_real_resume.py)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import pss_cli.repair as repair
from pss_cli.app import app
from pss_cli.checkpoint.out_names import default_output, rotation_risk
from pss_cli.errors import UsageError, count
from pss_cli.repair import SmoothConfig, smooth_checkpoint
from tests.format_factory import COLLAPSED, model_state


def _pss(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "model.safetensors"
    path.parent.mkdir()
    save_file(model_state(), str(path))
    return path


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any scan (the computation) fails the test: refusals must come before it."""

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the computation started before the refusal")

    monkeypatch.setattr(repair, "scan_checkpoint", forbidden)


def test_unwritable_out_folder_is_refused_before_computing(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_compute: None
) -> None:
    import pss_cli.checkpoint.out_checks as out_checks

    def read_only(*_a: object, **_k: object) -> tuple[int, str]:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(out_checks.tempfile, "mkstemp", read_only)
    with pytest.raises(UsageError, match=r"is not writable \(Read-only file system"):
        smooth_checkpoint(model, tmp_path / "out.safetensors", SmoothConfig())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0500 folder anyway")
def test_unwritable_out_folder_by_permissions(model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, _, err = _pss("smooth", model, "--out", folder / "x.safetensors")
    finally:
        folder.chmod(0o700)
    assert code == 2 and "is not writable" in err


def test_existing_out_is_refused_before_computing(
    model: Path, tmp_path: Path, no_compute: None
) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(UsageError, match="already exists"):
        smooth_checkpoint(model, out, SmoothConfig())


def test_file_out_inside_a_checkpoint_folder_is_refused(model: Path, no_compute: None) -> None:
    (model.parent / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="second weights file inside the checkpoint folder"):
        smooth_checkpoint(model, model.parent / "smoothed.safetensors", SmoothConfig())
    # and the default output of such a file leaves the folder
    assert default_output(model) == model.parent.with_name("in-pss-model.safetensors")


def test_concurrent_run_into_the_same_out_is_refused_before_computing(
    model: Path, tmp_path: Path, no_compute: None
) -> None:
    out = tmp_path / "out.safetensors"
    # a live process (this test's child) owns a staging entry for OUT
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".out.safetensors.pss-tmp-{child.pid}-abc.safetensors").write_bytes(b"")
        with pytest.raises(UsageError, match="another pss process is writing"):
            smooth_checkpoint(model, out, SmoothConfig())
    finally:
        child.kill()
        child.wait()


def test_stale_staging_is_named_and_removed_with_clean_stale(model: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its PID is gone: what a SIGKILLed run leaves
    stale = tmp_path / f".other.pss-tmp-{dead.pid}-xyz"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    code, out, err = _pss("smooth", model, "--out", tmp_path / "a.safetensors")
    assert code == 0, err
    assert "1 stale staging entry left by killed pss runs" in out and stale.name in out
    assert stale.exists()
    code, out, err = _pss("smooth", model, "--out", tmp_path / "b.safetensors", "--clean-stale")
    assert code == 0, err
    assert "removed 1 stale staging entry" in out and not stale.exists()


def test_output_file_mode_is_kept(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(model_state(), str(folder / "model.safetensors"))
    (folder / "model.safetensors").chmod(0o600)
    code, _, err = _pss("smooth", folder, "--out", tmp_path / "out", "-q")
    assert code == 0, err
    mode = stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode)
    assert mode == 0o600


def test_torch_file_to_ckpt_out_is_a_file_and_ckpt_is_read(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    torch.save({"state_dict": model_state(), "global_step": 7}, source)
    out = tmp_path / "smoothed.ckpt"
    code, _, err = _pss("smooth", source, "--out", out, "-q")
    assert code == 0, err
    assert out.is_file()
    code, stdout, err = _pss("scan", out, "-q", "--format", "json")
    assert code == 0, err
    assert COLLAPSED in {x["name"] for x in json.loads(stdout)["layers"]}


def test_allow_pickle_types_is_opt_in(tmp_path: Path) -> None:
    source = tmp_path / "run.ckpt"
    hparams = {"data": pathlib.Path("/data"), "args": argparse.Namespace(lr=1)}
    torch.save({"state_dict": model_state(), "hyper_parameters": hparams}, source)
    code, _, err = _pss("scan", source, "-q")
    assert code == 3 and "pathlib" in err and "--allow-pickle-types" in err
    assert _pss("scan", source, "-q", "--allow-pickle-types")[0] == 0
    # a global outside the list stays refused, with the convert advice
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": model_state(), "x": subprocess.Popen}, evil)
    code, _, err = _pss("scan", evil, "-q", "--allow-pickle-types")
    assert code == 3 and "Popen" in err and "--allow-pickle-types" not in err


def test_trend_reads_lightning_step_names_and_global_step(tmp_path: Path) -> None:
    from pss_cli.trend.discovery import discover_run, step_from_name

    assert step_from_name("epoch=3-step=120.ckpt") == 120
    assert step_from_name("step=40.ckpt") == 40
    assert step_from_name("epoch=0-step=10-v1.ckpt") == 10
    first, second = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    torch.save({"state_dict": model_state(), "global_step": 100}, first)
    torch.save({"state_dict": model_state(), "global_step": 20}, second)
    run = discover_run([first, second])  # argument order is not step order
    assert [(c.path.name, c.step, c.step_source) for c in run.checkpoints] == [
        ("b.ckpt", 20, "global_step"),
        ("a.ckpt", 100, "global_step"),
    ]


def test_default_output_and_rotation_risk(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-20").mkdir()
    assert default_output(run / "checkpoint-20") == tmp_path / "run-pss-checkpoint-20"
    assert rotation_risk(default_output(run / "checkpoint-20")) is None
    assert rotation_risk(run / "checkpoint-20-pss-smoothed") is not None
    assert rotation_risk(run / "smoothed") is None
    lonely = tmp_path / "w.safetensors"
    assert default_output(lonely) == tmp_path / "w-pss-smoothed.safetensors"
    # trend's suggested command uses the same default
    from pss_cli.trend.analysis import _commands

    class Status:
        path = str(run / "checkpoint-20")

    (command,) = _commands(Status(), None, ("a.weight",))  # type: ignore[arg-type]
    assert str(tmp_path / "run-pss-checkpoint-20") in command


def test_scan_hint_quotes_paths_and_counts_what_smooth_changes(tmp_path: Path) -> None:
    folder = tmp_path / "my model"
    folder.mkdir()
    state = model_state()
    # a collapsed embedding: flagged by scan, but never smoothed by default
    state["model.embed_tokens.weight"] = torch.outer(torch.ones(50), torch.ones(24)) + 1e-3 * (
        torch.randn(50, 24, generator=torch.Generator().manual_seed(0))
    )
    save_file(state, str(folder / "model.safetensors"))
    code, _, err = _pss("scan", folder)
    assert code == 0, err
    assert "'" + str(folder) + "'" in err
    dry = _pss("smooth", folder, "--dry-run", "--format", "json", "-q")
    changed = len(json.loads(dry[1])["layers"])
    assert changed == 1
    assert f"the {count(changed, 'matrix', 'matrices')} with a low stable rank" in err
    assert "1 matrix with" in err


def test_plurals() -> None:
    assert count(1, "error") == "1 error" and count(2, "error") == "2 errors"
    assert count(1, "matrix", "matrices") == "1 matrix"
    assert count(0, "matrix", "matrices") == "0 matrices"


def test_check_output_unwritable_uses_checks_exit_codes(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pss_cli.report.files as files

    def read_only(*_a: object, **_k: object) -> tuple[int, str]:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    code, _, err = _pss("check", model, "-o", tmp_path / "report.txt", "-q")
    assert code == 2 and "not writable" in err


def test_all_without_target_on_healthy_matrices_says_why(tmp_path: Path) -> None:
    state = model_state()
    del state[COLLAPSED]
    path = tmp_path / "healthy.safetensors"
    save_file(state, str(path))
    code, out, err = _pss("smooth", path, "--all", "--out", tmp_path / "o.safetensors")
    assert code == 0, err
    assert "nothing to change" in out and "pass --target-stable-rank" in out


def test_tied_lm_head_in_layers_names_the_embedding(tmp_path: Path) -> None:
    folder = tmp_path / "gpt"
    folder.mkdir()
    state = {
        "transformer.wte.weight": torch.randn(64, 32, generator=torch.Generator().manual_seed(1)),
        "transformer.h.0.mlp.c_fc.weight": torch.randn(32, 128),
    }
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    code, _, err = _pss("smooth", folder, "--layers", "lm_head.weight", "--dry-run")
    assert code == 2
    assert "tied to 'transformer.wte.weight'" in err and "--layers 'transformer.wte.weight'" in err


def test_lr_scale_with_dropped_optimizer_state_is_refused_before_computing(
    model: Path, tmp_path: Path, no_compute: None
) -> None:
    # It gave three outcomes on three layouts: a claimed-but-ineffective halving (HF), a
    # "bug in pss" verification failure (Lightning), "nothing to scale" (DCP).
    code, _, err = _pss(
        "smooth", model, "--out", tmp_path / "o", "--optimizer-state", "drop", "--lr-scale", "0.5"
    )
    assert code == 2 and "--optimizer-state drop does not write" in err
    assert not (tmp_path / "o").exists()


def test_quiet_keeps_the_rotation_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    save_file(model_state(), str(run / "checkpoint-10" / "model.safetensors"))
    out = run / "checkpoint-10-pss-smoothed"
    code, _, err = _pss("smooth", run / "checkpoint-10", "--out", out, "-q", "-f", "json")
    assert code == 0
    assert "warning:" in err and "rotation" in err


def test_torch_weights_beside_safetensors_are_left_out_of_the_output(tmp_path: Path) -> None:
    # A folder with model.safetensors and a pytorch_model.bin of the same (collapsed) weights:
    # pss reads and repairs the safetensors; the .bin copied unchanged would keep the collapsed
    # weights in the output for any loader that prefers it. It is left out, and said so.
    from safetensors.torch import load_file

    diverged = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "diverged"
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((diverged / "model.safetensors").read_bytes())
    torch.save(load_file(diverged / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    # Other torch weights (a PEFT adapter) may be different weights: copied, with a note.
    torch.save({"lora_A": torch.ones(4, 4)}, folder / "adapter_model.bin")
    out = tmp_path / "fixed"
    report = smooth_checkpoint(folder, out, SmoothConfig())
    assert report.layers and all(layer.verified for layer in report.layers)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("pss")) == [
        "adapter_model.bin",
        "config.json",
        "model.safetensors",
    ]
    notes = [m for m in report.messages if m.startswith("left out")]
    assert len(notes) == 2 and "pytorch_model.bin:" in notes[0]
    assert "pytorch_model.bin.index.json" in notes[1]
    assert any(m.startswith("copied adapter_model.bin unchanged") for m in report.messages)
    assert (folder / "pytorch_model.bin").exists()  # the input is never touched


def test_scan_says_which_embedding_is_also_the_tied_lm_head(tmp_path: Path) -> None:
    # transformers does not store an LM head tied to the token embedding (tie_word_embeddings):
    # scan notes which analysed matrix is the output head too, without counting it as skipped.
    trainer = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "trainer"
    folder = next(trainer.glob("checkpoint-*"))
    from pss_cli.config import ScanConfig
    from pss_cli.pipeline import scan_checkpoint

    report = scan_checkpoint(folder, ScanConfig())
    notes = [entry for entry in report.skipped if entry.file == "config.json"]
    assert len(notes) == 1 and "'transformer.wte.weight'" in notes[0].reason
    assert report.summary.skipped == len(report.skipped) - 1
    # An untied model (tie_word_embeddings false) or a stored head: no note.
    untied = tmp_path / "untied"
    shutil.copytree(folder, untied)
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))
    report = scan_checkpoint(untied, ScanConfig())
    assert not [entry for entry in report.skipped if entry.file == "config.json"]
