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
from pss_cli.guard.proxy import OptimizerProxy


class ClipKind(StrEnum):
    NORM = "norm"  # scale all gradients so their global L2 norm is at most max_norm
    VALUE = "value"  # clamp each gradient entry to [-max_norm, max_norm] (Lightning "value")


class ClipThenStep(OptimizerProxy):
    """The user's optimizer, whose `step()` first clips the gradients of `parameters`.

    An `OptimizerProxy` like `GuardedOptimizer`: the inner optimizer owns param_groups, state,
    defaults and hooks, and its state_dict is this object's (a checkpoint does not change by
    adding the clip).
    """

    _OWN = frozenset(
        {"optimizer", "parameters", "max_norm", "kind", "accelerate_style", "last_norm"}
    )

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.nn.Parameter],
        max_norm: float,
        kind: ClipKind | str = ClipKind.NORM,
        *,
        accelerate_style: bool = False,
    ) -> None:
        if not max_norm > 0:
            raise GuardConfigError(
                f"max_grad_norm must be positive (got {max_norm})", "pass None to not clip"
            )
        super().__init__(optimizer)
        self.__dict__["parameters"] = list(parameters)
        self.__dict__["max_norm"] = float(max_norm)
        self.__dict__["kind"] = ClipKind(kind)
        self.__dict__["accelerate_style"] = accelerate_style
        # The last pre-clip global norm (a 0-dim tensor, never synchronised here), for logging.
        self.__dict__["last_norm"] = None

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

    def __repr__(self) -> str:
        return f"ClipThenStep({self.optimizer!r}, max_norm={self.max_norm}, kind={self.kind})"


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
