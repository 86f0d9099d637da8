"""pss guard in a real `transformers.Trainer` run on CPU: a tiny GPT-2 built from a config.

What is checked: a skipped step leaves weights and every optimizer state tensor bit-identical
and does not advance the LR schedule; a smooth action reports and changes only the smoothed
matrices; the guard's state survives Trainer's checkpoint + resume; a run without triggers is
bit-identical to the unguarded Trainer run (clipping included); the Trainer's logs carry the
guard's counters; bad set-ups are refused with a clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.errors import GuardConfigError
from pss_cli.guard import GuardConfig, TriggerAction
from pss_cli.guard.adapters.hf import GuardCallback, find_guard, guarded_optimizers
from pss_cli.trend.guard_log import GUARD_LOG_NAME, read_guard_log

VOCAB, SEQ, STEPS, BATCH = 64, 16, 30, 4
# The spike rule armed after 5 steps with a factor no norm can stay under: it fires at guard
# step 5 (the 6th optimizer step), then the cooldown keeps it quiet for the rest of the run.
FORCED = GuardConfig(spike_factor=1e-6, warmup_steps=5, cooldown_steps=1000)
TRIGGER_STEP = 5


class TokenData(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def train_args(out: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "learning_rate": 3e-3,
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
        "warmup_steps": 3,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "max_grad_norm": 0.0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


class Probe(TrainerCallback):  # type: ignore[misc]
    """Snapshots around every optimizer step (after Trainer's clip, before/after step())."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._before: dict[str, Any] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._before = {
            "params": _params(kw["model"]),
            "opt": _opt_state(kw["optimizer"]),
            "epoch": kw["lr_scheduler"].last_epoch,
        }

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.steps.append(
            {
                "decision": find_guard(kw["optimizer"]).last_decision,  # type: ignore[union-attr]
                "before": self._before,
                "params": _params(kw["model"]),
                "opt": _opt_state(kw["optimizer"]),
            }
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.steps[-1]["epoch_after"] = kw["lr_scheduler"].last_epoch


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _opt_state(optimizer: Any) -> dict[int, dict[str, torch.Tensor]]:
    return {
        id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
        for p, s in optimizer.state.items()
    }


def _same(a: dict[Any, torch.Tensor], b: dict[Any, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_opt(a: dict[int, dict[str, torch.Tensor]], b: dict[int, dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def guarded_run(
    out: Path, config: GuardConfig, probe: Probe | None = None, **arg_overrides: Any
) -> Trainer:
    model = tiny_gpt2()
    args = train_args(out, **arg_overrides)
    optimizers = guarded_optimizers(model, args, config, max_grad_norm=0.5)
    callbacks: list[Any] = [GuardCallback()] + ([probe] if probe is not None else [])
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenData(),
        optimizers=optimizers,
        callbacks=callbacks,
    )
    return trainer


def test_a_skipped_step_changes_nothing_and_the_schedule_waits(tmp_path: Path) -> None:
    probe = Probe()
    config = GuardConfig(
        spike_factor=1e-6, warmup_steps=5, cooldown_steps=1000, spike_action=TriggerAction.SKIP
    )
    trainer = guarded_run(tmp_path / "out", config, probe)
    trainer.train()
    assert len(probe.steps) == STEPS
    skipped = [i for i, s in enumerate(probe.steps) if s["decision"].skipped]
    assert skipped == [TRIGGER_STEP]
    for i, record in enumerate(probe.steps):
        if i == TRIGGER_STEP:
            assert _same(record["before"]["params"], record["params"])
            assert _same_opt(record["before"]["opt"], record["opt"])
            assert record["epoch_after"] == record["before"]["epoch"]  # LR schedule waited
        else:
            if i > 0:  # the LR warm-up starts at 0: step 0 moves nothing
                assert not _same(record["before"]["params"], record["params"])
            assert record["epoch_after"] == record["before"]["epoch"] + 1
    # Adam's step counts: one fewer than the optimizer steps Trainer made.
    inner_state = next(iter(trainer.optimizer.state.values()))
    assert int(inner_state["step"]) == STEPS - 1
    assert trainer.state.global_step == STEPS
    # The Trainer's log and trainer_state.json carry the guard's counters.
    entries = [e for e in trainer.state.log_history if "pss_guard/skipped" in e]
    assert entries and entries[-1]["pss_guard/skipped"] == 1.0
    assert any(e.get("step") == TRIGGER_STEP + 1 for e in entries)  # the trigger step was logged
    # The event log, where `pss trend OUTPUT_DIR` finds it.
    overlay = read_guard_log(tmp_path / "out" / GUARD_LOG_NAME)
    assert overlay.steps_of("skip") == (TRIGGER_STEP + 1,)


def test_smooth_changes_only_the_reported_matrices(tmp_path: Path) -> None:
    probe = Probe()
    trainer = guarded_run(tmp_path / "out", FORCED, probe)
    trainer.train()
    record = probe.steps[TRIGGER_STEP]
    decision = record["decision"]
    assert decision.skipped and decision.actions == ("smooth", "skip")
    smoothed = {name.split("[")[0] for name in decision.smoothed}
    assert smoothed and all(".h." in name for name in smoothed)  # blocks' matrices only
    before, after = record["before"]["params"], record["params"]
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in smoothed), name
    assert _same_opt(record["before"]["opt"], record["opt"])  # policy keep: moments untouched
    assert trainer.state.log_history[-1]["pss_guard/smoothed"] == float(len(decision.smoothed))


def test_without_triggers_the_run_is_bit_identical_to_unguarded_trainer(tmp_path: Path) -> None:
    # Default config: the spike rule is armed after 50 steps, past this 30-step run.
    guarded = guarded_run(tmp_path / "g", GuardConfig())
    guarded.train()
    model = tiny_gpt2()
    plain = Trainer(
        model=model, args=train_args(tmp_path / "p", max_grad_norm=0.5), train_dataset=TokenData()
    )
    plain.train()
    guard = find_guard(guarded.optimizer)
    assert guard is not None and guard.counters["skipped"] == 0
    assert _same(_params(guarded.model), _params(plain.model))
    # Same optimizer layout as Trainer's own factory (groups, decay, hyper-parameters).
    mine, theirs = guarded.optimizer.state_dict(), plain.optimizer.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert all(_same(mine["state"][k], theirs["state"][k]) for k in theirs["state"])
    # Clipping was active (so "bit-identical" covers the moved clip), and Trainer still logged
    # the pre-clip norm.
    norms = [e["grad_norm"] for e in guarded.state.log_history if "grad_norm" in e]
    assert norms == [e["grad_norm"] for e in plain.state.log_history if "grad_norm" in e]
    assert max(norms) > 0.5


def test_guard_state_survives_a_trainer_checkpoint_and_resume(tmp_path: Path) -> None:
    steps = 20
    full = guarded_run(
        tmp_path / "a", FORCED, max_steps=steps, save_strategy="steps", save_steps=10
    )
    full.train()
    saved = torch.load(tmp_path / "a" / "checkpoint-10" / "optimizer.pt", weights_only=True)
    assert saved["pss_guard"]["step_count"] == 10
    assert saved["pss_guard"]["counters"]["skipped"] == 1
    state = json.loads((tmp_path / "a" / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10

    resumed = guarded_run(tmp_path / "a", FORCED, max_steps=steps, save_strategy="no")
    guard = find_guard(resumed.optimizer)
    assert guard is not None and guard.step_count == 0
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))
    first = find_guard(full.optimizer)
    assert first is not None
    # Counters, EMA, cooldown and monitor vectors continued: the same final guard state, and
    # the same weights as the uninterrupted run.
    assert guard.step_count == steps and guard.counters == first.counters
    assert _state_equal(guard.state_dict(), first.state_dict())
    assert _same(_params(resumed.model), _params(full.model))
    # `pss trend OUTPUT_DIR` reads the run's checkpoints and overlays the guard's event log (the
    # resumed run appended to it: the one skip is still counted once).
    result = CliRunner().invoke(app, ["trend", str(tmp_path / "a"), "--format", "json", "-q"])
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert [c["step"] for c in report["checkpoints"]] == [10, 20]
    assert report["guard"]["skipped_train_steps"] == [TRIGGER_STEP + 1]
    assert report["guard"]["counts"]["skip"] == 1


def _state_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_state_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_trainer_clipping_and_unguarded_optimizers_are_refused(tmp_path: Path) -> None:
    model = tiny_gpt2()
    with pytest.raises(GuardConfigError, match=r"max_grad_norm=1\.0"):
        guarded_optimizers(model, train_args(tmp_path, max_grad_norm=1.0), FORCED)
    with pytest.raises(GuardConfigError, match="number of optimizer steps"):
        guarded_optimizers(model, train_args(tmp_path, max_steps=-1), FORCED)
    trainer = Trainer(
        model=model,
        args=train_args(tmp_path, max_steps=2),
        train_dataset=TokenData(),
        callbacks=[GuardCallback()],
    )
    with pytest.raises(GuardConfigError, match="not guarded"):
        trainer.train()


def test_a_plateau_schedule_steps_on_each_evaluation_whatever_was_skipped(tmp_path: Path) -> None:
    # Trainer steps a ReduceLROnPlateau with the evaluation metric and every other scheduler
    # after each optimizer step, deciding by isinstance: a guarded plateau scheduler that was
    # not one made Trainer call step() without its metric (a TypeError at the first step).
    model = tiny_gpt2()
    args = train_args(
        tmp_path,
        lr_scheduler_type="reduce_lr_on_plateau",
        warmup_steps=0,
        eval_strategy="steps",
        eval_steps=10,
        metric_for_best_model="loss",
    )
    skip_once = GuardConfig(
        spike_factor=1e-6, warmup_steps=5, cooldown_steps=1000, spike_action=TriggerAction.SKIP
    )
    optimizers = guarded_optimizers(model, args, skip_once, max_grad_norm=0.5)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenData(),
        eval_dataset=TokenData(8),
        optimizers=optimizers,
        callbacks=[GuardCallback()],
    )
    trainer.train()
    guard = find_guard(trainer.optimizer)
    assert guard is not None and guard.counters["skipped"] == 1
    scheduler = trainer.lr_scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluations) == STEPS // 10
    assert scheduler.last_epoch == len(evaluations)  # one step(metric) per evaluation
