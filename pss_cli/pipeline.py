"""Orchestration of a scan.

layout -> selection -> shape groups -> device batches -> core -> results.

No printing and no CLI here: progress goes through a callback, results come back as data.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from pss_cli import __version__
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.checkpoint.selection import MatrixTarget, MatrixView, select
from pss_cli.config import (
    CUDA_FREE_MEMORY_FRACTION,
    MIN_STABLE_RANK_FRACTION_OF_RANK,
    ComputeDtype,
    ScanConfig,
)
from pss_cli.core.metrics import SpectralMetrics, spectral_metrics, stable_rank_floor
from pss_cli.core.spectra import (
    KrylovSettings,
    exact_singular_values,
    gaussian_start,
    top_singular_values,
    uses_exact_path,
)
from pss_cli.errors import UsageError
from pss_cli.results import LayerResult, ScanReport, ScanSummary, SkippedResult

ProgressCallback = Callable[[int, int, str], None]  # (matrices done, total, current tensor name)

FLAG_LOW_STABLE_RANK = "low_stable_rank"
FLAG_NONFINITE = "nonfinite"
FLAG_ZERO = "zero_matrix"
NORM_CHUNK_ENTRIES = 4 * 2**20  # bounds the float64 temporary of the norm to 32 MiB


@dataclass(frozen=True)
class _Item:
    """One matrix to analyse: a 2-D tensor, a flattened conv kernel, or one expert of a stack."""

    target: MatrixTarget
    index: int | None
    seed: int

    @property
    def tall_shape(self) -> tuple[int, int]:
        m, n = self.target.matrix_shape
        return (m, n) if m >= n else (n, m)


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


def scan_checkpoint(
    path: Path, config: ScanConfig, progress: ProgressCallback | None = None
) -> ScanReport:
    started = time.perf_counter()
    layout = open_checkpoint(path)
    targets, skipped_targets = select(layout.entries, config.include, config.exclude)
    for pattern in config.include:
        # A typo in a CI job's --include must not pass as "0 matrices, 0 flagged".
        if not any(fnmatchcase(entry.name, pattern) for entry in layout.entries):
            raise UsageError(
                f"--include '{pattern}' matches no tensor in '{path}'",
                "run `pss scan` without --include to list the tensor names",
            )
    device = resolve_device(config.device)
    dtype = torch.float64 if config.compute_dtype is ComputeDtype.FLOAT64 else torch.float32
    settings = KrylovSettings(exact_max_dim=config.exact_max_dim)

    items = [
        _Item(target, index, matrix_seed(config.seed, target.entry.name, index))
        for target in targets
        for index in (range(target.batch) if target.view is MatrixView.STACKED else [None])
    ]
    computed: dict[tuple[str, int | None], LayerResult] = {}
    done = 0
    compute_seconds = 0.0
    with TensorReader(layout) as reader:
        for chunk in _batches(items, device, dtype, config):
            t0 = time.perf_counter()
            for result in _analyse_chunk(chunk, reader, layout, device, dtype, config, settings):
                computed[(result.name, result.index)] = result
            compute_seconds += time.perf_counter() - t0
            done += len(chunk)
            if progress is not None:
                progress(done, len(items), chunk[-1].target.entry.name)

    layers = tuple(computed[(item.target.entry.name, item.index)] for item in items)
    index_name = layout.index_file.name if layout.index_file is not None else ""
    skipped = tuple(
        SkippedResult(
            name=s.entry.name,
            file=_relative(layout, s.entry.file),
            shape=s.entry.shape,
            dtype=s.entry.dtype,
            reason=s.reason,
        )
        for s in skipped_targets
    ) + tuple(
        SkippedResult(
            name="",  # a whole file, not a tensor
            file=_relative(layout, file),
            shape=(),
            dtype="",
            reason=f"file not named by the index '{index_name}': not scanned",
        )
        for file in layout.unindexed_files
    )
    return ScanReport(
        pss_version=__version__,
        checkpoint=str(path),
        layout=str(layout.kind),
        device=str(device),
        seed=config.seed,
        method="exact" if config.exact else "block-krylov",
        settings={
            "top_k": config.top_k,
            "min_stable_rank": config.min_stable_rank,
            "min_stable_rank_fraction_of_rank": MIN_STABLE_RANK_FRACTION_OF_RANK,
            "compute_dtype": str(config.compute_dtype),
            "include": list(config.include),
            "exclude": list(config.exclude),
            "block_size": settings.block_size,
            "tol_sigma_max": settings.tol_sigma_max,
            "tol_top_k": settings.tol_top_k,
            "exact_max_dim": settings.exact_max_dim,
        },
        layers=layers,
        skipped=skipped,
        summary=_summarise(layers, len(skipped)),
        timings={
            "total_seconds": round(time.perf_counter() - started, 6),
            "compute_seconds": round(compute_seconds, 6),
        },
    )


def _batches(
    items: list[_Item], device: torch.device, dtype: torch.dtype, config: ScanConfig
) -> Iterator[list[_Item]]:
    """Same-shape groups (tall orientation), cut into batches that fit the memory budget."""
    groups: dict[tuple[int, int], list[_Item]] = {}
    for item in items:
        groups.setdefault(item.tall_shape, []).append(item)
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = _batch_budget_bytes(device, config)
    for shape in sorted(groups, key=lambda s: (-s[0] * s[1], s)):
        group = groups[shape]
        # x3: the batch itself, the copy made when converged matrices are dropped, and slack
        # for the Krylov blocks and LAPACK workspaces.
        per_matrix = 3 * shape[0] * shape[1] * itemsize
        size = max(1, budget // per_matrix)
        for start in range(0, len(group), size):
            yield group[start : start + size]


def _batch_budget_bytes(device: torch.device, config: ScanConfig) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_MEMORY_FRACTION)
    return config.cpu_batch_bytes


def _analyse_chunk(
    chunk: list[_Item],
    reader: TensorReader,
    layout: CheckpointLayout,
    device: torch.device,
    dtype: torch.dtype,
    config: ScanConfig,
    settings: KrylovSettings,
) -> list[LayerResult]:
    tall_m, tall_n = chunk[0].tall_shape
    buffer = torch.empty(len(chunk), tall_m, tall_n, dtype=dtype, device=device)
    nonfinite: list[int] = []
    frobenius: list[float] = []
    for slot, item in enumerate(chunk):
        source = _source_matrix(reader, item)  # (m, n) in the stored dtype, mmap-backed
        oriented = source if source.shape[0] >= source.shape[1] else source.mT
        target = buffer[slot]
        if source.dtype == torch.float64 and dtype == torch.float32:
            # float64 weights may not fit float32: measure on the source, scale, then copy.
            bad = _count_nonfinite(source)
            norm = 0.0 if bad else frobenius_norm(source)
            target.copy_(oriented * (1.0 / norm if norm > 0.0 else 0.0))
        else:
            # copy_ into a reused buffer, not .float(): 10-15x faster on CPU (NOTES.md). The
            # buffer holds bf16/fp16/fp32 values exactly, so the norm can be taken from it.
            target.copy_(oriented)
            norm = _buffer_norm(target)
            bad = 0 if math.isfinite(norm) else _count_nonfinite(source)
            if not math.isfinite(norm) or norm == 0.0:
                norm = 0.0 if bad else frobenius_norm(source)
            # Scale to unit Frobenius norm: tiny fp16 or huge weights stay well inside float32's
            # range through the Krylov products; singular values are rescaled afterwards.
            target.mul_(1.0 / norm if norm > 0.0 else 0.0)
        nonfinite.append(bad)
        frobenius.append(norm)

    usable = [slot for slot in range(len(chunk)) if nonfinite[slot] == 0 and frobenius[slot] > 0]
    k = min(config.top_k, tall_n)
    top = torch.zeros(len(chunk), k, dtype=torch.float64)
    full: dict[int, torch.Tensor] = {}
    solver = ["none"] * len(chunk)
    iterations = [0] * len(chunk)
    if usable:
        matrices = buffer[usable] if len(usable) < len(chunk) else buffer
        if config.exact:
            spectra = exact_singular_values(matrices).to("cpu", torch.float64)
            for row, slot in enumerate(usable):
                full[slot] = spectra[row] * frobenius[slot]
                top[slot] = full[slot][:k]
                solver[slot] = "exact"
        else:
            start = None
            if not uses_exact_path(tall_m, tall_n, k, settings):
                start = gaussian_start([chunk[s].seed for s in usable], tall_n, settings.block_size)
            result = top_singular_values(matrices, k, start, settings)
            for row, slot in enumerate(usable):
                top[slot] = result.values[row] * frobenius[slot]
                iterations[slot] = result.iterations[row]
                if result.iterations[row] == 0:
                    solver[slot] = "exact"
                else:
                    solver[slot] = "exact-fallback" if result.exact[row] else "krylov"
    del buffer

    results = []
    for slot, item in enumerate(chunk):
        if nonfinite[slot]:
            metrics = SpectralMetrics(None, None, None, None, None)
        else:
            metrics = spectral_metrics(top[slot], frobenius[slot], full.get(slot))
        results.append(
            _layer_result(
                item,
                layout,
                metrics,
                top[slot] if slot in usable else None,
                frobenius[slot],
                nonfinite[slot],
                solver[slot],
                iterations[slot],
                config,
            )
        )
    return results


def _buffer_norm(matrix: torch.Tensor) -> float:
    """||W||_F of a float32/64 matrix, accumulated in float64, in chunks of ~4M entries.

    A float32 norm over millions of entries was off by 4e-5 (relative) here, and torch's
    float64-accumulating norm of float32 data ran 20x slower than converting a chunk and taking
    a float64 dot product. NaN/Inf propagate (the caller then counts them).
    """
    rows_per_chunk = max(1, NORM_CHUNK_ENTRIES // max(1, matrix.shape[-1]))
    total = 0.0
    for chunk in torch.split(matrix, rows_per_chunk):
        flat = chunk.reshape(-1).to(torch.float64)
        total += float(torch.dot(flat, flat))
    return math.sqrt(total)


def _count_nonfinite(source: torch.Tensor) -> int:
    return int(source.numel() - torch.isfinite(source).sum())


def frobenius_norm(source: torch.Tensor) -> float:
    """||W||_F accumulated in float64, safe from overflow/underflow of the squares.

    torch's vector_norm squares without scaling: float64 weights near 1e300 give inf, near 1e-200
    give 0. Only then is the (costlier) rescaled form used.
    """
    norm = float(torch.linalg.vector_norm(source, dtype=torch.float64))
    if 0.0 < norm < float("inf"):
        return norm
    largest = float(source.abs().max())
    if largest == 0.0:
        return 0.0
    return largest * float(torch.linalg.vector_norm(source.to(torch.float64) / largest))


def _source_matrix(reader: TensorReader, item: _Item) -> torch.Tensor:
    target = item.target
    tensor = reader.read(target.entry)
    if target.scale is not None:
        # Dequantize in float32 (float64 for float64 scales): q * scale, scale broadcast per
        # tensor or per channel as stored. The spectrum of q alone means nothing.
        scale = reader.read(target.scale)
        dtype = torch.float64 if scale.dtype == torch.float64 else torch.float32
        tensor = tensor.to(dtype) * scale.to(dtype)
    matrices = target.as_matrices(tensor)
    return matrices[item.index if item.index is not None else 0]


def _layer_result(
    item: _Item,
    layout: CheckpointLayout,
    metrics: SpectralMetrics,
    top: torch.Tensor | None,
    frobenius: float,
    nonfinite: int,
    solver: str,
    iterations: int,
    config: ScanConfig,
) -> LayerResult:
    target = item.target
    flags = []
    if nonfinite:
        flags.append(FLAG_NONFINITE)
    elif frobenius <= 0.0:
        flags.append(FLAG_ZERO)
    floor = stable_rank_floor(
        config.min_stable_rank, min(target.matrix_shape), MIN_STABLE_RANK_FRACTION_OF_RANK
    )
    if metrics.stable_rank is not None and metrics.stable_rank < floor:
        flags.append(FLAG_LOW_STABLE_RANK)
    return LayerResult(
        name=target.entry.name,
        index=item.index,
        file=_relative(layout, target.entry.file),
        shape=target.entry.shape,
        matrix_shape=target.matrix_shape,
        dtype=target.entry.dtype,
        role=str(target.role),
        block=target.block,
        view=str(target.view),
        scale_tensor=target.scale.name if target.scale is not None else None,
        sigma_max=metrics.sigma_max,
        frobenius_norm=None if nonfinite else frobenius,
        stable_rank=metrics.stable_rank,
        top_singular_values=tuple(float(v) for v in top) if top is not None else (),
        topk_energy_share=metrics.topk_energy_share,
        sigma1_over_sigma2=metrics.sigma1_over_sigma2,
        entropy_effective_rank=metrics.entropy_effective_rank,
        nonfinite_count=nonfinite,
        flags=tuple(flags),
        solver=solver,
        iterations=iterations,
    )


def _relative(layout: CheckpointLayout, file: Path) -> str:
    base = layout.root if layout.root.is_dir() else layout.root.parent
    try:
        return str(file.relative_to(base))
    except ValueError:
        return str(file)


def _summarise(layers: tuple[LayerResult, ...], skipped: int) -> ScanSummary:
    ranked = [layer for layer in layers if layer.stable_rank is not None]
    lowest = min(ranked, key=lambda layer: layer.stable_rank or 0.0, default=None)
    sized = [layer for layer in layers if layer.sigma_max is not None]
    largest = max(sized, key=lambda layer: layer.sigma_max or 0.0, default=None)
    counts: dict[str, int] = {}
    for layer in layers:
        for flag in layer.flags:
            counts[flag] = counts.get(flag, 0) + 1
    return ScanSummary(
        matrices=len(layers),
        flagged=sum(1 for layer in layers if layer.flags),
        skipped=skipped,
        nonfinite_matrices=sum(1 for layer in layers if layer.nonfinite_count),
        min_stable_rank=lowest.stable_rank if lowest else None,
        min_stable_rank_layer=lowest.display_name if lowest else None,
        max_sigma_max=largest.sigma_max if largest else None,
        max_sigma_max_layer=largest.display_name if largest else None,
        flag_counts=dict(sorted(counts.items())),
    )
