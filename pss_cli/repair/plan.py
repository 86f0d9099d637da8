"""The change of each planned matrix: top singular triplets, new values, the rank-k update."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.config import ComputeDtype
from pss_cli.core.norms import frobenius_norm
from pss_cli.core.refine import refine_float64
from pss_cli.core.smoothing import (
    METHODS,
    NeedMoreValues,
    energy_after,
    noise_refusal,
    smooth_values,
)
from pss_cli.core.spectra import KrylovSettings, gaussian_start, top_singular_triplets
from pss_cli.errors import UsageError
from pss_cli.pipeline import matrix_seed, resolve_device
from pss_cli.repair.model import (
    Change,
    Plan,
    RankUpdate,
    SmoothConfig,
    ValueRangeError,
    skip_result,
)
from pss_cli.results import SkippedResult


def compute_changes(
    layout: CheckpointLayout, plans: list[Plan], config: SmoothConfig
) -> tuple[list[Change], tuple[SkippedResult, ...]]:
    dtype = torch.float64 if config.scan.compute_dtype is ComputeDtype.FLOAT64 else torch.float32
    settings = KrylovSettings(exact_max_dim=config.scan.exact_max_dim)
    device = resolve_device(config.scan.device)
    changes: list[Change] = []
    skipped: list[SkippedResult] = []
    # Plans come in scan order, so the matrices of one (E, m, n) stack are consecutive: the
    # tensor is read once for all of them, not once per expert.
    last: tuple[str, torch.Tensor] | None = None
    with TensorReader(layout) as reader:
        for plan in plans:
            if last is None or last[0] != plan.entry.name:
                last = (plan.entry.name, reader.read(plan.entry))
            stored = _matrix_of(last[1], plan)
            change = _smooth_one(plan, stored, dtype, device, settings, config)
            if isinstance(change, str):
                skipped.append(skip_result(plan.layer, change))
            else:
                changes.append(change)
    return changes, tuple(skipped)


def _matrix_of(tensor: torch.Tensor, plan: Plan) -> torch.Tensor:
    m, n = plan.layer.matrix_shape
    batch = tensor.reshape(-1, m, n)
    return batch[plan.layer.index if plan.layer.index is not None else 0]


def _smooth_one(
    plan: Plan,
    stored: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    settings: KrylovSettings,
    config: SmoothConfig,
) -> Change | str:
    """The update for one plan, or why there is none; grows k until it covers every changed
    value.

    Works on W / ||W||_F, like the scan, so that float64 weights near 1e300 or 1e-50 neither
    overflow nor underflow in the compute dtype; the change is scaled back at the end.
    """
    layer = plan.layer
    m, n = layer.matrix_shape
    rank = min(m, n)
    norm = frobenius_norm(stored)
    unit = stored.to(torch.float64) / norm  # (m, n), ||unit||_F = 1
    work = unit.to(device=device, dtype=dtype)
    unit_norm = float(torch.linalg.vector_norm(unit))
    params = replace(config.params, target_stable_rank=plan.target)
    k = min(rank, max(config.scan.top_k, math.ceil(layer.stable_rank or 1.0) + 2))
    seed = matrix_seed(config.scan.seed, layer.name, layer.index)
    while True:
        start = gaussian_start([seed], rank, settings.block_size)[0]
        triplets = top_singular_triplets(work, k, start, settings)
        if work.dtype is not torch.float64:
            # float32 values cannot resolve the tail energy of a strong spike: refine the few
            # directions that change in float64 (core/refine.py) before choosing the new values
            triplets = refine_float64(unit, triplets)
        try:
            new_values = smooth_values(triplets.values, unit_norm, rank, params, scale=norm)
        except NeedMoreValues as more:
            if k >= rank:
                raise UsageError(
                    f"cannot smooth '{layer.display_name}' ({m}x{n}) with {params.method}: the "
                    "change would need more singular values than the matrix has",
                    METHODS[params.method].need_more_hint,
                ) from more
            k = min(rank, max(more.needed, 2 * k))
            continue
        break
    changed = (new_values != triplets.values).cpu()
    if not bool(changed.any()):
        return "the method leaves this spectrum unchanged"
    new_energy = energy_after(triplets.values, new_values, unit_norm)
    # The values that change are refined in float64 above whatever the compute dtype.
    refused = noise_refusal(new_energy, unit_norm, torch.float64, stored.dtype)
    if refused is not None:
        return refused
    update = RankUpdate(
        triplets.left.to("cpu", torch.float64)[:, changed],
        triplets.values[changed] * norm,
        new_values[changed] * norm,
        triplets.right.to("cpu", torch.float64)[:, changed],
    )
    try:
        new_stored = update.apply(stored)
    except ValueRangeError as error:
        raise error.for_matrix(plan.layer.display_name) from None
    return Change(
        plan,
        update,
        k,
        int(changed.sum()),
        predicted_stable_rank=new_energy / float(new_values.max()) ** 2,
        relative_change=(
            frobenius_norm(new_stored.to(torch.float64) - stored.to(torch.float64)) / norm
        ),
    )
