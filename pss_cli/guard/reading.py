"""The step's numbers (steps 1-3 of pss_cli/guard/guard.py): gathered on the device into one
float64 vector, all-reduced once under torch.distributed, and read on the host with the step's
one synchronisation; and the names of the parameters whose gradients are not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pss_cli.errors import GuardConfigError
from pss_cli.guard.config import NormKind
from pss_cli.guard.rules import SpectralRule, SpectralWarning
from pss_cli.guard.targets import MatrixSpec, is_dtensor

# The step's vector of scalars: float64. It is a few hundred numbers, so this costs nothing, and
# the all-reduce's x / world + x / world stays exact to far below the float32 rounding the norms
# already carry. (A gradient whose norm overflows float32 inside the norm kernel, > 1.8e19,
# still reads as non-finite and is skipped: no dtype of the vector changes that.)
VECTOR_DTYPE = torch.float64
# The vector's fixed entries before the per-parameter norms (`gather_step`).
HEADER = 4


def loss_scalar(loss: torch.Tensor) -> torch.Tensor:
    """The loss as a 0-d detached tensor; a loss of any other size is refused.

    `loss.backward()` itself needs one element; a per-sample vector given here was judged by
    its first entry alone (a NaN in another entry went unseen), and an empty one crashed the
    training step with an IndexError.
    """
    if loss.numel() != 1:
        raise GuardConfigError(
            f"guard.step(loss): the loss must be one number, got a tensor of shape "
            f"{tuple(loss.shape)}",
            "pass the reduced loss you call backward() on (e.g. loss.mean()), or no loss",
        )
    return loss.detach().reshape(())


@dataclass(frozen=True)
class Reading:
    """One step's numbers, after the host synchronisation."""

    nonfinite: bool
    loss: float | None
    sq_norms: list[float]  # ||g_p||^2 per trainable parameter
    grad_sum: float  # sum_p ||g_p|| (NaN on a non-finite step)
    grad_l2: float  # sqrt(sum_p ||g_p||^2) (NaN on a non-finite step)
    grad_norm: float  # the one GuardConfig.norm_kind watches
    spectral: list[SpectralWarning]
    metrics: dict[str, float]  # filled as the step goes (per-matrix readings, SJE)


def gather_step(
    params: list[nn.Parameter],
    shares: list[float],
    device: torch.device,
    loss: torch.Tensor | float | None,
    measure: Callable[[], torch.Tensor] | None,
) -> list[float]:
    """[nonfinite flag, non-finite loss flag, loss, has loss, ||g_p||^2 per param...,
    monitor readings...] (the first `HEADER` entries, then the norms).

    shares: per parameter, the weight of its local squared norm in the all-reduced sum
    (`norm_share`). measure: on a monitor step, the
    monitor's (2c,) float64 readings on `device` (called after the norms are queued), else None.
    """
    zero = torch.zeros((), dtype=VECTOR_DTYPE, device=device)
    norms = squared_grad_norms(params, device) if params else zero.new_zeros(0)
    if loss is None:
        loss_t, has_loss = zero, zero
    elif isinstance(loss, torch.Tensor):
        loss_t = loss_scalar(loss).to(device=device, dtype=VECTOR_DTYPE)
        has_loss = torch.ones((), dtype=VECTOR_DTYPE, device=device)
    else:
        loss_t = torch.tensor(float(loss), dtype=VECTOR_DTYPE, device=device)
        has_loss = torch.ones((), dtype=VECTOR_DTYPE, device=device)
    loss_bad = (~torch.isfinite(loss_t)).to(VECTOR_DTYPE)
    bad = (~torch.isfinite(norms)).sum() + loss_bad
    norms = torch.where(torch.isfinite(norms), norms, zero)
    # Zeroed for the all-reduce (a NaN would poison every rank's sum); its own flag says that
    # the loss was not finite, so that it is reported as NaN, never as this 0.
    loss_t = torch.where(torch.isfinite(loss_t), loss_t, zero)
    if measure is not None:
        readings = measure()
        # A non-finite reading becomes -1 (readings are >= 0): the rule reports the matrix.
        readings = torch.where(torch.isfinite(readings), readings, -torch.ones_like(readings))
    else:
        readings = zero.new_zeros(0)
    vector = torch.cat(
        [
            bad.to(VECTOR_DTYPE).reshape(1),
            loss_bad.reshape(1),
            loss_t.reshape(1),
            has_loss.reshape(1),
            norms,
            readings,
        ]
    )
    world = world_size()
    if world > 1:
        # Replicated numbers (DDP grads after their all-reduce, the loss, the monitor's
        # readings of full weights) enter as x / world, so the SUM gives their mean; a
        # gradient's squared norm enters with its share (`norm_share`: whole for an FSDP2
        # shard), so the SUM gives the full tensor's.
        scale = torch.full_like(vector, 1.0 / world)
        scale[:2] = 1.0  # the flags: counts summed over ranks
        scale[HEADER : HEADER + len(params)] = torch.tensor(
            shares, dtype=VECTOR_DTYPE, device=device
        )
        vector = vector * scale
        import torch.distributed as dist

        dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    values: list[float] = vector.tolist()  # the step's one host synchronisation
    return values


def squared_grad_norms(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
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
        local = stored_values(grad)
        if local.dtype in (torch.float32, torch.float64):
            groups.setdefault((local.device, local.dtype), []).append((i, local))
        else:
            norm = torch.linalg.vector_norm(local, dtype=torch.float32)
            squared[i] = norm.to(device=device, dtype=VECTOR_DTYPE).square()
    for members in groups.values():
        # One conversion and one square per group, then views (unbind): per-parameter .to() and
        # .square() were two small ops per parameter, most of the guard's own time per step on
        # a small model (AMD EPYC Zen 4: 1.13 ms of a 50 ms step for a 4-layer GPT-2 shape).
        norms = torch.stack(torch._foreach_norm([t for _, t in members]))
        group_sq = norms.to(device=device, dtype=VECTOR_DTYPE).square()
        for (i, _), sq in zip(members, group_sq.unbind(0), strict=True):
            squared[i] = sq
    zero = torch.zeros((), dtype=VECTOR_DTYPE, device=device)
    return torch.stack([zero if sq is None else sq for sq in squared])


def norm_share(param: torch.Tensor, world: int) -> float:
    """The factor of this rank's squared gradient norm in the SUM over all `world` ranks.

    Each distinct piece of a gradient is held by world / (number of distinct pieces) ranks:
    a replicated gradient (DDP) by all of them (1 / world), an FSDP2 shard by one (1); a
    DTensor on a mesh with Replicate dimensions (HSDP, a tensor-parallel bias), or on a mesh
    smaller than the world, by several. Counting each copy once per holder overstated the norm
    (HSDP by exactly sqrt(2) on a 2 x 1 mesh).
    """
    if not is_dtensor(param):
        return 1.0 / world
    mesh = param.device_mesh  # type: ignore[attr-defined]
    pieces = 1
    for dim, placement in enumerate(param.placements):  # type: ignore[attr-defined]
        if placement.is_shard():
            pieces *= mesh.size(dim)
    return min(1.0, pieces / world)


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def read_step(
    values: list[float],
    indices: list[int],
    n_params: int,
    norm_kind: NormKind,
    specs: list[MatrixSpec],
    spectral: SpectralRule,
) -> Reading:
    """The gathered vector as named numbers, and the monitor's readings (of `specs[indices]`)
    as metrics, passed through the spectral rule."""
    sq_norms = values[HEADER : HEADER + n_params]
    nonfinite = values[0] > 0
    if values[1] > 0:
        loss: float | None = math.nan  # some rank's loss was not finite
    else:
        loss = values[2] if values[3] > 0 else None
    grad_sum = sum(math.sqrt(max(v, 0.0)) for v in sq_norms)
    grad_l2 = math.sqrt(max(sum(sq_norms), 0.0))
    watched = grad_sum if norm_kind == NormKind.SUM_OF_NORMS else grad_l2
    metrics: dict[str, float] = {}
    warnings_ = read_monitor(indices, values[HEADER + n_params :], metrics, specs, spectral)
    return Reading(
        nonfinite=nonfinite,
        loss=loss,
        sq_norms=sq_norms,
        grad_sum=math.nan if nonfinite else grad_sum,
        grad_l2=math.nan if nonfinite else grad_l2,
        grad_norm=math.nan if nonfinite else watched,
        spectral=warnings_,
        metrics=metrics,
    )


def read_monitor(
    indices: list[int],
    readings: list[float],
    metrics: dict[str, float],
    specs: list[MatrixSpec],
    spectral: SpectralRule,
) -> list[SpectralWarning]:
    """The monitor's [sigma_1..., ||W||_F^2...] readings into `metrics`, and the spectral rule's
    warnings on them (a reading of -1 was non-finite: the rule gets None and reports it)."""
    count = len(indices)
    found: list[SpectralWarning] = []
    for j, index in enumerate(indices):
        spec = specs[index]
        sigma, frob_sq = readings[j], readings[count + j]
        ok = sigma >= 0 and frob_sq >= 0
        if ok:
            metrics[f"sigma_max/{spec.name}"] = sigma
            if sigma > 0:
                metrics[f"stable_rank/{spec.name}"] = frob_sq / sigma**2
        found.extend(
            spectral.observe(
                spec.name,
                spec.short_side,
                sigma if ok else None,
                frob_sq if ok else None,
            )
        )
    return found


def nonfinite_layers(trainable: list[tuple[str, nn.Parameter]]) -> list[str]:
    """Names of parameters whose gradient is not finite (this path is rare: a sync is fine)."""
    bad = []
    for name, p in trainable:
        grad = p.grad
        if grad is None:
            continue
        if not bool(torch.isfinite(stored_values(grad)).all()):
            bad.append(name)
    return bad[:20]


def stored_values(grad: torch.Tensor) -> torch.Tensor:
    """The gradient's own entries, detached: a DTensor's local shard; a sparse gradient's
    values (nn.Embedding(sparse=True)), coalesced so that repeated indices count once, as the
    optimizer applies them; torch's norm and isfinite kernels have no sparse versions."""
    local = grad
    if is_dtensor(grad):
        if any(p.is_partial() for p in grad.placements):  # type: ignore[attr-defined]
            # A Partial gradient (sequence parallelism's replicated norm weights) holds partial
            # sums, not a shard: reduced to its placement's Replicate first (a collective, made
            # by every rank in the same parameter order).
            from torch.distributed.tensor import Replicate

            placements = [Replicate() if p.is_partial() else p for p in grad.placements]  # type: ignore[attr-defined]
            grad = grad.redistribute(grad.device_mesh, placements)  # type: ignore[attr-defined]
        local = grad.to_local()  # type: ignore[attr-defined]
    if local.layout == torch.sparse_coo:
        local = local.coalesce().values()
    elif local.layout != torch.strided:
        local = local.values()
    return local.detach()
