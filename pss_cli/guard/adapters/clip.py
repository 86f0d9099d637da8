"""Gradient clipping after the guard's decision, right before the optimizer step.

Why: frameworks clip before `optimizer.step()` (HF Trainer's `max_grad_norm`, Lightning's
`gradient_clip_val`, the usual `clip_grad_norm_` line in a plain loop). A guard stepped by that
`optimizer.step()` then only ever sees clipped gradients: their norm never exceeds the clip value,
so the paper's spike rule (grad norm > 2.5 x its EMA, arXiv 2602.01308) can almost never fire,
and the norm the guard logs is not the one the run had. `ClipThenStep` moves the clip behind the
guard: the guard reads the raw gradients and decides; a step it takes is clipped exactly as the
framework would have clipped it (same torch calls, same parameter order, so a run without
triggers stays bit-identical to the unguarded run that clipped itself); a step it skips needs no
clip.

    inner = torch.optim.AdamW(model.parameters(), lr=3e-4)
    guard = Guard(model, ClipThenStep(inner, model.parameters(), max_norm=1.0), GuardConfig())
    ...  # loss.backward(); guard.step(loss)  -- no clip_grad_norm_ call of your own
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any

import torch

from pss_cli.errors import GuardConfigError


class ClipKind(StrEnum):
    NORM = "norm"  # scale all gradients so their global L2 norm is at most max_norm
    VALUE = "value"  # clamp each gradient entry to [-max_norm, max_norm] (Lightning "value")


class ClipThenStep(torch.optim.Optimizer):
    """The user's optimizer, whose `step()` first clips the gradients of `parameters`.

    A proxy like `GuardedOptimizer`: it deliberately does not call `Optimizer.__init__`; the
    inner optimizer owns param_groups, state, defaults and hooks, and its state_dict is this
    object's (a checkpoint does not change by adding the clip).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.nn.Parameter],
        max_norm: float,
        kind: ClipKind | str = ClipKind.NORM,
        *,
        accelerate_style: bool = False,
    ) -> None:  # no super().__init__ on purpose
        if not max_norm > 0:
            raise GuardConfigError(
                f"max_grad_norm must be positive (got {max_norm})", "pass None to not clip"
            )
        self.__dict__["optimizer"] = optimizer
        self.__dict__["parameters"] = list(parameters)
        self.__dict__["max_norm"] = float(max_norm)
        self.__dict__["kind"] = ClipKind(kind)
        self.__dict__["accelerate_style"] = accelerate_style
        # The last pre-clip global norm (a 0-dim tensor, never synchronised here), for logging.
        self.__dict__["last_norm"] = None

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
        if name in ("optimizer", "parameters", "max_norm", "kind", "accelerate_style", "last_norm"):
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.kind is ClipKind.VALUE:
            torch.nn.utils.clip_grad_value_(self.parameters, clip_value=self.max_norm)
        elif self.accelerate_style:
            self.__dict__["last_norm"] = clip_grad_norm_like_accelerate(
                self.parameters, self.max_norm
            )
        else:
            self.__dict__["last_norm"] = torch.nn.utils.clip_grad_norm_(
                self.parameters, self.max_norm
            )
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()  # type: ignore[no-any-return]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"ClipThenStep({self.optimizer!r}, max_norm={self.max_norm}, kind={self.kind})"

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def clip_grad_norm_like_accelerate(
    parameters: list[torch.nn.Parameter], max_norm: float
) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_(parameters, max_norm)`, computed the way accelerate's
    `Accelerator.clip_grad_norm_` (what HF Trainer calls) computes it on plain tensors: the norm
    of the stacked per-group norm, then `clip_grads_with_norm_`. The extra 1-element norm can
    differ from the plain call in the last bit, and a guarded twin must match the unguarded
    run bit for bit."""
    utils = torch.nn.utils
    if not hasattr(utils, "get_total_norm"):  # torch < 2.6
        plain: torch.Tensor = utils.clip_grad_norm_(parameters, max_norm)
        return plain
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    group_norm: torch.Tensor = utils.get_total_norm(grads, 2.0)
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack([group_norm]), 2.0)
    utils.clip_grads_with_norm_([p for p in parameters if p.grad is not None], max_norm, total)
    return total
