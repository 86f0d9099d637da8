"""Planning a scan: open the headers, select the matrices, order them, seed them and choose
the device and product precision; no tensor data is read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

import torch

from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.selection import MatrixTarget, MatrixView, SkippedTarget, select
from pss_cli.config import BF16_MIN_SPEEDUP, ComputeDtype, ScanConfig
from pss_cli.core.precision import PrecisionChoice, choose_precision
from pss_cli.core.spectra import KrylovSettings, uses_exact_path
from pss_cli.errors import UsageError
from pss_cli.results import Flag, LayerResult


class ProgressCallback(Protocol):
    """Called after each batch: matrices done of total, the last tensor's name, and the bytes of
    tensor data read so far of the total (0, 0 from callers that do not count bytes)."""

    def __call__(
        self, done: int, total: int, name: str, bytes_done: int = 0, bytes_total: int = 0
    ) -> None: ...


FLAG_LOW_STABLE_RANK = Flag.LOW_STABLE_RANK
FLAG_NONFINITE = Flag.NONFINITE
FLAG_ZERO = Flag.ZERO_MATRIX
# The solver of a matrix whose values are all 0 or 1 (solve._is_mask): not a weight, so
# assemble_report moves it from the layers to the skipped tensors, with MASK_REASON.
SOLVER_MASK = "mask"
MASK_REASON = "values are only 0 and 1: a mask buffer, not a weight (not analysed)"


def krylov_path(tall_shape: tuple[int, int], config: ScanConfig, settings: KrylovSettings) -> bool:
    """Whether a matrix of this (tall) shape is solved by block Krylov in this scan, rather than
    by a full SVD (`--exact`, a small matrix, or a --top-k the Krylov space cannot hold)."""
    m, n = tall_shape
    return not config.exact and not uses_exact_path(m, n, min(config.top_k, n), settings)


@dataclass(frozen=True)
class MatrixItem:
    """One matrix to analyse: a 2-D tensor, a flattened conv kernel, or one expert of a stack.

    position: its place in the scan's item order (the report's layer order).
    """

    target: MatrixTarget
    index: int | None
    seed: int
    position: int

    @property
    def tall_shape(self) -> tuple[int, int]:
        m, n = self.target.matrix_shape
        return (m, n) if m >= n else (n, m)

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.target.entry.name, self.index)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data read for this matrix (its share of a stack, plus its scale and
        zero point)."""
        target = self.target
        parts = [target.entry, target.scale, target.zero_point]
        return sum(part.nbytes // max(1, target.batch) for part in parts if part is not None)


@dataclass(frozen=True)
class ScanPlan:
    """Everything decided before any tensor data is read."""

    path: Path
    config: ScanConfig
    layout: CheckpointLayout
    items: tuple[MatrixItem, ...]
    skipped: tuple[SkippedTarget, ...]
    device: torch.device
    dtype: torch.dtype
    settings: KrylovSettings
    precision: PrecisionChoice


@dataclass
class ComputeOutcome:
    results: dict[tuple[str, int | None], LayerResult] = field(default_factory=dict)
    compute_seconds: float = 0.0  # solving (Krylov, metrics): wall seconds any solver ran
    read_seconds: float = 0.0  # reading and converting, loader thread (overlaps compute)


def resolve_device(spec: str) -> torch.device:
    """`auto` -> the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"unknown device '{spec}'", "use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device '{spec}' requested but CUDA is not available",
                "use --device cpu, or install a CUDA build of torch",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device '{spec}' does not exist ({torch.cuda.device_count()} CUDA devices)",
                "pick an index below the device count",
            )
    elif device.type != "cpu":
        raise UsageError(f"device '{spec}' is not supported", "use auto, cpu, cuda or cuda:N")
    return device


def matrix_seed(seed: int, name: str, index: int | None) -> int:
    """A per-matrix seed from the run seed and the matrix's identity.

    Results then do not depend on batch composition, device batch size or tensor order.
    """
    digest = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def precision_timings(choice: PrecisionChoice) -> dict[str, float]:
    """The measurement behind `--precision auto`: run-dependent, so it lives in `timings`."""
    if choice.bf16_time_ratio is None:
        return {}
    return {"bf16_time_ratio": round(choice.bf16_time_ratio, 4)}


def with_precision(plan: ScanPlan, choice: PrecisionChoice) -> ScanPlan:
    """The plan with another product precision (a distributed scan adopts rank 0's choice, so
    that every rank computes alike)."""
    settings = replace(plan.settings, bf16_products=choice.products == "bf16")
    return replace(plan, precision=choice, settings=settings)


def plan_scan(path: Path, config: ScanConfig, device: torch.device | None = None) -> ScanPlan:
    """Open and validate the checkpoint's headers, select the matrices; no tensor data is read.

    device: overrides `config.device` (a distributed rank's own device).
    """
    layout = open_checkpoint(path)
    targets, skipped_targets = select(layout.entries, config.include, config.exclude)
    for pattern in config.include:
        # A typo in a CI job's --include must not pass as "0 matrices, 0 flagged".
        if not any(fnmatchcase(entry.name, pattern) for entry in layout.entries):
            raise UsageError(
                f"--include '{pattern}' matches no tensor in '{path}'",
                "run `pss scan` without --include to list the tensor names",
            )
    pairs = [
        (target, index)
        for target in targets
        for index in (range(target.batch) if target.view is MatrixView.STACKED else [None])
    ]
    items = tuple(
        MatrixItem(target, index, matrix_seed(config.seed, target.entry.name, index), position)
        for position, (target, index) in enumerate(pairs)
    )
    device = device if device is not None else resolve_device(config.device)
    dtype = torch.float64 if config.compute_dtype is ComputeDtype.FLOAT64 else torch.float32
    settings = KrylovSettings(exact_max_dim=config.exact_max_dim)
    krylov = any(krylov_path(item.tall_shape, config, settings) for item in items)
    if krylov:
        precision = choose_precision(str(config.precision), device, dtype, BF16_MIN_SPEEDUP)
    else:
        # Nothing takes the Krylov path: no products to choose for, nothing to measure.
        precision = PrecisionChoice(
            "fp64" if dtype == torch.float64 else "fp32", str(config.precision), "no-krylov", None
        )
    return ScanPlan(
        path=path,
        config=config,
        layout=layout,
        items=items,
        skipped=tuple(skipped_targets),
        device=device,
        dtype=dtype,
        settings=replace(settings, bf16_products=precision.products == "bf16"),
        precision=precision,
    )


def relative_file(layout: CheckpointLayout, file: Path) -> str:
    base = layout.folder
    try:
        return str(file.relative_to(base))
    except ValueError:
        return str(file)
