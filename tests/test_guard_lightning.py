"""pss guard in a real `lightning.Trainer` run on CPU (tiny model, ~30 steps).

What is checked: a skipped step leaves weights and every optimizer state tensor bit-identical and
does not advance the LR schedule; the guard's state is in the .ckpt and `fit(ckpt_path=...)`
restores it (the resumed run ends bit-identical to the uninterrupted one); a run without triggers
is bit-identical to the unguarded run that clipped with gradient_clip_val; the callback logs the
guard's counters; bad set-ups are refused with a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from pss_cli.errors import GuardConfigError
from pss_cli.guard import GuardConfig, TriggerAction
from pss_cli.guard.adapters.lightning import (
    GuardCallback,
    find_guards,
    guarded_optimizers,
)

STEPS, BATCHES_PER_EPOCH, WIDTH = 30, 10, 16
TRIGGER_STEP = 5
SKIP_AT_5 = GuardConfig(
    spike_factor=1e-6, warmup_steps=5, cooldown_steps=1000, spike_action=TriggerAction.SKIP
)


class Net(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, config: GuardConfig | None, clip: float | None = 0.5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Linear(WIDTH, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)
        )
        self.guard_config = config
        self.clip = clip

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
        if self.guard_config is None:  # the unguarded twin
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }
        return guarded_optimizers(
            self, optimizer, scheduler, self.guard_config, max_grad_norm=self.clip
        )


def loader() -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES_PER_EPOCH * 8, WIDTH, generator=g)
    y = torch.randn(BATCHES_PER_EPOCH * 8, 4, generator=g) * 3
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def trainer(max_steps: int = STEPS, callbacks: list[Any] | None = None, **kw: Any) -> Any:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks or []),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
        **kw,
    )


class Probe(pl.Callback):  # type: ignore[misc]
    """Snapshots after backward (before any clip or step) and after the batch."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._before: dict[str, Any] = {}

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        self._before = {
            "params": _params(module),
            "opt": _opt_state(optimizer),
            "epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        }

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self.steps.append(
            {
                "decision": find_guards(trainer)[0].last_decision,
                "before": self._before,
                "params": _params(module),
                "opt": _opt_state(trainer.optimizers[0]),
                "epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            }
        )


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _opt_state(optimizer: Any) -> dict[int, dict[str, torch.Tensor]]:
    return {
        id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
        for p, s in optimizer.state.items()
    }


def _same(a: dict[Any, torch.Tensor], b: dict[Any, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_a_skipped_step_changes_nothing_and_the_schedule_waits() -> None:
    probe = Probe()
    model = Net(SKIP_AT_5)
    run = trainer(callbacks=[GuardCallback(), probe])
    run.fit(model, loader())
    assert len(probe.steps) == STEPS
    assert [i for i, s in enumerate(probe.steps) if s["decision"].skipped] == [TRIGGER_STEP]
    for i, record in enumerate(probe.steps):
        before = record["before"]
        if i == TRIGGER_STEP:
            assert _same(before["params"], record["params"])
            assert _same_state(before["opt"], record["opt"])
            assert record["epoch"] == before["epoch"]  # the LR schedule waited
        else:
            assert not _same(before["params"], record["params"])
            assert record["epoch"] == before["epoch"] + 1
    inner_state = next(iter(run.optimizers[0].state.values()))
    assert int(inner_state["step"]) == STEPS - 1
    assert run.global_step == STEPS  # Lightning counts the skipped step as a step
    assert float(run.callback_metrics["pss_guard/skipped"]) == 1.0
    assert float(run.callback_metrics["pss_guard/triggers"]) == 1.0


class AtStart(pl.Callback):  # type: ignore[misc]
    def on_train_start(self, trainer: Any, module: Any) -> None:
        self.state = find_guards(trainer)[0].state_dict()


def test_guard_state_is_in_the_ckpt_and_restored_by_fit_ckpt_path(tmp_path: Path) -> None:
    steps = 2 * BATCHES_PER_EPOCH
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    full = trainer(max_steps=steps, callbacks=[GuardCallback(), saver])
    full.fit(Net(SKIP_AT_5), loader())
    ckpt = tmp_path / f"epoch=0-step={BATCHES_PER_EPOCH}.ckpt"
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["pss_guard"]
    assert saved["step_count"] == BATCHES_PER_EPOCH and saved["counters"]["skipped"] == 1
    assert saved["spike"]["cooldown_left"] > 0

    at_start = AtStart()
    resumed = trainer(max_steps=steps, callbacks=[GuardCallback(), at_start])
    resumed.fit(Net(SKIP_AT_5), loader(), ckpt_path=str(ckpt))
    # Restored before the first resumed step: counters, EMA, cooldown, monitor vectors.
    assert _same_state(at_start.state, saved)
    guard = find_guards(resumed)[0]
    assert guard.step_count == steps
    # The restored cooldown kept the trigger-happy rule quiet: a fresh guard would have fired
    # again 5 steps after the resume.
    assert guard.counters["skipped"] == 1 and guard.counters["triggers"] == 1
    # (The weights are not compared with the uninterrupted run: Lightning replays a batch when
    # it resumes from an epoch-end checkpoint of a plain DataLoader, whatever the guard does.)


def test_without_triggers_the_run_is_bit_identical_to_unguarded_lightning() -> None:
    guarded_model, plain_model = Net(GuardConfig()), Net(None)
    guarded = trainer(callbacks=[GuardCallback()])
    guarded.fit(guarded_model, loader())
    trainer(gradient_clip_val=0.5).fit(plain_model, loader())
    assert find_guards(guarded)[0].counters["skipped"] == 0
    assert _same(_params(guarded_model), _params(plain_model))
    # The clip was active (the last pre-clip norm is above it), so "bit-identical" covers the
    # moved clip.
    assert float(find_guards(guarded)[0].optimizer.last_norm) > 0.5


def test_lightning_clipping_and_unguarded_optimizers_are_refused() -> None:
    with pytest.raises(GuardConfigError, match="gradient_clip_val"):
        trainer(max_steps=2, gradient_clip_val=1.0).fit(Net(SKIP_AT_5), loader())
    with pytest.raises(GuardConfigError, match="not guarded"):
        trainer(max_steps=2, callbacks=[GuardCallback()]).fit(Net(None), loader())


class Recorder:
    """A SummaryWriter stand-in for TensorBoardSink: (tag, value, step) of each scalar."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def add_text(self, tag: str, text: str, step: int) -> None:
        pass


class LoggingNet(Net):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__(GuardConfig())
        self.recorder = recorder

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        from pss_cli.guard.sinks import TensorBoardSink

        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3)
        sink = TensorBoardSink(writer=self.recorder)
        return guarded_optimizers(self, optimizer, config=self.guard_config, sinks=[sink])


def test_a_sink_lines_up_with_lightnings_own_curves(tmp_path: Path) -> None:
    # Before: the sink wrote guard step k at k + 1 (HF's global_step), one step after the
    # point at which Lightning logged the same loss.
    from lightning.pytorch.loggers import CSVLogger

    recorder = Recorder()
    run = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    run.fit(LoggingNet(recorder), loader())
    import csv

    with open(next(tmp_path.rglob("metrics.csv"))) as metrics:
        rows = list(csv.DictReader(metrics))
    lightning = {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")}
    guard = {step: value for tag, value, step in recorder.scalars if tag == "pss_guard/loss"}
    assert len(lightning) == 6 and lightning.keys() == guard.keys()
    for step, value in lightning.items():
        assert guard[step] == pytest.approx(value, rel=1e-6)


class TwoOptimizers(pl.LightningModule):  # type: ignore[misc]
    """A GAN-shaped module: two optimizers, each over its own part (manual optimization)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Sequential(nn.Linear(WIDTH, 32), nn.GELU(), nn.Linear(32, WIDTH))
        self.second = nn.Sequential(nn.Linear(WIDTH, 32), nn.GELU(), nn.Linear(32, 4))
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        opt_first, opt_second = self.optimizers()
        for opt in (opt_first, opt_second):
            loss = nn.functional.mse_loss(self.second(self.first(x)), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> Any:
        a = torch.optim.AdamW(self.first.parameters(), lr=1e-3)
        b = torch.optim.AdamW(self.second.parameters(), lr=1e-3)
        return [
            guarded_optimizers(self, a, model=self.first)["optimizer"],
            guarded_optimizers(self, b, model=self.second)["optimizer"],
        ]


def test_two_optimizers_each_guard_their_own_part() -> None:
    run = trainer(max_steps=8)
    module = TwoOptimizers()
    run.fit(module, loader())
    first, second = find_guards(run)
    assert first.step_count == second.step_count > 0
    assert {s.param_name for s in first.specs} == {"0.weight", "2.weight"}
    assert first.model is module.first and second.model is module.second
    # Without model=, the whole module's other part is not held by the optimizer: refused
    # with the hint that names model=.
    with pytest.raises(GuardConfigError, match="does not hold") as refused:
        guarded_optimizers(module, torch.optim.AdamW(module.first.parameters()))
    assert "model=part" in (refused.value.hint or "")
    # The part given in place of the module: a clear error (an AttributeError before).
    with pytest.raises(GuardConfigError, match="LightningModule as its first argument"):
        guarded_optimizers(module.first, torch.optim.AdamW(module.first.parameters()))
