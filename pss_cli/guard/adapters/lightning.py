"""pss guard for PyTorch Lightning (extra `pss-checkpoint[lightning]`).

A `Callback` cannot veto a step: `on_before_optimizer_step` runs inside the optimizer closure
(Lightning 2.x `Precision._wrap_closure`: training_step + backward, then the hook, then the
gradient clip) and `optimizer.step()` follows whatever it does. Lightning steps through
`LightningModule.optimizer_step` -> `optimizer.step(closure=...)`, so the guard enters as the
optimizer: `GuardedOptimizer.step(closure)` runs the closure (forward, backward, hooks) and then
lets the guard take, skip or smooth-and-skip the step. No `optimizer_step` override is needed;
a module that overrides it must still call `optimizer.step(closure=optimizer_closure)`.

    class Model(LightningModule):
        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=3e-4)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
            return guarded_optimizers(self, optimizer, scheduler, GuardConfig(), max_grad_norm=1.0)

    trainer = Trainer(callbacks=[GuardCallback()])   # no gradient_clip_val: the guard clips

- The scheduler comes back wrapped so that its `step()` does nothing after a skipped step, and
  still passes Lightning's scheduler checks (it is an instance of the scheduler's own class).
- The guard's state rides in the optimizer's state dict (key "pss_guard"), so the `.ckpt`
  `optimizer_states` carry it and `trainer.fit(model, ckpt_path=...)` restores it.
- Clipping: Lightning clips inside the closure, before the guard reads the gradients (it would
  only see clipped norms). `Trainer(gradient_clip_val=...)` is refused; `max_grad_norm=` here
  clips after the guard's decision with the same torch call Lightning makes.
- `GuardCallback` logs the guard's counters through `LightningModule.log` (so every logger gets
  them) and refuses a run whose optimizer is not guarded or that clips by itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from pss_cli.errors import GuardConfigError
from pss_cli.guard.adapters.clip import ClipKind, ClipThenStep
from pss_cli.guard.config import GuardConfig
from pss_cli.guard.guard import Guard
from pss_cli.guard.telemetry import Sink
from pss_cli.guard.wrappers import GuardedOptimizer, GuardedScheduler, scheduler_proxy

_CLIP_HINT = (
    "drop Trainer(gradient_clip_val=...) and pass guarded_optimizers(..., max_grad_norm=X): it "
    "clips after the guard's decision, with the same torch call Lightning makes"
)


def guarded_optimizers(
    module: pl.LightningModule,
    optimizer: Any,
    scheduler: Any = None,
    config: GuardConfig | None = None,
    *,
    interval: str = "step",
    frequency: int = 1,
    monitor: str | None = None,
    max_grad_norm: float | None = None,
    clip_algorithm: ClipKind | str = ClipKind.NORM,
    event_log: str | os.PathLike[str] | None = None,
    sinks: Iterable[Sink] = (),
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """What `configure_optimizers` returns: the guarded optimizer and, when given, the
    guarded LR scheduler with Lightning's `interval` / `frequency` / `monitor`.

    model: the part of `module` this optimizer trains, when several optimizers each train a
    part (a GAN's generator and discriminator): one guard per optimizer, each watching its
    part. Default: the whole module.
    """
    if not isinstance(module, pl.LightningModule):
        raise GuardConfigError(
            f"guarded_optimizers needs the LightningModule as its first argument, got "
            f"{type(module).__name__}",
            "pass self (the LightningModule), and the part this optimizer trains as model=part",
        )
    trainer = module._trainer  # None outside a fit (e.g. a unit test calling this directly)
    if trainer is not None:
        _refuse_clipping(trainer)
    stepped = optimizer
    if max_grad_norm is not None:
        # The optimizer's parameters in group order: what Lightning's clip_grad_by_norm clips.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        stepped = ClipThenStep(optimizer, params, max_grad_norm, clip_algorithm)
    sinks = list(sinks)
    for sink in sinks:
        # Lightning logs optimizer step k's training metrics at its global_step k (counted from
        # 0, before the step), HF Trainer at k + 1: a sink left at its default lines up here.
        if getattr(sink, "step_offset", 0) is None:
            sink.step_offset = 0  # type: ignore[attr-defined]
    guard = Guard(
        module if model is None else model, stepped, config, event_log=event_log, sinks=sinks
    )
    guarded = guard.wrap_optimizer()
    out: dict[str, Any] = {"optimizer": guarded}
    if scheduler is not None:
        config_entry: dict[str, Any] = {
            "scheduler": lightning_scheduler(guard, scheduler, guarded, interval),
            "interval": interval,
            "frequency": frequency,
        }
        if monitor is not None:
            config_entry["monitor"] = monitor
        out["lr_scheduler"] = config_entry
    return out


def lightning_scheduler(
    guard: Guard, scheduler: Any, optimizer: GuardedOptimizer, interval: str = "step"
) -> GuardedScheduler:
    """`guard.wrap_scheduler(scheduler)` that is also an instance of the scheduler's class and
    whose `optimizer` is the guarded one (`wrappers.scheduler_proxy` says why Lightning needs
    both). An `interval="epoch"` schedule steps whatever the epoch's last step did."""
    return scheduler_proxy(guard, scheduler, per_step=interval == "step", optimizer=optimizer)


def find_guards(trainer: pl.Trainer) -> list[Guard]:
    return [opt.guard for opt in trainer.optimizers if isinstance(opt, GuardedOptimizer)]


class GuardCallback(Callback):
    """The guard in Lightning's logs (monitoring only: the skip happens in GuardedOptimizer).

    Logs per optimizer step `pss_guard/skipped`, `pss_guard/triggers`, `pss_guard/nonfinite`,
    `pss_guard/smoothed` (run totals, surviving a resume) and `pss_guard/grad_norm` (the norm the
    guard watched, before any clip). Stateless: the guard's own state is in the optimizer's.
    """

    def __init__(self, prefix: str = "pss_guard/", prog_bar: bool = False) -> None:
        self.prefix = prefix
        self.prog_bar = prog_bar
        self._seen: dict[int, int] = {}  # guard id -> the step count already logged

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not find_guards(trainer):
            raise GuardConfigError(
                "GuardCallback: the optimizer is not guarded, so no step can be skipped",
                "return guarded_optimizers(self, optimizer, scheduler, GuardConfig()) from "
                "configure_optimizers",
            )
        _refuse_clipping(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for index, guard in enumerate(find_guards(trainer)):
            if guard.last_decision is None or self._seen.get(id(guard)) == guard.step_count:
                continue  # no optimizer step on this batch (gradient accumulation)
            self._seen[id(guard)] = guard.step_count
            suffix = f"_{index}" if index else ""
            for name, value in self.metrics(guard).items():
                pl_module.log(
                    f"{self.prefix}{name}{suffix}",
                    value,
                    on_step=True,
                    on_epoch=False,
                    prog_bar=self.prog_bar and name == "skipped",
                    batch_size=1,
                )

    @staticmethod
    def metrics(guard: Guard) -> dict[str, float]:
        counters = guard.counters
        out = {
            "skipped": float(counters["skipped"]),
            "triggers": float(counters["triggers"]),
            "nonfinite": float(counters["nonfinite"]),
            "smoothed": float(counters["smoothed"]),
        }
        if guard.last_decision is not None:
            out["grad_norm"] = guard.last_decision.grad_norm
        return out


def _refuse_clipping(trainer: pl.Trainer) -> None:
    clip = trainer.gradient_clip_val
    if clip is not None and float(clip) > 0:
        raise GuardConfigError(
            f"Trainer(gradient_clip_val={clip}): Lightning clips the gradients inside the "
            "optimizer closure, before the guard reads them, so it would only see clipped "
            "norms and its grad-norm rules could not fire",
            _CLIP_HINT,
        )
