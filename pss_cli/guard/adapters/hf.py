"""pss guard for Hugging Face `transformers.Trainer` (extra `pss-checkpoint[hf]`).

A `TrainerCallback` cannot skip a step: `TrainerControl` has no such flag, and Trainer calls
`optimizer.step()` and then `lr_scheduler.step()` whatever a callback says (transformers 5.x
`Trainer._run_epoch`: clip -> `on_pre_optimizer_step` -> `optimizer.step()` ->
`on_optimizer_step` -> `lr_scheduler.step()` unless `accelerator.optimizer_step_was_skipped`,
which only a fp16 grad-scaler overflow sets). So the guard enters where Trainer steps:

    args = TrainingArguments(..., max_grad_norm=0.0)            # the guard clips (see below)
    optimizers = guarded_optimizers(model, args, GuardConfig(), max_grad_norm=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=optimizers,
                      callbacks=[GuardCallback()])

- `guarded_optimizers` builds the optimizer and the LR schedule the way Trainer would from the
  same `TrainingArguments` (Trainer's own `get_optimizer_cls_and_kwargs` and weight-decay
  grouping, `transformers.get_scheduler` with the same warm-up), then returns the guard's
  `GuardedOptimizer` (its `step()` is `guard.step()`) and `GuardedScheduler` (no LR step after a
  skipped step).
- The guard's state rides in the optimizer's state dict (key "pss_guard"), so Trainer's
  `optimizer.pt` saves it and `trainer.train(resume_from_checkpoint=...)` restores it.
- Clipping: Trainer clips before `optimizer.step()`, so a guard stepped by Trainer would watch
  clipped norms (its spike rule could not fire). Trainer's `max_grad_norm` must therefore be 0
  (a clear error otherwise), and `max_grad_norm=` here clips after the guard's decision with
  the computation accelerate uses (`pss_cli.guard.adapters.clip`): a run without triggers is
  bit-identical to the unguarded Trainer run that clipped itself. Trainer still logs the
  pre-clip norm as `grad_norm` (it measures it with an infinite clip).
- `GuardCallback` adds the guard's counters to Trainer's logs and trainer_state.json, forces a
  log line on a trigger step, and refuses a Trainer whose optimizer is not guarded or that clips
  by itself. The report_to integrations run before user callbacks and do not see these keys:
  TensorBoard / W&B curves come from `sinks=` (pss_cli.guard.sinks).
- DeepSpeed: not supported here (its engine steps inside `engine.step()`; docs/GUARD.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.optimization import get_scheduler

from pss_cli.errors import GuardConfigError
from pss_cli.guard.adapters.clip import ClipThenStep
from pss_cli.guard.config import GuardConfig
from pss_cli.guard.guard import Guard
from pss_cli.guard.telemetry import Sink
from pss_cli.guard.wrappers import GuardedOptimizer, GuardedScheduler
from pss_cli.trend.guard_log import GUARD_LOG_NAME

_AUTO = "auto"
_CLIP_HINT = (
    "set TrainingArguments(max_grad_norm=0.0) and pass the clip to "
    "guarded_optimizers(..., max_grad_norm=1.0): it then clips after the guard's decision, "
    "exactly as Trainer would have"
)


def guarded_optimizers(
    model: nn.Module,
    args: TrainingArguments,
    config: GuardConfig | None = None,
    *,
    num_training_steps: int | None = None,
    max_grad_norm: float | None = None,
    event_log: str | os.PathLike[str] | None = _AUTO,
    sinks: Iterable[Sink] = (),
) -> tuple[GuardedOptimizer, GuardedScheduler]:
    """The `(optimizer, lr_scheduler)` pair for `Trainer(optimizers=...)`, guarded.

    `num_training_steps` defaults to `args.max_steps` (Trainer derives it from the dataset
    otherwise: pass it then). `event_log="auto"` writes `OUTPUT_DIR/pss-guard-events.jsonl`
    on the main process (what `pss trend OUTPUT_DIR` overlays); None writes none.
    """
    _refuse_unsupported(args)
    steps = num_training_steps if num_training_steps is not None else args.max_steps
    if steps is None or steps <= 0:
        raise GuardConfigError(
            "guarded_optimizers needs the number of optimizer steps for the LR schedule",
            "pass num_training_steps=... (Trainer's: ceil(len(train_dataloader) / "
            "gradient_accumulation_steps) x num_train_epochs) or set TrainingArguments(max_steps)",
        )
    inner = _trainer_optimizer(model, args)
    stepped: torch.optim.Optimizer = inner
    if max_grad_norm is not None:
        # model.parameters(), in its order: the list Trainer hands accelerate's clip_grad_norm_.
        stepped = ClipThenStep(inner, model.parameters(), max_grad_norm, accelerate_style=True)
    log_path = _event_log(args) if event_log == _AUTO else event_log
    guard = Guard(model, stepped, config, event_log=log_path, sinks=sinks)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=inner,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=cast(dict[str, Any] | None, args.lr_scheduler_kwargs),
    )
    return guard.wrap_optimizer(), guard.wrap_scheduler(scheduler)


def find_guard(optimizer: Any) -> Guard | None:
    """The guard behind an optimizer as Trainer holds it (accelerate's AcceleratedOptimizer
    around a GuardedOptimizer), or None."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, GuardedOptimizer):
            guard: Guard = optimizer.guard
            return guard
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


class GuardCallback(TrainerCallback):  # type: ignore[misc]
    """The guard in Trainer's logs. Monitoring only: the skip happens in `GuardedOptimizer`.

    Adds to each Trainer log (and its trainer_state.json entry): `pss_guard/skipped`,
    `pss_guard/triggers`, `pss_guard/nonfinite`, `pss_guard/smoothed` (run totals, surviving a
    resume) and `pss_guard/grad_norm` (the norm the guard watched at the last step, before
    any clip). A step where the guard triggered is always logged.
    """

    def __init__(self, guard: Guard | None = None, prefix: str = "pss_guard/") -> None:
        self.guard = guard
        self.prefix = prefix

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.guard is None:
            self.guard = find_guard(optimizer)
        if self.guard is None:
            raise GuardConfigError(
                "GuardCallback: the Trainer's optimizer is not guarded, so no step can be skipped",
                "pass Trainer(optimizers=guarded_optimizers(model, args, GuardConfig()))",
            )
        _refuse_unsupported(args)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        decision = self.guard.last_decision if self.guard is not None else None
        if decision is not None and decision.triggered:
            control.should_log = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.guard is None or logs is None:
            return
        values = self.metrics()
        logs.update(values)
        # Trainer appended {**logs, "step": global_step} to log_history just before on_log:
        # put the guard's numbers there too, so trainer_state.json keeps them.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def metrics(self) -> dict[str, float]:
        assert self.guard is not None
        counters = self.guard.counters
        out = {
            f"{self.prefix}skipped": float(counters["skipped"]),
            f"{self.prefix}triggers": float(counters["triggers"]),
            f"{self.prefix}nonfinite": float(counters["nonfinite"]),
            f"{self.prefix}smoothed": float(counters["smoothed"]),
        }
        decision = self.guard.last_decision
        if decision is not None:
            out[f"{self.prefix}grad_norm"] = decision.grad_norm
        return out


def _refuse_unsupported(args: TrainingArguments) -> None:
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        raise GuardConfigError(
            f"TrainingArguments.max_grad_norm={args.max_grad_norm}: Trainer clips the gradients "
            "before optimizer.step(), so the guard would only see clipped norms and its "
            "grad-norm rules could not fire",
            _CLIP_HINT,
        )
    if getattr(args, "deepspeed", None):
        raise GuardConfigError(
            "the guard cannot skip steps under DeepSpeed: its engine steps the optimizer "
            "inside engine.step(), before any hook the guard could use",
            "watch the run with `pss trend` on its checkpoints instead (docs/GUARD.md, DeepSpeed)",
        )


def _trainer_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """`Trainer.create_optimizer` for the standard optimizers: the same class and arguments
    (`Trainer.get_optimizer_cls_and_kwargs`) and the same two weight-decay groups in
    `named_parameters()` order, so optimizer.pt has Trainer's layout."""
    # get_decay_parameter_names reads only its `model` argument (transformers 4.40 to 5.x).
    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    named = list(model.named_parameters())
    groups = [
        {
            "params": [p for n, p in named if n in decay and p.requires_grad],
            "weight_decay": args.weight_decay,
        },
        {
            "params": [p for n, p in named if n not in decay and p.requires_grad],
            "weight_decay": 0.0,
        },
    ]
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(
        args,
        model,  # type: ignore[arg-type]
    )
    special = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
    if (
        special
        or not isinstance(optimizer_cls, type)
        or not issubclass(optimizer_cls, torch.optim.Optimizer)
    ):
        raise GuardConfigError(
            f"TrainingArguments.optim={args.optim!r} builds its optimizer in a way "
            "guarded_optimizers does not reproduce",
            "build the optimizer yourself and pass (Guard(model, optimizer, config)"
            ".wrap_optimizer(), guard.wrap_scheduler(scheduler)) to Trainer(optimizers=...)",
        )
    return optimizer_cls(groups, **optimizer_kwargs)  # type: ignore[no-any-return]


def _event_log(args: TrainingArguments) -> Path | None:
    if args.process_index != 0 or not args.output_dir:
        return None  # one log per run, written by the main process
    return Path(args.output_dir) / GUARD_LOG_NAME
