"""`Guard`: the paper's online mode (arXiv 2602.01308) inside a training loop.

`guard.step(loss)` replaces `optimizer.step()`. Per step it
1. gathers, on the device, the per-parameter gradient norms, a non-finite flag, the loss and, on
   monitor steps, sigma_1 and ||W||_F^2 of a few matrices, into one float64 vector;
2. under torch.distributed, all-reduces that vector once (SUM: every rank then holds the same
   numbers and takes the same decision; a NaN on one rank is a flag, never a NaN in the sum);
3. reads it with one `.tolist()`: the step's only host synchronisation. (A 0/1 device factor
   applied inside the update, as OLMo-core's SkipStepAdamW does, would remove even that one,
   at the price of an optimizer of our own; the guard keeps the user's optimizer untouched.)
4. decides on the host (pss_cli.guard.rules), then either calls the inner optimizer's `step()`
   or does not call it at all: a skipped step leaves weights and every optimizer state tensor
   (moments, step counts) bit-identical, and weight decay is not applied either;
5. on a `smooth` action, smooths the monitored matrices in place (pss_cli.guard.smooth) and skips.
On an ordinary step the guard only reads: a guarded run is bit-identical to an unguarded one.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pss_cli.config import ComputeDtype, OptimizerPolicy, SmoothingMethod
from pss_cli.core.spectra import KrylovSettings
from pss_cli.errors import GuardConfigError, GuardTriggered
from pss_cli.guard.config import GuardConfig, NormKind, SmoothScope, TriggerAction
from pss_cli.guard.monitor import SpectralMonitor
from pss_cli.guard.results import GuardDecision, GuardEvent
from pss_cli.guard.rules import SpectralRule, SpectralWarning, SpikeRule, ZScoreRule
from pss_cli.guard.smooth import SmoothOutcome, smooth_spec, smoothing_params
from pss_cli.guard.targets import (
    MatrixSpec,
    check_optimizer_holds,
    is_dtensor,
    monitored_matrices,
    trainable_parameters,
)
from pss_cli.guard.telemetry import JsonlSink, Sink

if TYPE_CHECKING:
    from pss_cli.guard.wrappers import GuardedOptimizer, GuardedScheduler

STATE_VERSION = 1
# Severity order: the strongest action among the rules that fired wins.
_SEVERITY = {
    TriggerAction.LOG: 1,
    TriggerAction.SKIP: 2,
    TriggerAction.SMOOTH: 3,
    TriggerAction.RAISE: 4,
}
# The step's vector of scalars: float64. It is a few hundred numbers, so this costs nothing, and
# the all-reduce's x / world + x / world stays exact to far below the float32 rounding the norms
# already carry. (A gradient whose norm overflows float32 inside the norm kernel, > 1.8e19,
# still reads as non-finite and is skipped: no dtype of the vector changes that.)
_VECTOR_DTYPE = torch.float64
# How many parameters a grad-norm trigger names (largest gradient norms first).
_NAMED_LAYERS = 3


class Guard:
    """Decides each optimizer step: take it, skip it, or smooth and skip (docs/GUARD.md)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: GuardConfig | None = None,
        *,
        event_log: str | os.PathLike[str] | None = None,
        sinks: Iterable[Sink] = (),
    ) -> None:
        from pss_cli.guard.wrappers import GuardedOptimizer

        self.config = config if config is not None else GuardConfig()
        if not isinstance(self.config, GuardConfig):
            raise GuardConfigError(
                f"config must be a GuardConfig, got {type(self.config).__name__}",
                "pass GuardConfig(...)",
            )
        if isinstance(optimizer, GuardedOptimizer):
            optimizer = optimizer.optimizer
        self.model = model
        self.optimizer = optimizer
        self._trainable = trainable_parameters(model)
        check_optimizer_holds(self._trainable, optimizer)
        self.specs: list[MatrixSpec] = monitored_matrices(
            model, self._trainable, self.config.exclude_roles, self.config.split_fused_qkv
        )
        self._params = [p for _, p in self._trainable]
        self._names = [name for name, _ in self._trainable]
        self._sharded = [is_dtensor(p) for p in self._params]
        self._device = self._params[0].device
        self._generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        c = self.config
        self.spike = SpikeRule(c.spike_factor, c.spike_ema_decay, c.warmup_steps, c.cooldown_steps)
        self.zscore = ZScoreRule(
            c.zscore_threshold, c.zscore_alpha, c.zscore_warmup_steps, c.cooldown_steps
        )
        self.spectral = SpectralRule(
            c.min_stable_rank,
            c.min_stable_rank_fraction,
            c.spectral_warn_on_drop,
            c.spectral_drop_fraction,
            c.spectral_sigma_growth,
            c.spectral_window,
        )
        self.monitor = SpectralMonitor(
            self.specs,
            c.check_every if c.spectral_action != TriggerAction.OFF else 0,
            c.matrices_per_check,
            c.power_iters,
            c.first_power_iters,
            self._generator,
        )
        self._sinks: list[Sink] = list(sinks)
        self._jsonl: JsonlSink | None = None
        if event_log is not None:
            self._jsonl = JsonlSink(event_log, c.as_dict(), every=c.log_every)
            self._sinks.append(self._jsonl)
        self._failed_sinks: set[int] = set()
        self.events: list[GuardEvent] = []
        self.last_decision: GuardDecision | None = None
        self.step_count = 0
        self.counters: dict[str, int] = {
            "steps": 0,
            "skipped": 0,
            "nonfinite": 0,
            "triggers": 0,
            "smoothed": 0,
            "spike_triggers": 0,
            "zscore_triggers": 0,
            "spectral_triggers": 0,
        }
        # Which monitored matrices the spectral rule flagged most recently (SmoothScope.FLAGGED).
        self._flagged: set[str] = set()

    # --- the step --------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | float | None = None) -> GuardDecision:
        """Decide this step; take the optimizer step, skip it, or smooth and skip it."""
        step = self.step_count
        check = self.monitor.due(step)
        indices = self.monitor.next_indices() if check else []
        values = self._gather(loss, indices)
        n_params = len(self._params)
        nonfinite = values[0] > 0
        loss_value = values[1] if values[2] > 0 else None
        sq_norms = values[3 : 3 + n_params]
        readings = values[3 + n_params :]
        grad_sum = sum(math.sqrt(max(v, 0.0)) for v in sq_norms)
        grad_l2 = math.sqrt(max(sum(sq_norms), 0.0))
        grad_norm = grad_sum if self.config.norm_kind == NormKind.SUM_OF_NORMS else grad_l2
        if nonfinite:
            grad_norm = math.nan

        fired: list[tuple[str, TriggerAction, str]] = []  # (rule, action, reason)
        layers: list[str] = []
        metrics: dict[str, float] = {}
        spectral_warnings = self._read_monitor(indices, readings, metrics)
        if nonfinite:
            self.spike.tick()
            self.zscore.tick()
        else:
            c = self.config
            if c.spike_action != TriggerAction.OFF:
                reason = self.spike.observe(grad_norm)
                if reason is not None:
                    fired.append(("spike", c.spike_action, reason))
            if c.zscore_action != TriggerAction.OFF:
                reason = self.zscore.observe(grad_norm)
                if reason is not None:
                    fired.append(("zscore", c.zscore_action, reason))
            if fired:
                layers = self._top_grad_layers(sq_norms)
        if spectral_warnings and self.config.spectral_action != TriggerAction.OFF:
            text = "; ".join(w.text() for w in spectral_warnings)
            fired.append(("spectral", self.config.spectral_action, f"spectral: {text}"))
            self._flagged = {w.name for w in spectral_warnings if w.kind != "nonfinite"}
            layers = [w.name for w in spectral_warnings] + layers

        action = max((a for _, a, _ in fired), key=_SEVERITY.__getitem__, default=None)
        skip = nonfinite or action in (
            TriggerAction.SKIP,
            TriggerAction.SMOOTH,
            TriggerAction.RAISE,
        )
        reasons = [r for _, _, r in fired]
        if nonfinite:
            reasons.insert(0, "non-finite loss or gradients")
        reason = "; ".join(reasons) if reasons else None
        actions: list[str] = []
        smoothed: tuple[str, ...] = ()
        outcomes: list[SmoothOutcome] = []
        if fired:
            self.counters["triggers"] += 1
            for rule, rule_action, rule_reason in fired:
                self.counters[f"{rule}_triggers"] += 1
                self._emit(
                    GuardEvent(
                        step,
                        "trigger",
                        rule_reason,
                        {"rule": rule, "action": str(rule_action), "layers": list(layers)},
                    )
                )
            if action == TriggerAction.LOG:
                actions.append("log")
        if nonfinite:
            self.counters["nonfinite"] += 1
            self._emit(
                GuardEvent(
                    step,
                    "nonfinite",
                    "non-finite loss or gradients: step skipped",
                    {"loss": loss_value, "layers": self._nonfinite_layers()},
                )
            )
        if action == TriggerAction.SMOOTH and not nonfinite:
            outcomes = self._smooth(step)
            smoothed = tuple(o.name for o in outcomes if o.changed)
            actions.append("smooth")
            for outcome in outcomes:
                if outcome.sje is not None:
                    metrics[f"sje/{outcome.name}"] = outcome.sje
            self.counters["smoothed"] += len(smoothed)
            self._emit(
                GuardEvent(
                    step,
                    "smooth",
                    f"smoothed {len(smoothed)} of {len(outcomes)} matrices "
                    f"({self.config.smooth_method})",
                    {"method": str(self.config.smooth_method), "matrices": _outcomes(outcomes)},
                )
            )
        if skip:
            actions.append("skip")
            self.counters["skipped"] += 1
            self._emit(GuardEvent(step, "skip", reason or "skipped", {"grad_norm": grad_norm}))
        else:
            self.optimizer.step()
        self.counters["steps"] += 1
        self.step_count += 1

        decision = GuardDecision(
            step=step,
            skipped=skip,
            triggered=bool(fired) or nonfinite,
            reason=reason,
            smoothed=smoothed,
            grad_norm=grad_norm,
            loss=loss_value,
            actions=tuple(actions),
        )
        self.last_decision = decision
        metrics.update(
            {
                "grad_norm": grad_norm,
                "grad_norm_sum": grad_sum if not nonfinite else math.nan,
                "grad_norm_l2": grad_l2 if not nonfinite else math.nan,
                "skipped": float(skip),
                "triggered": float(decision.triggered),
            }
        )
        if loss_value is not None:
            metrics["loss"] = loss_value
        if self.spike.ema is not None:
            metrics["spike_ema"] = self.spike.ema
        if self.zscore.last_z is not None:
            metrics["zscore"] = self.zscore.last_z
        self._record(step, metrics, None)
        if action == TriggerAction.RAISE and not nonfinite:
            self._emit(GuardEvent(step, "raise", reason or "", {"layers": list(layers)}))
            raise GuardTriggered(
                f"pss guard stopped training at step {step}: {reason}"
                + (f" (layers: {', '.join(layers[: _NAMED_LAYERS * 2])})" if layers else ""),
                "the step was skipped; roll back to the last good checkpoint and lower the "
                "learning rate, or set the rule's action to 'smooth' or 'skip' "
                "(GuardConfig.spike_action / zscore_action / spectral_action)",
                step=step,
                layers=tuple(layers),
            )
        return decision

    def _gather(self, loss: torch.Tensor | float | None, indices: list[int]) -> list[float]:
        """[nonfinite flag, loss, has loss, ||g_p||^2 per param..., monitor readings...]."""
        device = self._device
        zero = torch.zeros((), dtype=_VECTOR_DTYPE, device=device)
        norms = _squared_grad_norms(self._params, device) if self._params else zero.new_zeros(0)
        if loss is None:
            loss_t, has_loss = zero, zero
        elif isinstance(loss, torch.Tensor):
            loss_t = loss.detach().reshape(-1)[0].to(device=device, dtype=_VECTOR_DTYPE)
            has_loss = torch.ones((), dtype=_VECTOR_DTYPE, device=device)
        else:
            loss_t = torch.tensor(float(loss), dtype=_VECTOR_DTYPE, device=device)
            has_loss = torch.ones((), dtype=_VECTOR_DTYPE, device=device)
        bad = (~torch.isfinite(norms)).sum() + (~torch.isfinite(loss_t)).to(_VECTOR_DTYPE)
        norms = torch.where(torch.isfinite(norms), norms, zero)
        loss_t = torch.where(torch.isfinite(loss_t), loss_t, zero)
        if indices:
            readings = self.monitor.measure(indices, device)
            # A non-finite reading becomes -1 (readings are >= 0): the rule reports the matrix.
            readings = torch.where(torch.isfinite(readings), readings, -torch.ones_like(readings))
        else:
            readings = zero.new_zeros(0)
        vector = torch.cat(
            [
                bad.to(_VECTOR_DTYPE).reshape(1),
                loss_t.reshape(1),
                has_loss.reshape(1),
                norms,
                readings,
            ]
        )
        world = _world_size()
        if world > 1:
            # Replicated numbers (DDP grads after their all-reduce, the loss, readings of
            # replicated weights) enter as x / world, so the SUM gives their mean; a shard's
            # squared norm enters whole, so the SUM gives the full tensor's.
            scale = torch.full_like(vector, 1.0 / world)
            scale[0] = 1.0
            shard = torch.tensor(self._sharded, dtype=torch.bool, device=device)
            scale[3 : 3 + len(self._params)] = torch.where(
                shard, torch.ones_like(norms), torch.full_like(norms, 1.0 / world)
            )
            vector = vector * scale
            import torch.distributed as dist

            dist.all_reduce(vector, op=dist.ReduceOp.SUM)
        values: list[float] = vector.tolist()  # the step's one host synchronisation
        return values

    def _read_monitor(
        self, indices: list[int], readings: list[float], metrics: dict[str, float]
    ) -> list[SpectralWarning]:
        count = len(indices)
        found: list[SpectralWarning] = []
        for j, index in enumerate(indices):
            spec = self.specs[index]
            sigma, frob_sq = readings[j], readings[count + j]
            ok = sigma >= 0 and frob_sq >= 0
            if ok:
                metrics[f"sigma_max/{spec.name}"] = sigma
                if sigma > 0:
                    metrics[f"stable_rank/{spec.name}"] = frob_sq / sigma**2
            found.extend(
                self.spectral.observe(
                    spec.name,
                    spec.short_side,
                    sigma if ok else None,
                    frob_sq if ok else None,
                )
            )
        return found

    def _top_grad_layers(self, sq_norms: Sequence[float]) -> list[str]:
        order = sorted(range(len(sq_norms)), key=lambda i: -sq_norms[i])
        return [self._names[i] for i in order[:_NAMED_LAYERS]]

    def _nonfinite_layers(self) -> list[str]:
        """Names of parameters whose gradient is not finite (this path is rare: a sync is fine)."""
        bad = []
        for name, p in self._trainable:
            grad = p.grad
            if grad is None:
                continue
            local = grad.to_local() if is_dtensor(grad) else grad  # type: ignore[attr-defined]
            if not bool(torch.isfinite(local).all()):
                bad.append(name)
        return bad[:20]

    # --- smoothing -------------------------------------------------------------------------

    def _smooth(self, step: int) -> list[SmoothOutcome]:
        c = self.config
        specs = self.specs
        if c.smooth_scope == SmoothScope.FLAGGED and self._flagged:
            specs = [s for s in self.specs if s.name in self._flagged]
        dtype = torch.float64 if c.smooth_dtype == ComputeDtype.FLOAT64 else torch.float32
        settings = KrylovSettings()
        outcomes: list[SmoothOutcome] = []
        touched: list[MatrixSpec] = []
        for index, spec in enumerate(specs):
            target = None
            if c.smooth_method == SmoothingMethod.CAP:
                target = self.spectral.recent_stable_rank(spec.name)
                if target is None:
                    outcomes.append(
                        SmoothOutcome(
                            spec.name,
                            False,
                            None,
                            None,
                            None,
                            None,
                            None,
                            "cap: no stable-rank history yet (no target)",
                        )
                    )
                    continue
            params = smoothing_params(c.smooth_method, target, c.softmax_temperature, c.clip_count)
            # A per-matrix, per-step seed: reproducible, independent of the global RNG.
            seed = (c.seed * 1_000_003 + step * 1009 + index) % (2**63)
            outcome = smooth_spec(spec, params, c.smooth_top_k, dtype, seed, settings, write=True)
            outcomes.append(outcome)
            if outcome.changed:
                touched.append(spec)
        if c.optimizer_policy == OptimizerPolicy.RESET:
            self._reset_moments(touched)
        return outcomes

    def _reset_moments(self, specs: list[MatrixSpec]) -> None:
        """Zero the smoothed entries' optimizer moments (same shape as the parameter); step
        counts are kept, as `pss smooth --optimizer-state reset`."""
        with torch.no_grad():
            for spec in specs:
                state = self.optimizer.state.get(spec.param, {})
                for key, value in state.items():
                    if key == "step" or not isinstance(value, torch.Tensor):
                        continue
                    if value.shape == spec.param.shape and value.is_floating_point():
                        local = value.to_local() if is_dtensor(value) else value  # type: ignore[attr-defined]
                        if is_dtensor(value):
                            local.zero_()  # sharded moments: each rank zeroes its shard
                        else:
                            spec.view(local).zero_()

    # --- telemetry -------------------------------------------------------------------------

    def _emit(self, event: GuardEvent) -> None:
        self.events.append(event)
        self._record(event.step, {}, event)

    def _record(self, step: int, metrics: dict[str, float], event: GuardEvent | None) -> None:
        for sink in self._sinks:
            if id(sink) in self._failed_sinks:
                continue
            try:
                sink.record(step, metrics, event)
            except Exception as error:  # a sink must never stop training
                self._failed_sinks.add(id(sink))
                warnings.warn(
                    f"pss guard: sink {type(sink).__name__} failed ({error!r}); disabled",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def close(self) -> None:
        """Close the event log (also safe to skip: it is line-buffered)."""
        if self._jsonl is not None:
            self._jsonl.close()

    # --- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; loadable with torch.load(weights_only=True)."""
        return {
            "version": STATE_VERSION,
            "step_count": self.step_count,
            "counters": dict(self.counters),
            "spike": self.spike.state_dict(),
            "zscore": self.zscore.state_dict(),
            "spectral": self.spectral.state_dict(),
            "monitor": self.monitor.state_dict(),
            "flagged": sorted(self._flagged),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise GuardConfigError(
                "guard state has an unknown format (version "
                f"{state.get('version') if isinstance(state, dict) else None!r})",
                f"load a state saved by Guard.state_dict() (version {STATE_VERSION})",
            )
        self.step_count = int(state["step_count"])
        self.counters.update({k: int(v) for k, v in state["counters"].items()})
        self.spike.load_state_dict(state["spike"])
        self.zscore.load_state_dict(state["zscore"])
        self.spectral.load_state_dict(state["spectral"])
        self.monitor.load_state_dict(state["monitor"])
        self._flagged = set(state.get("flagged", []))
        self._generator.set_state(state["generator"])

    # --- wrappers --------------------------------------------------------------------------

    def wrap_optimizer(self) -> GuardedOptimizer:
        """An optimizer whose `step()` is `guard.step(loss)` (docs/GUARD.md)."""
        from pss_cli.guard.wrappers import GuardedOptimizer

        return GuardedOptimizer(self)

    def wrap_scheduler(self, scheduler: Any) -> GuardedScheduler:
        """A scheduler whose `step()` does nothing after a skipped step."""
        from pss_cli.guard.wrappers import GuardedScheduler

        return GuardedScheduler(self, scheduler)


def _squared_grad_norms(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    """(P,) float64 ||g_p||^2 per parameter (0 without a gradient; a DTensor's local shard), on
    `device`, without a host synchronisation.

    float32/float64 gradients of one device go through one fused `torch._foreach_norm` (what
    `clip_grad_norm_` uses: one kernel launch per group instead of one per parameter); others
    (bf16/fp16) are reduced one by one in float32, which keeps their norm from rounding to
    the gradient's 8-bit mantissa.
    """
    squared: list[torch.Tensor | None] = [None] * len(params)
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
    for i, p in enumerate(params):
        grad = p.grad
        if grad is None:
            continue
        local = grad.to_local() if is_dtensor(grad) else grad  # type: ignore[attr-defined]
        local = local.detach()
        if local.dtype in (torch.float32, torch.float64) and not local.is_sparse:
            groups.setdefault((local.device, local.dtype), []).append((i, local))
        else:
            norm = torch.linalg.vector_norm(local, dtype=torch.float32)
            squared[i] = norm.to(device=device, dtype=_VECTOR_DTYPE).square()
    for members in groups.values():
        norms = torch._foreach_norm([t for _, t in members])
        for (i, _), norm in zip(members, norms, strict=True):
            squared[i] = norm.to(device=device, dtype=_VECTOR_DTYPE).square()
    zero = torch.zeros((), dtype=_VECTOR_DTYPE, device=device)
    return torch.stack([zero if sq is None else sq for sq in squared])


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def _outcomes(outcomes: list[SmoothOutcome]) -> list[dict[str, Any]]:
    return [
        {
            "name": o.name,
            "changed": o.changed,
            "stable_rank_before": o.stable_rank_before,
            "stable_rank_after": o.stable_rank_after,
            "sigma_max_before": o.sigma_max_before,
            "sigma_max_after": o.sigma_max_after,
            "sje": o.sje,
            "note": o.skipped_reason,
        }
        for o in outcomes
    ]
