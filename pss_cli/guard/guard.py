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

Steps 1-3 are in pss_cli/guard/reading.py, step 5 in pss_cli/guard/actions.py; this class
holds the state, decides, records the events and saves/restores its state.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pss_cli.config import SmoothingMethod
from pss_cli.errors import GuardConfigError, GuardTriggered
from pss_cli.guard.actions import measure_sje, outcome_rows, smooth_matrices
from pss_cli.guard.config import GuardConfig, TriggerAction
from pss_cli.guard.monitor import SpectralMonitor
from pss_cli.guard.reading import (
    Reading,
    gather_step,
    nonfinite_layers,
    norm_share,
    read_step,
    world_size,
)
from pss_cli.guard.results import GuardDecision, GuardEvent
from pss_cli.guard.rules import SpectralRule, SpikeRule, ZScoreRule
from pss_cli.guard.targets import (
    MatrixSpec,
    check_optimizer_holds,
    frozen_candidates,
    monitored_matrices,
    trainable_now,
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
        # A model whose eligible matrices are all frozen for now (progressive unfreezing that
        # starts from the head) is accepted: they are monitored once unfrozen (_refresh_specs).
        later = bool(frozen_candidates(model, self.config.exclude_roles))
        self.specs: list[MatrixSpec] = monitored_matrices(
            model,
            self._trainable,
            self.config.exclude_roles,
            self.config.split_fused_qkv,
            allow_empty=later,
        )
        self._specs_key: tuple[Any, ...] | None = None
        self._device = self._trainable[0][1].device
        self._watched: list[tuple[str, nn.Parameter]] = []
        self._params: list[nn.Parameter] = []
        self._names: list[str] = []
        self._shares: list[float] = []
        self._watch_key: tuple[object, ...] | None = None
        self._trainable_key: tuple[bool, ...] | None = None
        self._refresh_watched()
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
            # The monitor runs when its readings are used: by the spectral rule, or as the
            # history `cap` takes its targets from.
            c.check_every
            if c.spectral_action != TriggerAction.OFF or c.smooth_method == SmoothingMethod.CAP
            else 0,
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
        self._refresh_watched()
        self._restart_rules_if_the_trainable_set_changed(step)
        self._refresh_specs()
        indices = self.monitor.next_indices() if self.monitor.due(step) else []
        measure = (lambda: self.monitor.measure(indices, self._device)) if indices else None
        values = gather_step(self._params, self._shares, self._device, loss, measure)
        reading = read_step(
            values, indices, len(self._params), self.config.norm_kind, self.specs, self.spectral
        )
        fired, layers = self._evaluate(reading)
        action = max((a for _, a, _ in fired), key=_SEVERITY.__getitem__, default=None)
        nonfinite = reading.nonfinite
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
        if fired:
            self._record_triggers(step, fired, layers, action, reading.metrics)
            if action == TriggerAction.LOG:
                actions.append("log")
        if nonfinite:
            self.counters["nonfinite"] += 1
            detail = {"loss": reading.loss, "layers": nonfinite_layers(self._watched)}
            reason_text = "non-finite loss or gradients: step skipped"
            self._emit(GuardEvent(step, "nonfinite", reason_text, detail))
        elif action == TriggerAction.SMOOTH:
            smoothed = self._smooth_and_record(step, reading.metrics)
            actions.append("smooth")
        if skip:
            actions.append("skip")
            self.counters["skipped"] += 1
            detail = {"grad_norm": reading.grad_norm}
            self._emit(GuardEvent(step, "skip", reason or "skipped", detail))
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
            grad_norm=reading.grad_norm,
            loss=reading.loss,
            actions=tuple(actions),
        )
        self.last_decision = decision
        self._record(step, self._step_metrics(decision, reading), None)
        if action == TriggerAction.RAISE and not nonfinite:
            self._raise(step, reason or "", layers)
        return decision

    def _evaluate(self, reading: Reading) -> tuple[list[tuple[str, TriggerAction, str]], list[str]]:
        """The rules that fired, as (rule, action, reason), and the layers they name."""
        c = self.config
        fired: list[tuple[str, TriggerAction, str]] = []
        layers: list[str] = []
        # No gradient at all (a step before the first backward, or all frozen this step): the
        # norm is 0 by construction, not a measurement; it must not drag the EMAs to zero. The
        # same for gradients that are all exactly zero (a step without backward after
        # zero_grad(set_to_none=False)): no real step has a zero gradient everywhere.
        has_grads = any(p.grad is not None for p in self._params) and reading.grad_l2 > 0
        if reading.nonfinite or not has_grads:
            self.spike.tick()
            self.zscore.tick()
        else:
            if c.spike_action != TriggerAction.OFF:
                reason = self.spike.observe(reading.grad_norm)
                if reason is not None:
                    fired.append(("spike", c.spike_action, reason))
            if c.zscore_action != TriggerAction.OFF:
                reason = self.zscore.observe(reading.grad_norm)
                if reason is not None:
                    fired.append(("zscore", c.zscore_action, reason))
            if fired:
                layers = self._top_grad_layers(reading.sq_norms)
        if reading.spectral and c.spectral_action != TriggerAction.OFF:
            text = "; ".join(w.text() for w in reading.spectral)
            fired.append(("spectral", c.spectral_action, f"spectral: {text}"))
            self._flagged = {w.name for w in reading.spectral if w.kind != "nonfinite"}
            layers = [w.name for w in reading.spectral] + layers
        return fired, layers

    def _record_triggers(
        self,
        step: int,
        fired: list[tuple[str, TriggerAction, str]],
        layers: list[str],
        action: TriggerAction | None,
        metrics: dict[str, float],
    ) -> None:
        sje: dict[str, float] = {}
        if action != TriggerAction.SMOOTH and self.config.sje_on_trigger:
            sje = measure_sje(self.config, self.specs, step)
            metrics.update({f"sje/{name}": value for name, value in sje.items()})
        self.counters["triggers"] += 1
        for rule, rule_action, rule_reason in fired:
            self.counters[f"{rule}_triggers"] += 1
            detail: dict[str, Any] = {
                "rule": rule,
                "action": str(rule_action),
                "layers": list(layers),
            }
            if sje:
                detail["sje"] = dict(sje)
            self._emit(GuardEvent(step, "trigger", rule_reason, detail))

    def _smooth_and_record(self, step: int, metrics: dict[str, float]) -> tuple[str, ...]:
        outcomes = smooth_matrices(
            self.config, self.specs, self._flagged, self.spectral, self.optimizer, step
        )
        smoothed = tuple(o.name for o in outcomes if o.changed)
        for outcome in outcomes:
            if outcome.sje is not None:
                metrics[f"sje/{outcome.name}"] = outcome.sje
        self.counters["smoothed"] += len(smoothed)
        method = str(self.config.smooth_method)
        self._emit(
            GuardEvent(
                step,
                "smooth",
                f"smoothed {len(smoothed)} of {len(outcomes)} matrices ({method})",
                {"method": method, "matrices": outcome_rows(outcomes)},
            )
        )
        return smoothed

    def _step_metrics(self, decision: GuardDecision, reading: Reading) -> dict[str, float]:
        metrics = dict(reading.metrics)
        metrics.update(
            {
                "grad_norm": reading.grad_norm,
                "grad_norm_sum": reading.grad_sum,
                "grad_norm_l2": reading.grad_l2,
                "skipped": float(decision.skipped),
                "triggered": float(decision.triggered),
            }
        )
        if reading.loss is not None:
            metrics["loss"] = reading.loss
        if self.spike.ema is not None:
            metrics["spike_ema"] = self.spike.ema
        if self.zscore.last_z is not None:
            metrics["zscore"] = self.zscore.last_z
        return metrics

    def _raise(self, step: int, reason: str, layers: list[str]) -> None:
        self._emit(GuardEvent(step, "raise", reason, {"layers": list(layers)}))
        named = f" (layers: {', '.join(layers[: _NAMED_LAYERS * 2])})" if layers else ""
        raise GuardTriggered(
            f"pss guard stopped training at step {step}: {reason}{named}",
            "the step was skipped; roll back to the last good checkpoint and lower the "
            "learning rate, or set the rule's action to 'smooth' or 'skip' "
            "(GuardConfig.spike_action / zscore_action / spectral_action)",
            step=step,
            layers=tuple(layers),
        )

    def _refresh_watched(self) -> None:
        """Watch every parameter the optimizer updates, not only the model's trainable ones at
        construction: a parameter unfrozen later (progressive unfreezing with an optimizer
        built from model.parameters()), one added by `add_param_group`, or one outside the
        model (a learnable loss temperature) would otherwise take a NaN gradient into the
        weights on a step the guard called finite. Rebuilt when the param groups change
        (their count or sizes: a few integers compared per step). The same list on every
        rank, in the optimizer's order, so the all-reduced vector lines up.
        """
        groups = self.optimizer.param_groups
        # The world size too: a guard built before init_process_group must not keep the
        # one-process shares (a replicated gradient then read sqrt(world) too large).
        world = world_size()
        key = (world, *((id(group["params"]), len(group["params"])) for group in groups))
        if key == self._watch_key:
            return
        names = {id(p): name for name, p in self.model.named_parameters()}
        seen: set[int] = set()
        watched: list[tuple[str, nn.Parameter]] = []
        for g, group in enumerate(groups):
            for i, p in enumerate(group["params"]):
                if id(p) not in seen:
                    seen.add(id(p))
                    watched.append((names.get(id(p), f"param_groups[{g}].params[{i}]"), p))
        self._watched = watched
        self._params = [p for _, p in watched]
        self._names = [name for name, _ in watched]
        self._shares = [norm_share(p, world) for p in self._params]
        self._watch_key = key

    def _restart_rules_if_the_trainable_set_changed(self, step: int) -> None:
        """Restart the spike and z-score rules' warm-up when parameters are unfrozen or frozen.

        The watched norm then changes for good: unfreezing three of four layers raised it ~3x,
        a value that fires never enters the EMA, so the spike rule fired again after every
        cooldown (and smoothed each time). The rules' statistics start over instead, with
        their warm-up. Keyed on requires_grad, not on which gradients exist, so that a
        mixture-of-experts step that leaves an expert without gradient restarts nothing.
        """
        key = tuple(p.requires_grad for p in self._params)
        if self._trainable_key is not None and key != self._trainable_key:
            self.spike.restart()
            self.zscore.restart()
            detail = {"trainable": sum(key), "watched": len(key)}
            reason = (
                f"the trainable parameters changed ({sum(key)} of {len(key)} now): the spike "
                "and z-score rules warm up again"
            )
            self._emit(GuardEvent(step, "restart", reason, detail))
        self._trainable_key = key

    def _refresh_specs(self) -> None:
        """Monitor and smooth the matrices that are trainable now, not those of construction.

        A matrix frozen after the guard was built was still smoothed (a frozen weight
        rewritten), and one unfrozen or added with `add_param_group` later was never measured
        nor smoothed. Rebuilt when the param groups or the requires_grad flags change (the
        keys `_refresh_watched` and the restart check already keep); the monitor keeps the
        vectors of the matrices that stay, and the spectral rule its history (both by name).
        """
        key = (self._watch_key, self._trainable_key)
        if key == self._specs_key:
            return
        self._specs_key = key
        c = self.config
        specs = monitored_matrices(
            self.model,
            trainable_now(self.model, self._watched),
            c.exclude_roles,
            c.split_fused_qkv,
            allow_empty=True,
        )
        if [(s.name, id(s.param)) for s in specs] == [(s.name, id(s.param)) for s in self.specs]:
            return
        self.specs = specs
        self.monitor.set_specs(specs)

    def _top_grad_layers(self, sq_norms: Sequence[float]) -> list[str]:
        order = sorted(range(len(sq_norms)), key=lambda i: -sq_norms[i])
        return [self._names[i] for i in order[:_NAMED_LAYERS]]

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
        # On the CPU whatever the state went through: accelerate moves the optimizer's state
        # dict (which carries this one) to the GPU in `prepare`, and a resume may load it with
        # map_location="cuda"; a CPU generator takes only a CPU ByteTensor.
        self._generator.set_state(state["generator"].to("cpu"))

    # --- wrappers --------------------------------------------------------------------------

    def wrap_optimizer(self) -> GuardedOptimizer:
        """An optimizer whose `step()` is `guard.step(loss)` (docs/GUARD.md)."""
        from pss_cli.guard.wrappers import GuardedOptimizer

        return GuardedOptimizer(self)

    def wrap_scheduler(self, scheduler: Any, *, per_step: bool = True) -> GuardedScheduler:
        """A scheduler whose `step()` does nothing after a skipped step, and an instance of the
        scheduler's own class (frameworks dispatch on it). per_step=False, for a schedule
        stepped once per epoch, and any ReduceLROnPlateau always step (wrappers.py)."""
        from pss_cli.guard.wrappers import scheduler_proxy

        return scheduler_proxy(self, scheduler, per_step=per_step)
