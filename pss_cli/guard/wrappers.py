"""Proxies for code that must call `optimizer.step()` / `scheduler.step()` itself.

`GuardedOptimizer` is a `torch.optim.Optimizer` (isinstance checks in LR schedulers, Lightning
and accelerate pass) whose `step()` is `guard.step(loss)`; everything else is the inner
optimizer's, and its `state_dict()` carries the guard's state under "pss_guard", so whatever
checkpoints the optimizer (HF Trainer's optimizer.pt, Lightning's optimizer_states) saves and
restores the guard too. `GuardedScheduler.step()` does nothing after a skipped step: the LR
schedule must not advance on a step that did not happen. That holds for schedules that count
optimizer steps only: an epoch-interval schedule (Lightning's `interval="epoch"`) and
`ReduceLROnPlateau` (stepped with a validation metric) always step, or a skipped last batch
would cost a whole epoch of the schedule, or a plateau scheduler its evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pss_cli.guard.proxy import OptimizerProxy

if TYPE_CHECKING:
    from pss_cli.guard.guard import Guard

GUARD_STATE_KEY = "pss_guard"


class GuardedOptimizer(OptimizerProxy):
    """The user's optimizer, stepped through the guard (an `OptimizerProxy`: the inner optimizer
    owns param_groups, state, defaults and hooks)."""

    _OWN = frozenset({"guard", "optimizer"})

    def __init__(self, guard: Guard) -> None:
        super().__init__(guard.optimizer)
        self.__dict__["guard"] = guard

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.guard.step(loss)
        return loss

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = dict(self.optimizer.state_dict())
        state[GUARD_STATE_KEY] = self.guard.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rest = dict(state_dict)
        guard_state = rest.pop(GUARD_STATE_KEY, None)
        if guard_state is not None:
            self.guard.load_state_dict(guard_state)
        self.optimizer.load_state_dict(rest)

    def __repr__(self) -> str:
        return f"GuardedOptimizer({self.optimizer!r})"


class GuardedScheduler:
    """The user's LR scheduler; `step()` is a no-op when the guard's last decision skipped
    (`per_step` schedules; module docstring)."""

    _OWN = ("guard", "scheduler", "per_step")

    def __init__(self, guard: Guard, scheduler: Any, per_step: bool = True) -> None:
        self.__dict__["guard"] = guard
        self.__dict__["scheduler"] = scheduler
        # A metric-driven ReduceLROnPlateau is never held back by a skipped training step.
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.__dict__["per_step"] = per_step and not plateau

    def step(self, *args: Any, **kwargs: Any) -> None:
        decision = self.guard.last_decision
        # A step given a value is a metric-driven one (transformers' GreedyLR, stepped like
        # ReduceLROnPlateau with the evaluation metric): it follows evaluations, not optimizer
        # steps, and a skipped last training step must not make it miss one.
        metric = bool(args or kwargs)
        if self.per_step and not metric and decision is not None and decision.skipped:
            return
        self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in self._OWN:
            raise AttributeError(name)
        return getattr(self.__dict__["scheduler"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            self.__dict__[name] = value
        else:
            setattr(self.scheduler, name, value)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()  # type: ignore[no-any-return]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"GuardedScheduler({self.scheduler!r})"


def scheduler_proxy(
    guard: Guard,
    scheduler: Any,
    *,
    per_step: bool = True,
    optimizer: GuardedOptimizer | None = None,
) -> GuardedScheduler:
    """A `GuardedScheduler` that is also an instance of the scheduler's own class.

    Frameworks dispatch on the scheduler's class: HF Trainer steps a `ReduceLROnPlateau` with
    the evaluation metric and every other scheduler after each optimizer step (a plain proxy
    made Trainer call the plateau scheduler's step() without its metric, a TypeError at the
    first step); Lightning accepts only `LRScheduler` / `ReduceLROnPlateau` instances and checks
    that `scheduler.optimizer` is one of the optimizers `configure_optimizers` returned. A class
    derived from both, made per wrapped type (the pattern of Lightning's own
    `LightningOptimizer`), keeps those checks true while `step()` stays the guard's; with
    `optimizer` given, `scheduler.optimizer` reads as that guarded optimizer. The inner
    scheduler keeps driving the inner optimizer's learning rates (the same param_groups).
    A class that cannot be derived from gets the plain proxy.
    """
    attributes: dict[str, Any] = {}
    if optimizer is not None:
        attributes["optimizer"] = property(lambda self: self.__dict__["guarded_optimizer"])
    try:
        cls: type[GuardedScheduler] = type(
            f"Guarded{type(scheduler).__name__}", (GuardedScheduler, type(scheduler)), attributes
        )
        proxy = object.__new__(cls)
    except TypeError:  # a final or slotted class, or a layout conflict
        return GuardedScheduler(guard, scheduler, per_step)
    GuardedScheduler.__init__(proxy, guard, scheduler, per_step)
    if optimizer is not None:
        proxy.__dict__["guarded_optimizer"] = optimizer
    return proxy
