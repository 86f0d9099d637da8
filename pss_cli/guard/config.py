"""`GuardConfig`: every default of the in-training guard in one place, each with its reason.

Torch-free (the config can be built and printed without importing torch).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, fields
from enum import StrEnum

from pss_cli.config import (
    DEFAULT_GRAD_EMA_DECAY,
    DEFAULT_GRAD_SPIKE_FACTOR,
    DEFAULT_MIN_STABLE_RANK,
    DEFAULT_SEED,
    DEFAULT_SOFTMAX_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TREND_DROP_FRACTION,
    DEFAULT_TREND_SIGMA_GROWTH,
    DEFAULT_TREND_WARN_ON_DROP,
    DEFAULT_TREND_WINDOW,
    MIN_STABLE_RANK_FRACTION_OF_RANK,
    TREND_QUIET_ROLES,
    ComputeDtype,
    OptimizerPolicy,
    SmoothingMethod,
)
from pss_cli.errors import GuardConfigError


class TriggerAction(StrEnum):
    """What a rule does when it fires."""

    OFF = "off"  # the rule is not evaluated
    LOG = "log"  # an event and a log line; the step proceeds
    SKIP = "skip"  # the optimizer step is not taken (weights and optimizer state untouched)
    SMOOTH = "smooth"  # smooth the monitored matrices in place, and skip the step (the paper)
    RAISE = "raise"  # skip, then raise GuardTriggered (stop and roll back)


class NormKind(StrEnum):
    """Which gradient norm the spike rules watch."""

    SUM_OF_NORMS = "sum_of_norms"  # sum_p ||g_p||_2, the paper's training code
    L2 = "l2"  # ||concat(g_p)||_2 = sqrt(sum_p ||g_p||^2), what clip_grad_norm_ reports


class SmoothScope(StrEnum):
    """Which matrices a `smooth` action changes."""

    ALL = "all"  # every monitored matrix (the paper's code smooths all of them on a trigger)
    FLAGGED = "flagged"  # only those the spectral rule flagged (falls back to all when none)


@dataclass(frozen=True)
class GuardConfig:
    # --- the paper's rule (arXiv 2602.01308 training code) -------------------------------------
    # grad norm > 2.5 x its EMA (alpha 0.1, i.e. decay 0.9), armed after 50 steps, then 30 steps of
    # cooldown: the paper's values; they fired on ~0.02-0.23 % of its steps. A value that fires
    # does not enter the EMA (a spike must not raise the bar for the next one).
    spike_action: TriggerAction = TriggerAction.SMOOTH
    spike_factor: float = DEFAULT_GRAD_SPIKE_FACTOR
    spike_ema_decay: float = DEFAULT_GRAD_EMA_DECAY
    warmup_steps: int = 50
    cooldown_steps: int = 30
    norm_kind: NormKind = NormKind.SUM_OF_NORMS
    # --- z-score rule (ZClip, arXiv 2504.02507: EMA mean/variance, alpha 0.97, z > 2.5 after 25
    # steps) ------------------------------------------------------------------------------------
    # Log-only by default: it is a second opinion, not the paper's method. Its EMA variance is
    # small on a smooth run, so z > 2.5 fires on ordinary noise far more often than 2.5 x the EMA
    # does (ZClip answers with clipping, a gentle action; skipping every such step would discard
    # real data). Its events show how the two rules would differ on a run.
    zscore_action: TriggerAction = TriggerAction.LOG
    zscore_threshold: float = 2.5
    zscore_alpha: float = 0.97
    zscore_warmup_steps: int = 25
    # --- spectral rule (the thresholds of `pss scan` and `pss trend`) ---------------------------
    # Log-only by default: on the examples/ control run the SR-drop rule fired while freshly
    # initialised matrices were simply learning (docs/EXPERIMENTS.md), and a power-iteration
    # estimate is checked only every `check_every` steps: evidence, not yet a reason to act.
    spectral_action: TriggerAction = TriggerAction.LOG
    # The rank-aware floor of `pss scan`: min(min_stable_rank, fraction x min(m, n)).
    min_stable_rank: float = DEFAULT_MIN_STABLE_RANK
    min_stable_rank_fraction: float = MIN_STABLE_RANK_FRACTION_OF_RANK
    # `pss trend`: SR - 1 < (1 - drop) x (median of the last `window` values - 1) (off by default,
    # see above), and sigma_1 > growth x median of the last `window` values.
    spectral_warn_on_drop: bool = DEFAULT_TREND_WARN_ON_DROP
    spectral_drop_fraction: float = DEFAULT_TREND_DROP_FRACTION
    spectral_sigma_growth: float = DEFAULT_TREND_SIGMA_GROWTH
    spectral_window: int = DEFAULT_TREND_WINDOW
    # --- the monitor ---------------------------------------------------------------------------
    # A check every 10 steps over 8 matrices: one power-iteration pass over a matrix is ~4mn
    # flops against ~6mnT for its share of a training step (T tokens), so the cost is in reading
    # the weights; 8 per check keeps the added reads under ~1 % of a step's on GPT-2-sized models
    # (benchmarks/bench_guard.py) while revisiting each of GPT-2-small's 60 matrices (Q, K, V
    # apart) every ~80 steps. 0 disables the monitor.
    check_every: int = 10
    matrices_per_check: int = 8
    # Power iterations per check (two products each), and on a matrix's first visit, where the
    # start vector is random. Measured from a Gaussian start: 8 iterations gave 84-95 % of
    # sigma_1 on freshly initialised matrices (a flat spectrum converges slowly), 32 gave 99.4 %
    # on a random 768 x 3072 and exact values on 24 x 24 / 96 x 24 ones; the first visit is
    # paid once per matrix. Later checks refine the warm vector by one iteration each.
    power_iters: int = 1
    first_power_iters: int = 32
    # Roles never monitored nor smoothed: low-rank by nature and skipped by the paper's code and
    # `pss smooth` (embeddings, the LM head). 1-D tensors (norms, biases) are never matrices.
    exclude_roles: tuple[str, ...] = TREND_QUIET_ROLES
    # Fused Q/K/V seen as three matrices where the layout is unambiguous (GPT-2 Conv1D c_attn,
    # nn.MultiheadAttention in_proj_weight): the paper's code smooths them apart.
    split_fused_qkv: bool = True
    # --- smoothing (the code of `pss smooth`: pss_cli.core.smoothing) ---------------------------
    # clip by default (sigma_1 set to sigma_2, `clip_count` 1): in docs/EXPERIMENTS.md v2.1, a
    # test with rules committed before its runs, the guard with clip diverged in 0 of 12 seeds
    # at the LR where the baseline diverged in 8 and skip-only in 10 (sign test p = 0.004 and
    # 0.001); the paper's `conv` (its 3-tap filter, needing no target either) in 7, and on the
    # v2 grid conv did not raise the max stable LR. One small Post-LN GPT outside the paper's
    # regime: evidence for this default, not a guarantee. `cap` aims at the matrix's own recent
    # stable rank (the median of its monitor history); matrices with no history are left alone.
    smooth_method: SmoothingMethod = SmoothingMethod.CLIP
    smooth_scope: SmoothScope = SmoothScope.ALL
    softmax_temperature: float = DEFAULT_SOFTMAX_TEMPERATURE
    clip_count: int = 1
    # At least this many top singular triplets (as `pss scan --top-k`); grown when the method
    # reaches deeper (ceil(SR) + 2 for conv/softmax).
    smooth_top_k: int = DEFAULT_TOP_K
    # float32 is what the weights are trained in; the update W + U diag(s' - s) V^T is added in
    # float64 and cast once to the parameter's dtype, so untouched directions keep their values.
    smooth_dtype: ComputeDtype = ComputeDtype.FLOAT32
    # keep: Adam moments untouched (a small targeted edit; Kimi K2's QK-Clip precedent); reset:
    # the smoothed entries' moments zeroed, step counts kept (as `pss smooth --optimizer-state`).
    optimizer_policy: OptimizerPolicy = OptimizerPolicy.KEEP
    # Stable Jacobian Energy (the paper) is computed on every smooth step for free (the top
    # singular triplets are needed anyway). On log/skip/raise trigger steps it needs those
    # triplets for every monitored matrix, as costly as a smooth: off by default, so that a
    # log-only rule firing every 30 steps does not cost a full SVD pass each time.
    sje_on_trigger: bool = False
    # --- misc ----------------------------------------------------------------------------------
    # The monitor's own torch.Generator seed (start vectors, smoothing start blocks): the global
    # RNG is never touched, so a run without triggers is bit-identical to an unguarded one.
    seed: int = DEFAULT_SEED
    # Per-step "decision" records in the JSONL log every this many steps (events always).
    log_every: int = 1

    def __post_init__(self) -> None:
        # Values are checked and normalised here, so that a bad one fails at construction with
        # the field's name, never at the first trigger inside a training step. Strings are
        # accepted for enum and numeric fields ("skip", "2.5", "50"), as a YAML file, an
        # environment variable or a command line gives them; they are stored typed.
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                checked = _check_field(f.name, value)
            except _BadValue as bad:
                raise GuardConfigError(
                    f"GuardConfig.{f.name}: {bad}", "see docs/GUARD.md for the fields and defaults"
                ) from None
            object.__setattr__(self, f.name, checked)
        problems = _problems(self)
        if problems:
            name, text = problems[0]
            raise GuardConfigError(
                f"GuardConfig.{name}: {text}", "see docs/GUARD.md for the fields and defaults"
            )

    def as_dict(self) -> dict[str, object]:
        """JSON-able view (enums as strings), for the event log header."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, StrEnum):
                value = value.value
            out[f.name] = value
        return out


_ENUM_FIELDS: dict[str, type[StrEnum]] = {
    "spike_action": TriggerAction,
    "zscore_action": TriggerAction,
    "spectral_action": TriggerAction,
    "norm_kind": NormKind,
    "smooth_method": SmoothingMethod,
    "smooth_scope": SmoothScope,
    "smooth_dtype": ComputeDtype,
    "optimizer_policy": OptimizerPolicy,
}
_BOOL_FIELDS = frozenset({"spectral_warn_on_drop", "split_fused_qkv", "sje_on_trigger"})
_INT_FIELDS = frozenset(
    {
        "warmup_steps",
        "cooldown_steps",
        "zscore_warmup_steps",
        "spectral_window",
        "check_every",
        "matrices_per_check",
        "power_iters",
        "first_power_iters",
        "clip_count",
        "smooth_top_k",
        "seed",
        "log_every",
    }
)
_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class _BadValue(ValueError):
    """A field's value has the wrong type or form (the message names the value)."""


def _check_field(name: str, value: object) -> object:
    """The field's value, typed: enum members, bools, ints, finite floats, a tuple of roles."""
    if name in _ENUM_FIELDS:
        enum = _ENUM_FIELDS[name]
        if isinstance(value, enum):
            return value
        try:
            return enum(value)  # type: ignore[arg-type]  # a wrong type is refused just below
        except ValueError:
            allowed = ", ".join(member.value for member in enum)
            raise _BadValue(f"{value!r} is not one of {allowed}") from None
    if name in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        # numpy.bool_ and the integers 0 and 1 (a YAML or numpy config's flags).
        numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
        if numpy_bool or (isinstance(value, numbers.Integral) and value in (0, 1)):
            return bool(value)
        raise _BadValue(f"{value!r} is not true or false")
    if name == "exclude_roles":
        return _roles(value)
    return _number(value, whole=name in _INT_FIELDS)


def _number(value: object, whole: bool) -> int | float:
    # bool is an int to Python, but GuardConfig(warmup_steps=True) is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, str | numbers.Real):
        raise _BadValue(f"{value!r} ({type(value).__name__}) is not a number")
    number: int | float
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise _BadValue(f"{value!r} is not a number") from None
    else:
        number = int(value) if isinstance(value, numbers.Integral) else float(value)
    try:
        finite = math.isfinite(float(number))
    except OverflowError:  # an integer beyond float's range (10**400)
        finite = False
    if not finite:
        raise _BadValue(f"{value!r} is not finite")
    if not whole:
        return float(number)
    if isinstance(number, numbers.Integral):
        return int(number)
    if not float(number).is_integer():
        raise _BadValue(f"{value!r} is not a whole number")
    return int(number)


def _roles(value: object) -> tuple[str, ...]:
    from pss_cli.checkpoint.selection import Role

    # Any iterable but a string: OmegaConf's ListConfig, a UserList, a generator.
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise _BadValue(
            f'{value!r} is not a tuple of role names (e.g. exclude_roles=("embedding",))'
        )
    if not isinstance(value, set | frozenset):
        value = list(value)
    allowed = {role.value for role in Role}
    for role in value:
        if str(role) not in allowed:
            raise _BadValue(f"{role!r} is not a role: one of {', '.join(sorted(allowed))}")
    # Sorted for a set's sake: the event log's header must not depend on hash order.
    ordered = sorted(value, key=str) if isinstance(value, set | frozenset) else value
    return tuple(str(role) for role in ordered)


def _problems(config: GuardConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    positive = (
        "spike_factor",
        "zscore_threshold",
        "spectral_sigma_growth",
        "min_stable_rank",
        "softmax_temperature",
    )
    for name in positive:
        if not float(getattr(config, name)) > 0:
            problems.append((name, f"must be positive (got {getattr(config, name)!r})"))
    for name in ("spike_ema_decay", "zscore_alpha"):
        if not 0.0 <= float(getattr(config, name)) < 1.0:
            problems.append((name, f"must be in [0, 1) (got {getattr(config, name)!r})"))
    counts_from = (
        (0, ("warmup_steps", "cooldown_steps", "zscore_warmup_steps", "check_every")),
        (0, ("power_iters", "first_power_iters")),
        (1, ("matrices_per_check", "spectral_window", "log_every", "smooth_top_k")),
        (1, ("clip_count",)),
    )
    for minimum, names in counts_from:
        for name in names:
            if int(getattr(config, name)) < minimum:
                problems.append((name, f"must be >= {minimum} (got {getattr(config, name)!r})"))
    if not 0.0 < config.min_stable_rank_fraction <= 1.0:
        problems.append(
            (
                "min_stable_rank_fraction",
                f"must be in (0, 1] (got {config.min_stable_rank_fraction!r})",
            )
        )
    if not 0.0 < config.spectral_drop_fraction < 1.0:
        problems.append(
            ("spectral_drop_fraction", f"must be in (0, 1) (got {config.spectral_drop_fraction!r})")
        )
    if not 0 <= config.seed < 2**64:
        problems.append(("seed", f"must be in [0, 2**64) (got {config.seed!r})"))
    if config.optimizer_policy == OptimizerPolicy.DROP:
        problems.append(("optimizer_policy", "drop is for checkpoints; use keep or reset"))
    return problems
