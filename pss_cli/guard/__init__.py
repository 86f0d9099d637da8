"""pss guard: the paper's online mode inside training loops (docs/GUARD.md).

    from pss_cli.guard import Guard, GuardConfig
    guard = Guard(model, optimizer, GuardConfig())
    ...
    loss.backward()
    decision = guard.step(loss)   # instead of optimizer.step()

Names are imported lazily (PEP 562): `import pss_cli.guard` does not import torch until a
torch-backed name (Guard, the wrappers) is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pss_cli.errors import GuardConfigError, GuardTriggered
    from pss_cli.guard.config import GuardConfig, NormKind, SmoothScope, TriggerAction
    from pss_cli.guard.guard import Guard
    from pss_cli.guard.results import GuardDecision, GuardEvent
    from pss_cli.guard.telemetry import JsonlSink, Sink
    from pss_cli.guard.wrappers import GuardedOptimizer, GuardedScheduler

_EXPORTS = {
    "Guard": "pss_cli.guard.guard",
    "GuardConfig": "pss_cli.guard.config",
    "TriggerAction": "pss_cli.guard.config",
    "NormKind": "pss_cli.guard.config",
    "SmoothScope": "pss_cli.guard.config",
    "GuardDecision": "pss_cli.guard.results",
    "GuardEvent": "pss_cli.guard.results",
    "GuardConfigError": "pss_cli.errors",
    "GuardTriggered": "pss_cli.errors",
    "GuardedOptimizer": "pss_cli.guard.wrappers",
    "GuardedScheduler": "pss_cli.guard.wrappers",
    "Sink": "pss_cli.guard.telemetry",
    "JsonlSink": "pss_cli.guard.telemetry",
}

__all__ = [
    "Guard",
    "GuardConfig",
    "GuardConfigError",
    "GuardDecision",
    "GuardEvent",
    "GuardTriggered",
    "GuardedOptimizer",
    "GuardedScheduler",
    "JsonlSink",
    "NormKind",
    "Sink",
    "SmoothScope",
    "TriggerAction",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pss_cli.guard' has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return __all__
