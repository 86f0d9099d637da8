"""The guard's trigger rules on host scalars: pure Python, torch-free, each with a state dict.

- `SpikeRule`: the paper's (arXiv 2602.01308 training code): g > factor x EMA(g), armed after
  `warmup` finite steps, then `cooldown` steps during which it cannot fire. A value that fires
  does not enter the EMA.
- `ZScoreRule`: ZClip's (arXiv 2504.02507): EMA mean and variance of g (alpha = weight of the
  past), initialised from the first `warmup` values; fires when (g - mean) / std > threshold.
- `SpectralRule`: per monitored matrix, the checks of `pss scan`/`pss trend` (pss_cli.trend.detect)
  applied to each new monitor reading: fell below the rank-aware floor (having been above it),
  stable rank dropped (optional), sigma_1 grew past a multiple of its recent median.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import median
from typing import Any

from pss_cli.core.metrics import stable_rank_floor


@dataclass
class SpikeRule:
    factor: float
    decay: float
    warmup: int
    cooldown: int
    ema: float | None = None
    seen: int = 0
    cooldown_left: int = 0

    def observe(self, value: float) -> str | None:
        """Feed one finite grad norm; the reason when the rule fires."""
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self._update(value)
            return None
        if self.ema is not None and self.seen >= self.warmup and value > self.factor * self.ema:
            self.cooldown_left = self.cooldown
            return f"grad norm {value:.4g} > {self.factor:g} x its EMA {self.ema:.4g}"
        self._update(value)
        return None

    def tick(self) -> None:
        """A step without a finite value (skipped as non-finite): only the cooldown runs."""
        if self.cooldown_left > 0:
            self.cooldown_left -= 1

    def restart(self) -> None:
        """Forget the EMA and warm up again (the watched norm changed meaning)."""
        self.ema = None
        self.seen = 0

    def _update(self, value: float) -> None:
        self.ema = value if self.ema is None else self.decay * self.ema + (1 - self.decay) * value
        self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "seen": self.seen, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = None if state.get("ema") is None else float(state["ema"])
        self.seen = int(state.get("seen", 0))
        self.cooldown_left = int(state.get("cooldown_left", 0))


@dataclass
class ZScoreRule:
    threshold: float
    alpha: float
    warmup: int
    cooldown: int
    mean: float | None = None
    var: float | None = None
    warmup_values: list[float] = field(default_factory=list)
    cooldown_left: int = 0
    last_z: float | None = None

    def observe(self, value: float) -> str | None:
        self.last_z = None
        if self.mean is None or self.var is None:
            self.warmup_values.append(value)
            if len(self.warmup_values) >= max(1, self.warmup):
                values = self.warmup_values
                self.mean = sum(values) / len(values)
                self.var = sum((v - self.mean) ** 2 for v in values) / len(values)
                self.warmup_values = []
            return None
        std = math.sqrt(self.var)
        z = (value - self.mean) / std if std > 0 else (math.inf if value > self.mean else 0.0)
        self.last_z = z
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
        elif z > self.threshold:
            self.cooldown_left = self.cooldown
            return f"grad norm {value:.4g} is {z:.3g} standard deviations above its mean"
        # After the update, as ZClip: variance around the new mean.
        self.mean = self.alpha * self.mean + (1 - self.alpha) * value
        self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2
        return None

    def tick(self) -> None:
        if self.cooldown_left > 0:
            self.cooldown_left -= 1

    def restart(self) -> None:
        """Forget the mean and variance and warm up again (the watched norm changed meaning)."""
        self.mean = None
        self.var = None
        self.warmup_values = []
        self.last_z = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "var": self.var,
            "warmup_values": list(self.warmup_values),
            "cooldown_left": self.cooldown_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = None if state.get("mean") is None else float(state["mean"])
        self.var = None if state.get("var") is None else float(state["var"])
        self.warmup_values = [float(v) for v in state.get("warmup_values", [])]
        self.cooldown_left = int(state.get("cooldown_left", 0))


@dataclass(frozen=True)
class SpectralWarning:
    name: str
    kind: str  # "floor" | "drop" | "sigma_growth" | "nonfinite" (pss_cli.trend.detect's kinds)
    value: float | None
    reference: float | None

    def text(self) -> str:
        if self.kind == "nonfinite":
            return f"{self.name}: weights not finite"
        if self.kind == "floor":
            return (
                f"{self.name}: stable rank {self.value:.3g} fell below its floor "
                f"{self.reference:.3g}"
            )
        if self.kind == "drop":
            return f"{self.name}: stable rank {self.value:.3g} dropped below {self.reference:.3g}"
        return f"{self.name}: sigma_max {self.value:.4g} grew past {self.reference:.4g}"


@dataclass
class SpectralRule:
    min_stable_rank: float
    floor_fraction: float
    warn_on_drop: bool
    drop_fraction: float
    sigma_growth: float
    window: int
    # Per matrix name: recent finite readings (at most `window`) and the floor flag last seen.
    history_sr: dict[str, list[float]] = field(default_factory=dict)
    history_sigma: dict[str, list[float]] = field(default_factory=dict)
    was_low: dict[str, bool] = field(default_factory=dict)

    def observe(
        self, name: str, short_side: int, sigma: float | None, frob_sq: float | None
    ) -> list[SpectralWarning]:
        """One monitor reading of matrix `name` (None: not finite). Warnings it raises."""
        if sigma is None or frob_sq is None:
            return [SpectralWarning(name, "nonfinite", None, None)]
        if sigma <= 0.0 or frob_sq <= 0.0:
            return []  # an all-zero matrix has no stable rank (as `pss scan`)
        sr = frob_sq / sigma**2
        warnings: list[SpectralWarning] = []
        floor = stable_rank_floor(self.min_stable_rank, short_side, self.floor_fraction)
        low = sr < floor
        if low and self.was_low.get(name) is False:
            warnings.append(SpectralWarning(name, "floor", sr, floor))
        self.was_low[name] = low
        srs = self.history_sr.setdefault(name, [])
        sigmas = self.history_sigma.setdefault(name, [])
        if self.warn_on_drop and len(srs) >= self.window:
            limit = 1.0 + (1.0 - self.drop_fraction) * (median(srs) - 1.0)
            if sr < limit:
                warnings.append(SpectralWarning(name, "drop", sr, limit))
        if len(sigmas) >= self.window:
            limit = self.sigma_growth * median(sigmas)
            if sigma > limit:
                warnings.append(SpectralWarning(name, "sigma_growth", sigma, limit))
        srs.append(sr)
        sigmas.append(sigma)
        del srs[: -self.window]
        del sigmas[: -self.window]
        return warnings

    def recent_stable_rank(self, name: str) -> float | None:
        """Median of the matrix's recent stable ranks (the `cap` target), None without history."""
        values = self.history_sr.get(name)
        return median(values) if values else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "history_sr": {k: list(v) for k, v in self.history_sr.items()},
            "history_sigma": {k: list(v) for k, v in self.history_sigma.items()},
            "was_low": dict(self.was_low),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history_sr = {k: [float(x) for x in v] for k, v in state["history_sr"].items()}
        self.history_sigma = {k: [float(x) for x in v] for k, v in state["history_sigma"].items()}
        self.was_low = {k: bool(v) for k, v in state["was_low"].items()}
