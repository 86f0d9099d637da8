"""Smoothing functions on descending singular values, and their application to a matrix.

Each function maps the top singular values s (descending) to new values s' of the same length;
`apply_spectrum_change` then forms W' = W + U_k diag(s'_k - s_k) V_k^T, so singular vectors and
every value outside the top k are unchanged (the paper says only the dominant values change;
arXiv 2602.01308, and docs/DESIGN.md for what its code does differently).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pss_cli.config import DEFAULT_SOFTMAX_TEMPERATURE, SmoothingMethod
from pss_cli.core.lapack import deterministic_lapack


class NeedMoreValues(Exception):
    """The change reaches below the known top-k values: the caller must compute more of them."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"need at least {needed} singular values")
        self.needed = needed


# What smoothing would leave of a matrix, as a fraction of ||W||_F^2, at or below which it is
# rounding noise (`noise_floor`, `noise_refusal`). QA on rank-one-plus-noise F32 matrices:
# a remainder of 1e-6 of the norm (1e-12 of the energy) was smoothed and then failed `pss
# smooth`'s verification with float32 compute (stable rank 5.994 for 6), 3e-6 and above
# verified; 1e-5 of the norm keeps a margin.
NOISE_ENERGY = 1e-10
# x the eps of the dtype the values were computed in: ||W||_F^2 - sum(s_i^2) is known to
# ~2 eps ||W||_F^2.
NOISE_EPS_FACTOR = 16


def noise_floor(computed: torch.dtype, stored: torch.dtype) -> float:
    """The energy (relative to ||W||_F^2) below which what lies outside a matrix's top values
    may be rounding: of the computation of the values (`computed`; NOISE_EPS_FACTOR x eps), or
    of the stored entries (`stored`: each entry rounded by up to eps/2, so at most eps^2/4 of
    the energy; eps^2 keeps a 4x margin), and never below NOISE_ENERGY.

    The stored dtype matters: a rank-one matrix stored in bf16 has 1.7-2e-3 of its norm in
    bf16 rounding below sigma_1, above what float32 values resolve, and clip or cap shrank it
    to that (QA: norm 104 -> 0.18 in `pss smooth`, 101 -> 0.18 in the guard; F16 2.2e-4).
    bf16: 6.1e-5 of the energy (7.8e-3 of the norm); float16 9.5e-7 (9.8e-4); float32 values
    1.9e-6 (1.4e-3); float64 values on float32 storage NOISE_ENERGY (1e-5).
    """
    return max(
        NOISE_ENERGY,
        NOISE_EPS_FACTOR * torch.finfo(computed).eps,
        torch.finfo(stored).eps ** 2 if stored.is_floating_point else 0.0,
    )


def energy_after(top: torch.Tensor, new_values: torch.Tensor, frobenius_norm: float) -> float:
    """||W'||_F^2 after `top` becomes `new_values`, every other value unchanged (units of
    `frobenius_norm`): the new values' energy plus that of the rest."""
    rest = max(frobenius_norm**2 - float((top**2).sum()), 0.0)
    return float((new_values**2).sum()) + rest


def noise_refusal(
    energy: float, frobenius_norm: float, computed: torch.dtype, stored: torch.dtype
) -> str | None:
    """Why the smoothed matrix is refused, or None: refused when its `energy_after` lies below
    `noise_floor(computed, stored)` x ||W||_F^2, a matrix numerically of rank at most the values
    changed; the reason says what would be left of it.

    Why refuse it: cap and clip then shrink the matrix to that noise. An exactly rank-one
    96 x 80 weight in training went from norm 88.7 to 1.5e-4 (the guard, clip or cap to
    stable rank 4), and `pss smooth` failed its verification and wrote nothing for the whole
    checkpoint (stable rank after writing 1, expected 6).
    """
    if energy >= noise_floor(computed, stored) * frobenius_norm**2:
        return None
    kept = math.sqrt(energy) / frobenius_norm
    amount = "less than 1e-12" if kept < 1e-12 else f"{kept:.0e}"
    return (
        f"numerically of low rank: smoothing its top singular values would leave only {amount} "
        "of its norm, which is rounding noise"
    )


@dataclass(frozen=True)
class SmoothingParams:
    method: SmoothingMethod = SmoothingMethod.CAP
    target_stable_rank: float | None = None  # cap: required
    temperature: float = DEFAULT_SOFTMAX_TEMPERATURE  # softmax: s' = softmax(s / t)
    clip_count: int = 1  # clip: s_1..s_j -> s_{j+1}; j = 1 is the reviewers' sigma_1 -> sigma_2


def smooth_values(
    top: torch.Tensor,
    frobenius_norm: float,
    rank: int,
    params: SmoothingParams,
    scale: float = 1.0,
) -> torch.Tensor:
    """New top singular values (same length as `top`).

    top: (k,) float64 descending, the k largest singular values (k < rank unless all are known).
    frobenius_norm: ||W||_F, exact. rank: min(m, n).
    scale: `top` and `frobenius_norm` are those of W / scale (callers work on W / ||W||_F, which
    neither overflows nor underflows). cap, conv and clip are scale-invariant; softmax(s / t) is
    not, and gets the values of W itself (the result is divided back): applied to the unit-norm
    values it computed softmax(s / (t ||W||_F)), the same prediction for W, 10 W and 0.1 W, not
    the paper's softmax(s / 4) * sum(s).
    Raises NeedMoreValues when the requested change touches values beyond the known k.
    """
    spec = METHODS[params.method]
    if spec.scale_invariant or scale == 1.0:
        # Not scaled up when nothing depends on it: cap squares ||W||_F, which overflowed for
        # float64 weights near 1e300.
        return spec.values(top, frobenius_norm, rank, params)
    scaled = top * scale
    new = spec.values(scaled, frobenius_norm * scale, rank, params)
    # Values the method left alone come back bit for bit ((s * c) / c is not always s): a 1-ulp
    # difference would count as a change and add a spurious rank-1 update per value.
    return torch.where(new == scaled, top, new / scale)


def _window(top: torch.Tensor, frobenius_norm: float, rank: int) -> int:
    """ceil(stable rank): the paper's conv and softmax act on this many top values."""
    stable_rank = (frobenius_norm / float(top[0])) ** 2
    return min(rank, math.ceil(stable_rank - 1e-12))


def _cap(top: torch.Tensor, frobenius_norm: float, rank: int, p: SmoothingParams) -> torch.Tensor:
    if p.target_stable_rank is None:
        raise ValueError("cap needs a target stable rank")
    return cap_values(top, frobenius_norm, rank, p.target_stable_rank)


def _conv(top: torch.Tensor, frobenius_norm: float, rank: int, p: SmoothingParams) -> torch.Tensor:
    return conv_values(top, _window(top, frobenius_norm, rank), rank)


def _softmax(
    top: torch.Tensor, frobenius_norm: float, rank: int, p: SmoothingParams
) -> torch.Tensor:
    return softmax_values(top, _window(top, frobenius_norm, rank), p.temperature)


def _clip(top: torch.Tensor, frobenius_norm: float, rank: int, p: SmoothingParams) -> torch.Tensor:
    return clip_values(top, p.clip_count)


ValuesFunction = Callable[[torch.Tensor, float, int, SmoothingParams], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of pss needs to know about one smoothing method (one entry each)."""

    values: ValuesFunction  # (top, ||W||_F, rank, params) -> new top values; see smooth_values
    # Whether a correct result may have a larger sigma_max than the input: repair's verification
    # refuses a grown sigma_max for every method that never raises a singular value.
    may_raise_sigma_max: bool
    need_more_hint: str  # the hint when even all min(m, n) values are not enough
    # The report's (and the output's provenance) parameters of this method, in order.
    parameters: Callable[[SmoothingParams], dict[str, object]]
    # cap only: each matrix needs a target stable rank (repair chooses one per matrix).
    needs_target: bool = False
    # f(c s) = c f(s): the method may work on W / ||W||_F (smooth_values' `scale`).
    scale_invariant: bool = True


METHODS: dict[SmoothingMethod, MethodSpec] = {
    SmoothingMethod.CAP: MethodSpec(
        _cap,
        may_raise_sigma_max=False,
        need_more_hint="choose a lower --target-stable-rank (at most min(m, n))",
        parameters=lambda p: {"target_stable_rank": p.target_stable_rank},
        needs_target=True,
    ),
    SmoothingMethod.CONV: MethodSpec(
        _conv,
        may_raise_sigma_max=False,
        need_more_hint="this matrix is too small for conv; use --method cap",
        parameters=lambda p: {},
    ),
    # softmax is scale-dependent and may sharpen: it is judged on its prediction alone.
    SmoothingMethod.SOFTMAX: MethodSpec(
        _softmax,
        may_raise_sigma_max=True,
        need_more_hint="this matrix is too small for softmax; use --method cap",
        parameters=lambda p: {"temperature": p.temperature},
        scale_invariant=False,
    ),
    SmoothingMethod.CLIP: MethodSpec(
        _clip,
        may_raise_sigma_max=False,
        need_more_hint="choose a --clip-count below min(m, n)",
        parameters=lambda p: {"clip_count": p.clip_count},
    ),
}


def cap_level(top: torch.Tensor, frobenius_norm: float, rank: int, target: float) -> float:
    """The level c such that capping every value at c gives stable rank `target`.

    With j values above c, SR(c) = (F^2 - sum_{i<=j} s_i^2) / c^2 + j: continuous and decreasing
    in c from SR(s_1) (nothing capped) to `rank` (everything capped), so for a target between
    them there is exactly one c, found in closed form on the interval [s_{j+1}, s_j] that holds
    it. Among caps that reach the target it changes W least in Frobenius norm: every value above
    c must come down to c for the energy bound, and nothing below c needs to move.
    """
    f_sq = frobenius_norm**2
    current = f_sq / float(top[0]) ** 2
    if target <= current:
        return float(top[0])
    if target > rank:
        raise ValueError(f"target stable rank {target:g} exceeds the rank {rank}")
    values: list[float] = [float(v) for v in top.tolist()]
    slack = 1e-12  # rounding at the interval ends must not make the search miss its interval
    # Tail energies are summed from the known values plus the energy beyond them, not formed as
    # F^2 - head: that difference cancels catastrophically when sigma_1 dominates (1e5 x sigma_2).
    beyond = 0.0 if len(values) >= rank else max(f_sq - sum(v * v for v in values), 0.0)
    suffix = [0.0] * (len(values) + 1)
    for i in range(len(values) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + values[i] ** 2
    for j in range(1, len(values) + 1):
        tail = suffix[j] + beyond
        if target - j <= slack * target:
            # Every value so far capped already gives SR >= target: only reachable when
            # target == j, i.e. all values equal (target == rank); the smallest change is s_j.
            return values[j - 1]
        level = math.sqrt(tail / (target - j))
        if j == 1 and level >= values[0]:
            return values[0]  # the target is already met (up to rounding): nothing to cap
        if j == len(values):
            if j >= rank:
                break
            # The level falls below every known value: it cannot be checked against s_{k+1}.
            raise NeedMoreValues(min(rank, 2 * len(values)))
        lower, upper = values[j], values[j - 1]
        if lower * (1 - slack) <= level <= upper * (1 + slack):
            return min(max(level, lower), upper)
    raise NeedMoreValues(min(rank, 2 * len(values)))


def cap_values(top: torch.Tensor, frobenius_norm: float, rank: int, target: float) -> torch.Tensor:
    level = cap_level(top, frobenius_norm, rank, target)
    return top.clamp(max=level)


def conv_values(top: torch.Tensor, window: int, rank: int) -> torch.Tensor:
    """The paper's 3-tap moving average over the top `window` values (window = ceil(SR)).

    Reflect padding at the top gives sigma_1' = (sigma_1 + 2 sigma_2) / 3 as in the paper; at the
    bottom of the window the real next value s_{window+1} is used, so the result equals the
    paper's whole-spectrum filter restricted to the values it is said to change.
    """
    window = max(1, min(window, rank))
    if rank == 1:
        return top.clone()
    needed = window + 1 if window < rank else window
    if top.numel() < needed:
        raise NeedMoreValues(needed)
    # (window + 2,): s_2 (reflect), s_1..s_window, then s_{window+1} or, at the true bottom of the
    # spectrum, s_{window-1} (reflect).
    bottom = top[window : window + 1] if window < rank else top[window - 2 : window - 1]
    padded = torch.cat([top[1:2], top[:window], bottom])
    smoothed = top.clone()
    smoothed[:window] = (padded[:-2] + padded[1:-1] + padded[2:]) / 3.0
    return smoothed


def softmax_values(top: torch.Tensor, window: int, temperature: float) -> torch.Tensor:
    """s' = softmax(s / t) * sum(s) over the top `window` values: keeps their sum and order.

    Scale-dependent (docs/DESIGN.md): with large gaps it can sharpen rather than smooth; the report
    shows the resulting stable rank so that this is visible.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    window = max(1, min(window, top.numel()))
    s = top.clone()
    head = top[:window]
    s[:window] = torch.softmax(head / temperature, dim=0) * head.sum()
    return s


def clip_values(top: torch.Tensor, count: int) -> torch.Tensor:
    """s_1..s_j -> s_{j+1} (the reviewers' "set sigma_1 to sigma_2" ablation, generalised)."""
    if count < 1:
        raise ValueError("clip count must be at least 1")
    if top.numel() <= count:
        raise NeedMoreValues(count + 1)
    s = top.clone()
    s[:count] = top[count]
    return s


def apply_spectrum_change(
    matrix: torch.Tensor,
    left: torch.Tensor,
    values: torch.Tensor,
    right: torch.Tensor,
    new_values: torch.Tensor,
) -> torch.Tensor:
    """W' = W + U_k diag(s'_k - s_k) V_k^T, computed in the matrix's (float32/64) dtype.

    matrix: (m, n); left: (m, k); values, new_values: (k,); right: (n, k).
    Only columns whose value changes contribute, so untouched directions are exactly preserved.
    """
    delta = (new_values - values).to(matrix.dtype)
    changed = delta != 0
    if not bool(changed.any()):
        return matrix.clone()
    u = left[:, changed].to(matrix.dtype)
    v = right[:, changed].to(matrix.dtype)
    # One thread: MKL's float64 GEMM with a transposed operand rounds differently under 1 and
    # 2 threads even with MKL_CBWR set (core/refine.py), and a repaired file must not depend
    # on the machine's thread count.
    with deterministic_lapack(matrix):
        return matrix + (u * delta[changed]) @ v.T
