"""The vocabulary of a repair: its configuration, a planned matrix, its computed change."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pss_cli.checkpoint.model import TensorEntry
from pss_cli.checkpoint.selection import MatrixView
from pss_cli.config import OptimizerPolicy, ScanConfig, SmoothingMethod
from pss_cli.core.smoothing import SmoothingParams, apply_spectrum_change
from pss_cli.errors import ComputeError
from pss_cli.results import LayerResult, SkippedResult

# Roles left alone unless named with --layers: embeddings are low-rank by nature (docs/DESIGN.md:
# MiniLM position embeddings 7.7) and the paper's code skips embeddings and the LM head.
PROTECTED_ROLES = frozenset({"embedding", "lm_head"})


# A cap target is reached within this relative tolerance after casting back to the stored dtype
# (bf16 keeps 8 bits of mantissa: rounding moves the stable rank by up to ~0.5 %).
TARGET_TOLERANCE = {"F64": 1e-3, "F32": 1e-3, "F16": 1e-2, "BF16": 2e-2}


# With no healthy matrix to learn from, aim just above the flag threshold: the smallest edit that
# unflags the matrix, with a margin for rounding to the stored dtype. It was 2.0; in
# docs/EXPERIMENTS.md that target (10, on a model whose matrices all sat at SR 1.1-3.4) changed
# 41-87 % of each matrix's norm and no resume at the same LR benefited, so the mildest edit wins.
FALLBACK_TARGET_FACTOR = 1.2


@dataclass(frozen=True)
class SmoothConfig:
    scan: ScanConfig = field(default_factory=ScanConfig)
    layers: tuple[str, ...] = ()  # explicit globs (may name embeddings / lm_head)
    all_layers: bool = False
    params: SmoothingParams = field(default_factory=SmoothingParams)
    # keep, not reset: docs/EXPERIMENTS.md (reset resumes exploded again within 2 steps).
    optimizer_state: OptimizerPolicy = OptimizerPolicy.KEEP
    allow_master_weights: bool = False
    force: bool = False
    dry_run: bool = False
    # Multiply the learning rates stored in the optimizer and scheduler state (lr_scale.py):
    # a trainer that restores them ignores the LR given at resume.
    lr_scale: float | None = None
    clean_stale: bool = False  # remove staging entries left in OUT's folder by killed runs


@dataclass(frozen=True)
class Plan:
    layer: LayerResult
    entry: TensorEntry
    view: MatrixView
    target: float | None
    target_source: str | None
    params_method: SmoothingMethod = SmoothingMethod.CAP


@dataclass(frozen=True)
class RankUpdate:
    """W' = W + left diag(new_values - values) right^T, kept instead of W' itself so that memory
    stays bounded by one tensor however many matrices change (the new tensor is formed only when
    the writer asks for it, see `LazyReplacements`)."""

    left: torch.Tensor  # (m, c) float64 CPU, the changed directions only
    values: torch.Tensor  # (c,) float64, their singular values s in the stored scale
    new_values: torch.Tensor  # (c,) float64, s'
    right: torch.Tensor  # (n, c) float64 CPU

    def apply(self, stored: torch.Tensor) -> torch.Tensor:
        """(m, n) stored-dtype matrix -> the repaired one, same dtype.

        The update is added to the stored values in float64, so directions it does not touch
        keep the stored numbers exactly (up to the final cast), whatever the compute dtype.
        """
        updated = apply_spectrum_change(
            stored.to(torch.float64), self.left, self.values, self.right, self.new_values
        )
        if stored.dtype.is_floating_point and updated.numel():
            # A float16 matrix near its range (max 65504) can leave it when its top values
            # are moved: the cast would write inf, which verification then reported as an
            # unknown stable rank with a hint about rounding.
            largest = float(updated.abs().max())
            limit = torch.finfo(stored.dtype).max
            if largest > limit:
                raise ValueRangeError(largest, limit, str(stored.dtype).removeprefix("torch."))
        return updated.to(stored.dtype)


class ValueRangeError(ArithmeticError):
    """The repaired values do not fit the stored dtype (`RankUpdate.apply`)."""

    def __init__(self, largest: float, limit: float, dtype: str) -> None:
        super().__init__(f"{largest:.6g} > {limit:.6g} ({dtype})")
        self.largest, self.limit, self.dtype = largest, limit, dtype

    def for_matrix(self, name: str) -> ComputeError:
        return ComputeError(
            f"smoothing '{name}' gives values up to {self.largest:.6g}, beyond {self.dtype}'s "
            f"largest {self.limit:.6g}: the repaired matrix cannot be stored as {self.dtype}; "
            "nothing was written",
            "smooth it less (cap with a higher --target-stable-rank), or "
            "convert the checkpoint to bfloat16 or float32 first",
        )


@dataclass(frozen=True)
class Change:
    """The computed change of one planned matrix."""

    plan: Plan
    update: RankUpdate
    k: int  # singular triplets computed
    changed_values: int
    predicted_stable_rank: float
    relative_change: float  # ||W' - W||_F / ||W||_F

    def apply(self, stored: torch.Tensor) -> torch.Tensor:
        try:
            return self.update.apply(stored)
        except ValueRangeError as error:
            raise error.for_matrix(self.plan.layer.display_name) from None


def skip_result(layer: LayerResult, reason: str) -> SkippedResult:
    return SkippedResult(
        name=layer.display_name,
        file=layer.file,
        shape=layer.shape,
        dtype=layer.dtype,
        reason=reason,
    )
