"""Frozen configuration with every default in one place (the CLI reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


class SmoothingMethod(StrEnum):
    """`pss smooth --method` (formulas in pss_cli.core.smoothing and the README)."""

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


DEFAULT_TOP_K = 16
# The paper (arXiv 2602.01308) sees GPT-2 FFN stable ranks of ~50-130 in stable runs and < 5 right
# before a loss explosion; healthy all-MiniLM-L6-v2 FFN matrices sit at 10-24 (NOTES.md). 5 flags
# a collapse without flagging healthy small models.
DEFAULT_MIN_STABLE_RANK = 5.0
# A matrix whose short side is s cannot have a stable rank above s; the floor is lowered to
# s * this fraction so that tiny matrices (token-type embeddings, 2 x 384) raise no false alarm.
MIN_STABLE_RANK_FRACTION_OF_RANK = 0.25
DEFAULT_SEED = 0
# softmax smoothing: the PSS authors' code uses softmax(0.25 * s), i.e. a temperature of 4.
DEFAULT_SOFTMAX_TEMPERATURE = 4.0
DEFAULT_DEVICE = "auto"
# Host memory for one CPU batch of float32 matrices; on CUDA the batch is sized from free memory.
# At or below this short side a full SVD is used. Measured here (2 cores, single matrices): exact
# vs block Krylov 12-15 vs 18-31 ms at 384 x 384, 26-27 vs 25-53 ms at 1536 x 384, 31 vs 19 ms at
# 512 x 512, 58 vs 52-58 ms at 2048 x 512, 122-126 vs 71-79 ms at 3072 x 768: the crossover lies
# between 384 and 512; at 512 the exact answer costs about the same (docs/BENCHMARKS.md).
DEFAULT_EXACT_MAX_DIM = 512
DEFAULT_CPU_BATCH_BYTES = 512 * 2**20
CUDA_FREE_MEMORY_FRACTION = 0.5


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
    cpu_batch_bytes: int = DEFAULT_CPU_BATCH_BYTES
    exact_max_dim: int = DEFAULT_EXACT_MAX_DIM
