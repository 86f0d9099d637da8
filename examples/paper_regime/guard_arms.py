"""The guard settings of the online arms (docs/EXPERIMENTS.md v2, "Arms").

`pss`: the guard's defaults, which are the paper's rule (grad norm as a sum of per-parameter norms
> 2.5x its EMA with decay 0.9, armed after 50 steps, 30-step cooldown) with action "smooth" (smooth
the monitored matrices and skip the step), method `guard_method` (conv: the primary arm), Adam
moments kept. `skip`: the same rule with action "skip": nothing is smoothed, which separates the
effect of smoothing from the effect of dropping the triggering step.
"""

from __future__ import annotations

from typing import Any


def guard_config(config_cls: Any, arm: str, method: str) -> Any:
    from pss_cli.guard.config import TriggerAction

    if arm == "pss":
        return config_cls(spike_action=TriggerAction.SMOOTH, smooth_method=method)
    if arm == "skip":
        return config_cls(spike_action=TriggerAction.SKIP)
    raise ValueError(f"arm {arm!r} does not use the guard")
