"""What a `smooth` action does (step 5 of pss_cli/guard/guard.py): smooth the monitored matrices
in place (pss_cli.guard.smooth), reset their optimizer moments when asked, and measure SJE
without writing; plus the event's per-matrix rows.
"""

from __future__ import annotations

import warnings
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
        left = reset_moments(optimizer, touched)
        if left:
            warnings.warn(
                f"pss guard: optimizer_policy='reset' zeroed the known moments only; left as "
                f"they are: {', '.join(left[:6])}{' ...' if len(left) > 6 else ''} (not "
                f"moments pss knows; {type(optimizer).__name__})",
                RuntimeWarning,
                stacklevel=4,
            )
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


# Per-entry moments (a running average of the gradient or of its square) that `reset` zeroes:
# Adam/AdamW/NAdam/RAdam/Adamax, SGD momentum, RMSprop, Adagrad, Adadelta, Lion.
_ELEMENT_MOMENTS = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "square_avg",
        "grad_avg",
        "acc_delta",
        "sum",
        "exp_inf",
        # bitsandbytes' 32-bit optimizers (Adam: state1 = exp_avg, state2 = exp_avg_sq); its
        # 8-bit states are integers and are left alone (not float).
        "state1",
        "state2",
    }
)
# Factored second moments of a matrix (Adafactor): a row statistic (m,) or (m, 1) and a column
# statistic (n,) or (1, n). torch.optim.Adafactor: row_var/col_var; transformers' Adafactor:
# exp_avg_sq_row/exp_avg_sq_col. Zeroing them is safe in both (the next step adds the new
# gradient's statistic before dividing, and both clamp the divisor).
_ROW_MOMENTS = frozenset({"row_var", "exp_avg_sq_row"})
_COLUMN_MOMENTS = frozenset({"col_var", "exp_avg_sq_col"})


def reset_moments(optimizer: torch.optim.Optimizer, specs: list[MatrixSpec]) -> list[str]:
    """Zero the smoothed matrices' optimizer moments; step counts are kept, as
    `pss smooth --optimizer-state reset`. Returns the state entries left alone ("key of
    param") because they are not known moments.

    Only known moments, by name: a state tensor shaped like the parameter is not always a
    moment (schedule-free AdamW's `z` is the base iterate, ASGD's `ax` an average of the
    weights, Rprop's `step_size` a per-entry step), and zeroing one of those would wreck the
    run. Factored moments of a split Q/K/V part: the statistic along the split is zeroed for
    the part's slice; the one shared by the parts only when every part was smoothed.
    """
    parts_touched: dict[int, int] = {}
    for spec in specs:
        parts_touched[id(spec.param)] = parts_touched.get(id(spec.param), 0) + 1
    left: list[str] = []
    with torch.no_grad():
        for spec in specs:
            state = optimizer.state.get(spec.param, {})
            whole = spec.split_dim is None or parts_touched[id(spec.param)] == 3
            for key, value in state.items():
                if key == "step" or not isinstance(value, torch.Tensor) or value.ndim == 0:
                    continue
                if not value.is_floating_point():
                    continue
                if key in _ELEMENT_MOMENTS and value.shape == spec.param.shape:
                    _zero(value, spec, spec.split_dim)
                elif key in _ROW_MOMENTS | _COLUMN_MOMENTS and _factor_of(value, spec, key):
                    along = 0 if key in _ROW_MOMENTS else 1
                    if spec.split_dim == along:
                        _zero(value.reshape(-1), spec, 0)
                    elif whole:
                        _zero(value, spec, None)
                else:
                    left.append(f"{key} of {spec.param_name}")
    return sorted(set(left))


def _factor_of(value: torch.Tensor, spec: MatrixSpec, key: str) -> bool:
    m, n = spec.param.shape
    size = m if key in _ROW_MOMENTS else n
    return value.numel() == size and value.ndim <= 2


def _zero(value: torch.Tensor, spec: MatrixSpec, split_dim: int | None) -> None:
    if split_dim is None:
        local = value.to_local() if is_dtensor(value) else value  # type: ignore[attr-defined]
        local.zero_()  # a sharded moment: each rank zeroes its own shard
    elif not is_dtensor(value):
        value.chunk(3, dim=split_dim)[spec.part].zero_()
    else:
        # One part of a sharded fused weight: this rank's shard need not line up with the
        # parts (zeroing the whole shard zeroed the moments of parts that were not smoothed).
        # The full moment is rebuilt, its part zeroed, and this rank's shard kept, as the
        # smoothing writes the weight (pss_cli/guard/smooth.py); every rank runs this, in the
        # same order.
        from torch.distributed.tensor import distribute_tensor

        full = value.full_tensor()  # type: ignore[attr-defined]
        full.chunk(3, dim=split_dim)[spec.part].zero_()
        sharded = distribute_tensor(full, value.device_mesh, value.placements)  # type: ignore[attr-defined]
        value.to_local().copy_(sharded.to_local())  # type: ignore[attr-defined]


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
