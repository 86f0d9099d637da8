"""In-place smoothing of a monitored matrix, with the numerics of `pss smooth`.

Top-k singular triplets from `core.spectra.top_singular_triplets`, new values from
`core.smoothing.smooth_values`, the rank-k update from `core.smoothing.apply_spectrum_change`:
W' = W + U_k diag(s'_k - s_k) V_k^T, added in float64 and cast once to the parameter's dtype,
written into the parameter the optimizer updates (under no_grad). Like `pss smooth`, it works on
W / ||W||_F so that neither overflow nor underflow depends on the weights' scale. A matrix that is
not finite, or whose result is not finite, is never written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from pss_cli.core.power import stable_jacobian_energy
from pss_cli.core.smoothing import (
    NeedMoreValues,
    SmoothingParams,
    apply_spectrum_change,
    energy_after,
    noise_refusal,
    smooth_values,
)
from pss_cli.core.spectra import (
    KrylovSettings,
    gaussian_start,
    top_singular_triplets,
    uses_exact_path,
)
from pss_cli.guard.targets import MatrixSpec, full_value, is_dtensor


@dataclass(frozen=True)
class SmoothOutcome:
    name: str
    changed: bool
    stable_rank_before: float | None
    stable_rank_after: float | None  # predicted from the new values (exact on the top-k path)
    sigma_max_before: float | None
    sigma_max_after: float | None
    sje: float | None  # Stable Jacobian Energy from the step's gradient, before smoothing
    skipped_reason: str | None = None


@torch.no_grad()
def smooth_spec(
    spec: MatrixSpec,
    params: SmoothingParams,
    top_k: int,
    dtype: torch.dtype,
    seed: int,
    settings: KrylovSettings,
    write: bool,
) -> SmoothOutcome:
    """Smooth `spec` in place when `write` (else only measure, for SJE on log/skip triggers)."""
    full = full_value(spec.param.detach())
    stored = spec.view(full)  # (m, n) parameter dtype
    m, n = stored.shape
    rank = min(m, n)
    wide = stored.to(torch.float64)
    norm = float(torch.linalg.vector_norm(wide))
    if not math.isfinite(norm):
        return SmoothOutcome(spec.name, False, None, None, None, None, None, "weights not finite")
    if norm == 0.0:
        return SmoothOutcome(spec.name, False, None, None, None, None, None, "all-zero matrix")
    unit = wide / norm  # (m, n), ||unit||_F = 1
    work = unit.to(dtype)
    unit_norm = float(torch.linalg.vector_norm(unit))
    k = min(rank, top_k)
    if uses_exact_path(m, n, rank, settings):
        # A full SVD computes every triplet anyway: take them all at once rather than
        # growing k and factorising again (halved the trigger step's SVD time).
        k = rank
    while True:
        start = gaussian_start([seed], rank, settings.block_size)[0]
        triplets = top_singular_triplets(work, k, start, settings)
        sigma = float(triplets.values[0])
        stable_rank = (unit_norm / sigma) ** 2 if sigma > 0 else None
        needed = min(rank, math.ceil(stable_rank or 1.0) + 2)
        if k < needed:
            k = needed
            continue
        if not write:
            new_values = triplets.values
            break
        try:
            new_values = smooth_values(triplets.values, unit_norm, rank, params, scale=norm)
        except NeedMoreValues as more:
            if k >= rank:
                return _unchanged(spec, norm, sigma, stable_rank, None, "matrix too small")
            k = min(rank, max(more.needed, 2 * k))
            continue
        break
    sje = None
    grad = spec.param.grad
    if grad is not None and stable_rank is not None:
        g = spec.view(full_value(grad.detach()))
        sje = stable_jacobian_energy(g, triplets.left, triplets.right, stable_rank)
    changed = (new_values != triplets.values).cpu()
    if not write or not bool(changed.any()):
        reason = None if not write else "the method leaves this spectrum unchanged"
        return _unchanged(spec, norm, sigma, stable_rank, sje, reason)
    energy = energy_after(triplets.values, new_values, unit_norm)
    refused = noise_refusal(energy, unit_norm, dtype, full.dtype)
    if refused is not None:
        return _unchanged(spec, norm, sigma, stable_rank, sje, refused)
    left = triplets.left.to(wide.device, torch.float64)[:, changed.to(triplets.left.device)]
    right = triplets.right.to(wide.device, torch.float64)[:, changed.to(triplets.right.device)]
    values = (triplets.values[changed] * norm).to(wide.device)
    new_changed = (new_values[changed] * norm).to(wide.device)
    updated = apply_spectrum_change(wide, left, values, right, new_changed)  # (m, n) float64
    # Judged in the parameter's dtype: a float16 weight near its range (65504) can leave it
    # when its top values move, and the cast would write inf.
    if not bool(torch.isfinite(updated.to(full.dtype)).all()):
        return _unchanged(
            spec, norm, sigma, stable_rank, sje, f"result not finite in {full.dtype}: not written"
        )
    _write(spec, full, updated)
    top_after = float(new_values.max())
    return SmoothOutcome(
        spec.name,
        True,
        stable_rank,
        energy / top_after**2 if top_after > 0 else None,
        sigma * norm,
        top_after * norm,
        sje,
    )


def _unchanged(
    spec: MatrixSpec,
    norm: float,
    sigma: float,
    stable_rank: float | None,
    sje: float | None,
    reason: str | None,
) -> SmoothOutcome:
    return SmoothOutcome(
        spec.name, False, stable_rank, stable_rank, sigma * norm, sigma * norm, sje, reason
    )


def _write(spec: MatrixSpec, full: torch.Tensor, updated: torch.Tensor) -> None:
    """Write the (m, n) float64 result into the parameter, in its dtype."""
    param = spec.param
    if not is_dtensor(param):
        spec.view(param.data).copy_(updated.to(param.dtype))
        return
    from torch.distributed.tensor import distribute_tensor

    # Every rank computed the same result from the same full tensor: rebuild the full value,
    # then keep this rank's shard (no communication beyond what distribute_tensor needs).
    new_full = full.clone()
    spec.view(new_full).copy_(updated.to(new_full.dtype))
    sharded = distribute_tensor(new_full, param.device_mesh, param.placements)  # type: ignore[attr-defined]
    param.data.to_local().copy_(sharded.to_local())  # type: ignore[attr-defined]


def smoothing_params(
    method: object, target: float | None, temperature: float, clip: int
) -> SmoothingParams:
    from pss_cli.config import SmoothingMethod

    return replace(
        SmoothingParams(),
        method=SmoothingMethod(str(method)),
        target_stable_rank=target,
        temperature=temperature,
        clip_count=clip,
    )
