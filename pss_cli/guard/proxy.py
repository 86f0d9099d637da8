"""`OptimizerProxy`: a `torch.optim.Optimizer` that is another optimizer.

LR schedulers, Lightning and accelerate check `isinstance(x, torch.optim.Optimizer)`, so the
guard's wrappers must be optimizers; but the user's optimizer must keep owning param_groups,
state, defaults and hooks (a checkpoint does not change by wrapping it). So a proxy deliberately
does not call `Optimizer.__init__` and delegates everything but `step()` (and, where a subclass
says so, its state dict) to the inner optimizer. Subclasses name their own attributes in `_OWN`
and store them in `__dict__`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class OptimizerProxy(torch.optim.Optimizer):
    _OWN: ClassVar[frozenset[str]] = frozenset({"optimizer"})
    # Never forwarded from a fused inner optimizer: with it True, `GradScaler.step(proxy)`
    # skips its own unscale and sets `grad_scale`/`found_inf` on the proxy for the inner
    # kernel to apply, which never sees them (they are not forwarded on writes), so a fused
    # SGD stepped on gradients still multiplied by the scale (weights moved 1024x too far) and
    # the guard judged scaled norms. False: the scaler unscales first and skips the step on
    # an overflow itself, as for any other optimizer.
    _step_supports_amp_scaling: ClassVar[bool] = False

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__ on purpose
        self.__dict__["optimizer"] = optimizer

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
        # Only reached for names not found on the proxy: hook registries, custom attributes.
        if name in self._OWN:
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()  # type: ignore[no-any-return]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
