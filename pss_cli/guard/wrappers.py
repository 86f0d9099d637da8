"""Proxies for code that must call `optimizer.step()` / `scheduler.step()` itself.

`GuardedOptimizer` is a `torch.optim.Optimizer` (isinstance checks in LR schedulers, Lightning
and accelerate pass) whose `step()` is `guard.step(loss)`; everything else is the inner
optimizer's, and its `state_dict()` carries the guard's state under "pss_guard", so whatever
checkpoints the optimizer (HF Trainer's optimizer.pt, Lightning's optimizer_states) saves and
restores the guard too. `GuardedScheduler.step()` does nothing after a skipped step: the LR
schedule must not advance on a step that did not happen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pss_cli.guard.guard import Guard

GUARD_STATE_KEY = "pss_guard"


class GuardedOptimizer(torch.optim.Optimizer):
    """The user's optimizer, stepped through the guard. Deliberately does not call
    `Optimizer.__init__`: the inner optimizer owns param_groups, state, defaults and hooks."""

    def __init__(self, guard: Guard) -> None:
        self.__dict__["guard"] = guard
        self.__dict__["optimizer"] = guard.optimizer

    # Attributes the base class would have set: all the inner optimizer's.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups  # type: ignore[no-any-return]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults  # type: ignore[no-any-return]

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not found on the proxy: hooks registries, custom attributes.
        if name in ("guard", "optimizer"):
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.guard.step(loss)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

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

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class GuardedScheduler:
    """The user's LR scheduler; `step()` is a no-op when the guard's last decision skipped."""

    def __init__(self, guard: Guard, scheduler: Any) -> None:
        self.__dict__["guard"] = guard
        self.__dict__["scheduler"] = scheduler

    def step(self, *args: Any, **kwargs: Any) -> None:
        decision = self.guard.last_decision
        if decision is not None and decision.skipped:
            return
        self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("guard", "scheduler"):
            raise AttributeError(name)
        return getattr(self.__dict__["scheduler"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("guard", "scheduler"):
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
