"""Frozen configuration with every default in one place (the CLI reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


class SmoothingMethod(StrEnum):
    """`pss smooth --method` (formulas in pss_cli.core.smoothing and docs/smooth.md)."""

    CAP = "cap"
    CONV = "conv"
    SOFTMAX = "softmax"
    CLIP = "clip"


class OptimizerPolicy(StrEnum):
    """`pss smooth --optimizer-state` (see pss_cli.checkpoint.optimizer)."""

    RESET = "reset"
    KEEP = "keep"
    DROP = "drop"


class ComputeDtype(StrEnum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class ProductPrecision(StrEnum):
    """`--precision`: the dtype of the Krylov expansion's matrix products (see
    pss_cli.core.precision). `auto` measures bf16 against fp32 on the scan's device."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


DEFAULT_TOP_K = 16
# The paper (arXiv 2602.01308) sees GPT-2 FFN stable ranks of ~50-130 in stable runs and < 5 right
# before a loss explosion; healthy all-MiniLM-L6-v2 FFN matrices sit at 10-24 (DESIGN.md). 5 flags
# a collapse without flagging healthy small models.
DEFAULT_MIN_STABLE_RANK = 5.0
# A matrix whose short side is s cannot have a stable rank above s; the floor is lowered to
# s * this fraction so that tiny matrices (token-type embeddings, 2 x 384) raise no false alarm.
MIN_STABLE_RANK_FRACTION_OF_RANK = 0.25
DEFAULT_SEED = 0
# softmax smoothing: the PSS authors' code uses softmax(0.25 * s), i.e. a temperature of 4.
DEFAULT_SOFTMAX_TEMPERATURE = 4.0
DEFAULT_DEVICE = "auto"
DEFAULT_PRECISION = ProductPrecision.AUTO
# `auto` picks bf16 products only when a measured bf16 GEMM is at least this much faster than the
# fp32 one on the scan's device. The margin keeps the choice stable from run to run: the CPUs met
# so far sit far on either side (AVX2-only EPYC: bf16 50-300x slower; Zen 4 with AVX512_BF16:
# ~2.5x faster; Xeon with AMX: 4-5x faster; docs/BENCHMARKS.md).
BF16_MIN_SPEEDUP = 1.5
# Host memory for one CPU batch of float32 matrices; on CUDA the batch is sized from free memory.
# At or below this short side a full SVD is used. Measured here (2 cores, single matrices): exact
# vs block Krylov 12-15 vs 18-31 ms at 384 x 384, 26-27 vs 25-53 ms at 1536 x 384, 31 vs 19 ms at
# 512 x 512, 58 vs 52-58 ms at 2048 x 512, 122-126 vs 71-79 ms at 3072 x 768: the crossover lies
# between 384 and 512; at 512 the exact answer costs about the same (docs/BENCHMARKS.md).
DEFAULT_EXACT_MAX_DIM = 512
DEFAULT_CPU_BATCH_BYTES = 512 * 2**20
CUDA_FREE_MEMORY_FRACTION = 0.5
# Host staging buffer of the scan's reads (pinned, and two of them, on CUDA): file bytes land here
# in the stored dtype and are converted into the compute buffer a few MiB at a time.
STAGING_BUFFER_BYTES = 16 * 2**20
# Distributed scans (torchrun): the collective timeout. Ranks that finished their share wait in a
# collective for the slowest one, so this bounds the imbalance between shares, not the scan.
DISTRIBUTED_TIMEOUT_SECONDS = 6 * 3600


@dataclass(frozen=True)
class ScanConfig:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    top_k: int = DEFAULT_TOP_K
    min_stable_rank: float = DEFAULT_MIN_STABLE_RANK
    exact: bool = False
    device: str = DEFAULT_DEVICE
    seed: int = DEFAULT_SEED
    compute_dtype: ComputeDtype = ComputeDtype.FLOAT32
    precision: ProductPrecision = DEFAULT_PRECISION
    cpu_batch_bytes: int = DEFAULT_CPU_BATCH_BYTES
    exact_max_dim: int = DEFAULT_EXACT_MAX_DIM


# --- pss trend: the early-warning detector (docs/trend.md; docs/DESIGN.md "The method") ------
# A layer's SR - 1 below (1 - 0.5) x (the median of its own last 3 values - 1), SR >= 1 being
# rank one: the paper's collapses fall from ~50-130 to < 5 within a few steps, far beyond a 2x
# drop; healthy training drifts by a few percent between checkpoints.
DEFAULT_TREND_DROP_FRACTION = 0.5
# ...but the drop rule is off by default: on the examples/ control run (LR 3e-3, no explosion)
# freshly initialised matrices fell from SR ~50 to ~22 in 40 steps while simply learning, and the
# rule called a collapse at step 60; only the sigma_max growth rule told the diverging run (first
# warning at step 100, 12 steps before its loss explosion) from the healthy one
# (docs/EXPERIMENTS.md). `pss trend --warn-on-drop` turns it on.
DEFAULT_TREND_WARN_ON_DROP = False
DEFAULT_TREND_WINDOW = 3
# sigma_max above 2 x the median of its last 3 values.
DEFAULT_TREND_SIGMA_GROWTH = 2.0
# "Many layers at once" (the paper's signature of a coming explosion): a collapse verdict.
DEFAULT_TREND_COLLAPSE_LAYERS = 2
# Training-log spikes: grad norm > 2.5 x its EMA (decay 0.9), the trigger of the paper's training
# code (DESIGN.md); loss > 1.5 x its lowest earlier value; both after 5 logged points of warm-up.
DEFAULT_GRAD_SPIKE_FACTOR = 2.5
DEFAULT_GRAD_EMA_DECAY = 0.9
DEFAULT_LOSS_SPIKE_FACTOR = 1.5
DEFAULT_LOG_WARMUP_POINTS = 5
# Roles followed and plotted but never warned about (except NaN/Inf): low-rank by nature (MiniLM's
# position embeddings: 7.7; DESIGN.md), skipped by the paper's code and left alone by `pss smooth`
# (repair.PROTECTED_ROLES). On the examples/ divergence run the token embedding's sigma_max grew
# 4x from its small init over the first 80 steps, long before anything went wrong.
TREND_QUIET_ROLES = ("embedding", "lm_head")


@dataclass(frozen=True)
class TrendConfig:
    drop_fraction: float = DEFAULT_TREND_DROP_FRACTION
    warn_on_drop: bool = DEFAULT_TREND_WARN_ON_DROP
    window: int = DEFAULT_TREND_WINDOW
    sigma_growth: float = DEFAULT_TREND_SIGMA_GROWTH
    collapse_layers: int = DEFAULT_TREND_COLLAPSE_LAYERS
    grad_spike_factor: float = DEFAULT_GRAD_SPIKE_FACTOR
    grad_ema_decay: float = DEFAULT_GRAD_EMA_DECAY
    loss_spike_factor: float = DEFAULT_LOSS_SPIKE_FACTOR
    log_warmup_points: int = DEFAULT_LOG_WARMUP_POINTS
    quiet_roles: tuple[str, ...] = TREND_QUIET_ROLES
