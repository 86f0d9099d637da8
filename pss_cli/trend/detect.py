"""The early-warning detector: pure functions over per-layer series and the training log.

Per layer and checkpoint t (values undefined at t, e.g. a non-finite matrix, are skipped):
- `floor`: the matrix falls below the rank-aware floor of `pss scan` (its flag) here, having been
  above it at its previous defined point. A matrix already below it at its first checkpoint did
  not fall: it is reported as low from the start, not as a warning (`pss check` gates levels);
- `nonfinite`: the matrix holds NaN/Inf;
- `drop`: SR_t - 1 < (1 - drop_fraction) x (median(SR over the layer's last `window` defined
  points) - 1). Stable rank is bounded below by 1 (rank one), so the fall is measured on the
  distance to that bound: on GPT-2 scale (SR 50-130) it is the plain ratio, and on a small model
  whose healthy SR is 2.5 a fall to 1.16 (a 88 % fall of the excess) still counts. Only with
  `warn_on_drop` (off by default: on a healthy control run it fired while freshly initialised
  matrices were learning, docs/EXPERIMENTS.md);
- `sigma_growth`: sigma_max_t > sigma_growth x median(sigma_max over the same points).
With `spectral=False` (embeddings and the LM head, low-rank by nature and left alone by the
paper's code and by `pss smooth`) only `nonfinite` fires.
A checkpoint where `collapse_layers` or more layers warn is a collapse (the paper: stable ranks
fall "in many layers at once" before an explosion). The last healthy checkpoint is the last one
before the first warning. Torch-free, so it is tested on plain lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

from pss_cli.config import TrendConfig
from pss_cli.results import Flag
from pss_cli.trend.discovery import LogPoint

FLOOR = "floor"
NONFINITE = Flag.NONFINITE  # a scan flag and a warning kind: one word in both JSON reports
DROP = "drop"
SIGMA_GROWTH = "sigma_growth"
# Kinds that say the spectrum itself collapsed: these select the layers to smooth.
SPECTRAL_COLLAPSE = frozenset({FLOOR, DROP})


@dataclass(frozen=True)
class WarningEvent:
    kind: str
    step: int
    value: float | None  # the layer's value at `step` (None for nonfinite)
    reference: float | None  # the threshold it crossed (median of history x factor, or None)


def layer_warnings(
    steps: Sequence[int],
    stable_rank: Sequence[float | None],
    sigma_max: Sequence[float | None],
    flagged_low: Sequence[bool],
    nonfinite: Sequence[bool],
    config: TrendConfig,
    spectral: bool = True,
) -> tuple[WarningEvent, ...]:
    """Every warning of one layer, in step order (a layer may warn at several checkpoints)."""
    events: list[WarningEvent] = []
    history_sr: list[float] = []
    history_sigma: list[float] = []
    previous_low: bool | None = None  # the floor flag at the previous defined point
    for t, step in enumerate(steps):
        sr, sigma = stable_rank[t], sigma_max[t]
        if nonfinite[t]:
            events.append(WarningEvent(NONFINITE, step, None, None))
            continue
        if sr is None:
            continue  # all-zero matrix: no spectrum to judge
        if spectral and flagged_low[t] and previous_low is False:
            events.append(WarningEvent(FLOOR, step, sr, None))
        previous_low = flagged_low[t]
        if spectral and config.warn_on_drop and history_sr:
            limit = 1.0 + (1.0 - config.drop_fraction) * (
                median(history_sr[-config.window :]) - 1.0
            )
            if sr < limit:
                events.append(WarningEvent(DROP, step, sr, limit))
        if spectral and sigma is not None and history_sigma:
            limit = config.sigma_growth * median(history_sigma[-config.window :])
            if sigma > limit:
                events.append(WarningEvent(SIGMA_GROWTH, step, sigma, limit))
        if math.isfinite(sr):
            history_sr.append(sr)
        if sigma is not None and math.isfinite(sigma):
            history_sigma.append(sigma)
    return tuple(events)


def low_from_start(
    stable_rank: Sequence[float | None], flagged_low: Sequence[bool], nonfinite: Sequence[bool]
) -> bool:
    """Below the floor at the layer's first defined point (so the `floor` warning cannot fire)."""
    for sr, low, bad in zip(stable_rank, flagged_low, nonfinite, strict=True):
        if not bad and sr is not None:
            return low
    return False


def grad_spike_step(log: Sequence[LogPoint], config: TrendConfig) -> int | None:
    """First step whose grad norm exceeds `grad_spike_factor` x its EMA, or is not finite."""
    ema: float | None = None
    seen = 0
    for point in log:
        g = point.grad_norm
        if g is None:
            continue
        if not math.isfinite(g):
            if seen >= config.log_warmup_points:
                return point.step
            continue
        warmed = ema is not None and seen >= config.log_warmup_points
        if warmed and ema is not None and g > config.grad_spike_factor * ema:
            return point.step
        ema = g if ema is None else config.grad_ema_decay * ema + (1 - config.grad_ema_decay) * g
        seen += 1
    return None


def loss_spike_step(log: Sequence[LogPoint], config: TrendConfig) -> int | None:
    """First step whose loss exceeds `loss_spike_factor` x the lowest earlier loss, or is not
    finite (after `log_warmup_points` logged losses)."""
    lowest: float | None = None
    seen = 0
    for point in log:
        loss = point.loss
        if loss is None:
            continue
        jumped = lowest is not None and loss > config.loss_spike_factor * lowest
        if seen >= config.log_warmup_points and (not math.isfinite(loss) or jumped):
            return point.step
        if math.isfinite(loss):
            lowest = loss if lowest is None else min(lowest, loss)
            seen += 1
    return None
