"""What a `smooth` action does (step 5 of pss_cli/guard/guard.py): smooth the monitored matrices
in place (pss_cli.guard.smooth), reset their optimizer moments when asked, and measure SJE
without writing; plus the event's per-matrix rows.
"""

from __future__ import annotations

from typing import Any

import torch

from pss_cli.config import ComputeDtype, OptimizerPolicy, SmoothingMethod
from pss_cli.core.spectra import KrylovSettings
from pss_cli.guard.config import GuardConfig, SmoothScope
from pss_cli.guard.rules import SpectralRule
from pss_cli.guard.smooth import SmoothOutcome, smooth_spec, smoothing_params
from pss_cli.guard.targets import MatrixSpec, is_dtensor


def smooth_matrices(
    config: GuardConfig,
    all_specs: list[MatrixSpec],
    flagged: set[str],
    spectral: SpectralRule,
    optimizer: torch.optim.Optimizer,
    step: int,
) -> list[SmoothOutcome]:
    """Smooth the monitored matrices in place (only the spectral rule's `flagged` ones under
    SmoothScope.FLAGGED); `cap` takes each target from `spectral`'s stable-rank history."""
    c = config
    specs = all_specs
    if c.smooth_scope == SmoothScope.FLAGGED and flagged:
        specs = [s for s in all_specs if s.name in flagged]
    dtype = torch.float64 if c.smooth_dtype == ComputeDtype.FLOAT64 else torch.float32
    settings = KrylovSettings()
    outcomes: list[SmoothOutcome] = []
    touched: list[MatrixSpec] = []
    for index, spec in enumerate(specs):
        target = None
        if c.smooth_method == SmoothingMethod.CAP:
            target = spectral.recent_stable_rank(spec.name)
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
        reset_moments(optimizer, touched)
    return outcomes


def measure_sje(config: GuardConfig, specs: list[MatrixSpec], step: int) -> dict[str, float]:
    """SJE of every monitored matrix from this step's gradients, weights unchanged."""
    c = config
    dtype = torch.float64 if c.smooth_dtype == ComputeDtype.FLOAT64 else torch.float32
    params = smoothing_params(SmoothingMethod.CONV, None, c.softmax_temperature, c.clip_count)
    out: dict[str, float] = {}
    for index, spec in enumerate(specs):
        seed = (c.seed * 1_000_003 + step * 1009 + index) % (2**63)
        outcome = smooth_spec(
            spec, params, c.smooth_top_k, dtype, seed, KrylovSettings(), write=False
        )
        if outcome.sje is not None:
            out[spec.name] = outcome.sje
    return out


def reset_moments(optimizer: torch.optim.Optimizer, specs: list[MatrixSpec]) -> None:
    """Zero the smoothed entries' optimizer moments (same shape as the parameter); step
    counts are kept, as `pss smooth --optimizer-state reset`."""
    with torch.no_grad():
        for spec in specs:
            state = optimizer.state.get(spec.param, {})
            for key, value in state.items():
                if key == "step" or not isinstance(value, torch.Tensor):
                    continue
                if value.shape == spec.param.shape and value.is_floating_point():
                    local = value.to_local() if is_dtensor(value) else value  # type: ignore[attr-defined]
                    if is_dtensor(value):
                        local.zero_()  # sharded moments: each rank zeroes its shard
                    else:
                        spec.view(local).zero_()


def outcome_rows(outcomes: list[SmoothOutcome]) -> list[dict[str, Any]]:
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
