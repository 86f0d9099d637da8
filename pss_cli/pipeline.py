"""Orchestration of a scan.

layout -> selection -> shape groups -> device batches -> core -> results.

Memory: nothing larger than one device batch is ever held. Each matrix is streamed from its file
(positional reads, no memory map) through a small staging buffer into the batch's compute buffer,
converted to the compute dtype on the way (on the GPU for a CUDA scan), and batches are sized by
`plan_batches` so that the batch being solved, its solver workspace and the next batch (loaded by
a background thread while this one computes) stay within the budget.

The three phases `plan_scan`, `compute_items` and `assemble_report` are separate so that a
distributed scan (pss_cli.distributed) can give each process a share of the items and rebuild the
same report on rank 0. No printing and no CLI here: progress goes through a callback.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Protocol

import torch

from pss_cli import __version__
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.checkpoint.selection import MatrixTarget, MatrixView, SkippedTarget, select
from pss_cli.checkpoint.torch_dtypes import torch_dtype_or_none
from pss_cli.config import (
    BF16_MIN_SPEEDUP,
    CUDA_FREE_MEMORY_FRACTION,
    MIN_STABLE_RANK_FRACTION_OF_RANK,
    STAGING_BUFFER_BYTES,
    ComputeDtype,
    ScanConfig,
)
from pss_cli.core.metrics import SpectralMetrics, spectral_metrics, stable_rank_floor
from pss_cli.core.precision import PrecisionChoice, choose_precision
from pss_cli.core.spectra import (
    KrylovSettings,
    exact_singular_values,
    gaussian_start,
    iteration_budget,
    top_singular_values,
    uses_exact_path,
)
from pss_cli.errors import UsageError
from pss_cli.results import Flag, LayerResult, ScanReport, ScanSummary, SkippedResult


class ProgressCallback(Protocol):
    """Called after each batch: matrices done of total, the last tensor's name, and the bytes of
    tensor data read so far of the total (0, 0 from callers that do not count bytes)."""

    def __call__(
        self, done: int, total: int, name: str, bytes_done: int = 0, bytes_total: int = 0
    ) -> None: ...


FLAG_LOW_STABLE_RANK = Flag.LOW_STABLE_RANK
FLAG_NONFINITE = Flag.NONFINITE
FLAG_ZERO = Flag.ZERO_MATRIX
NORM_CHUNK_ENTRIES = 4 * 2**20  # bounds the float64 scratch of the norm to 32 MiB
# Row width of the two-level sum of squares (see `_sum_of_squares`).
_NORM_ROW = 1024
# Stored dtypes streamed straight into the compute buffer (a copy_ converts them exactly).
_STREAMED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


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
        """Bytes of tensor data read for this matrix (its share of a stack, plus its scale)."""
        own = self.target.entry.nbytes // max(1, self.target.batch)
        scale = self.target.scale.nbytes // max(1, self.target.batch) if self.target.scale else 0
        return own + scale


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
    compute_seconds: float = 0.0  # solving (norms, Krylov, metrics), main thread
    read_seconds: float = 0.0  # reading and converting, loader thread (overlaps compute)


@dataclass(frozen=True)
class Batch:
    """Same-shape items solved together.

    buffer_bytes: the (B, m, n) compute buffer. peak_bytes: the buffer plus the solver's workspace
    while it runs (see `batch_peak_bytes`). prefetch: whether this batch may be loaded while the
    previous one is being solved (their sum stays within the budget).
    """

    items: tuple[MatrixItem, ...]
    buffer_bytes: int
    peak_bytes: int
    prefetch: bool


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
    plan = plan_scan(path, config)
    outcome = compute_items(plan, plan.items, progress)
    return assemble_report(
        plan,
        outcome.results,
        {
            "total_seconds": round(time.perf_counter() - started, 6),
            "compute_seconds": round(outcome.compute_seconds, 6),
            "read_seconds": round(outcome.read_seconds, 6),
            **precision_timings(plan.precision),
        },
    )


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
    krylov = not config.exact and any(
        not uses_exact_path(*item.tall_shape, min(config.top_k, item.tall_shape[1]), settings)
        for item in items
    )
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


def compute_items(
    plan: ScanPlan, items: Sequence[MatrixItem], progress: ProgressCallback | None = None
) -> ComputeOutcome:
    """Analyse `items` (all of the plan's, or one rank's share), one batch at a time.

    Batch i+1 is read and converted by a loader thread while batch i is solved (file reads and
    torch kernels release the GIL), when `plan_batches` says both fit the memory budget.
    """
    outcome = ComputeOutcome()
    itemsize = torch.empty((), dtype=plan.dtype).element_size()
    budget = batch_budget_bytes(plan.device, plan.config)
    batches = plan_batches(
        items, itemsize, budget, plan.settings, plan.config.top_k, plan.config.exact
    )
    total = len(items)
    bytes_total = sum(item.nbytes for item in items)
    done = 0
    bytes_done = 0
    if progress is not None:
        progress(0, total, "", 0, bytes_total)
    with TensorReader(plan.layout) as reader, ThreadPoolExecutor(1, "pss-loader") as pool:
        loader = _Loader(reader, plan)
        pending: Future[_Loaded] | None = None
        for position, batch in enumerate(batches):
            if pending is None:
                pending = pool.submit(loader.load, batch)
            loaded = pending.result()
            pending = None
            following = batches[position + 1] if position + 1 < len(batches) else None
            if following is not None and following.prefetch:
                pending = pool.submit(loader.load, following)
            t0 = time.perf_counter()
            for result in _solve(loaded, plan):
                outcome.results[(result.name, result.index)] = result
            del loaded
            outcome.compute_seconds += time.perf_counter() - t0
            done += len(batch.items)
            bytes_done += sum(item.nbytes for item in batch.items)
            if progress is not None:
                progress(done, total, batch.items[-1].target.entry.name, bytes_done, bytes_total)
        outcome.read_seconds = loader.seconds
    return outcome


def assemble_report(
    plan: ScanPlan,
    results: Mapping[tuple[str, int | None], LayerResult],
    timings: dict[str, float],
    world_size: int = 1,
) -> ScanReport:
    """The report, layers in item order whatever order (or process) computed them."""
    layout = plan.layout
    config = plan.config
    settings = plan.settings
    layers = tuple(results[item.key] for item in plan.items)
    index_name = layout.index_file.name if layout.index_file is not None else ""
    skipped = tuple(
        SkippedResult(
            name=s.entry.name,
            file=_relative(layout, s.entry.file),
            shape=s.entry.shape,
            dtype=s.entry.dtype,
            reason=s.reason,
        )
        for s in plan.skipped
    ) + tuple(
        SkippedResult(
            name="",  # a whole file, not a tensor
            file=_relative(layout, file),
            shape=(),
            dtype="",
            reason=(
                f"file not named by the index '{index_name}': not scanned"
                if index_name and file.name.endswith(".safetensors")
                else "torch weights beside safetensors ones, which are read instead: not scanned"
            ),
        )
        for file in layout.unindexed_files
    )
    return ScanReport(
        pss_version=__version__,
        checkpoint=str(plan.path),
        layout=str(layout.kind),
        # The device type: a distributed CUDA scan runs on cuda:0..N-1 and reports "cuda", as a
        # single-process `--device cuda` scan does.
        device=str(plan.device) if world_size == 1 else plan.device.type,
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
            "world_size": world_size,
            # --precision as asked, the Krylov products used (fp32 | bf16 | fp64) and why
            # (measured: timings.bf16_time_ratio against BF16_MIN_SPEEDUP; requested; ...).
            "precision": plan.precision.requested,
            "products": plan.precision.products,
            "precision_basis": plan.precision.basis,
            "bf16_min_speedup": BF16_MIN_SPEEDUP,
        },
        layers=layers,
        skipped=skipped,
        summary=_summarise(layers, len(skipped)),
        timings=timings,
    )


# --------------------------------------------------------------------------------------------
# Memory plan
# --------------------------------------------------------------------------------------------


def batch_budget_bytes(device: torch.device, config: ScanConfig) -> int:
    """Bytes the batches in flight may use: a share of free device memory on CUDA, else the
    configured host budget."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_MEMORY_FRACTION)
    return config.cpu_batch_bytes


def batch_peak_bytes(
    count: int,
    shape: tuple[int, int],
    itemsize: int,
    settings: KrylovSettings,
    top_k: int,
    exact: bool,
) -> int:
    """Upper estimate of the memory a batch of `count` tall (m, n) matrices needs while solved.

    The buffer itself; up to two partial copies of it (the finite, nonzero matrices are gathered
    when some are not, and the solver drops converged matrices by indexing, which copies the
    rest); and per matrix either the two Krylov bases ((m + n) x (iterations + 1) * block) or, on
    the exact path, LAPACK's copy of the matrix plus its (n, n) workspace.
    """
    m, n = shape
    matrix = m * n * itemsize
    copies = 2 * (count - 1) * matrix
    if exact or uses_exact_path(m, n, min(top_k, n), settings):
        workspace = matrix + n * n * itemsize
    else:
        columns = (iteration_budget(n, settings) + 1) * settings.block_size
        workspace = (m + n) * columns * itemsize
        if settings.bf16_products:
            workspace += m * n * 2  # A in bf16 (spectra._Products)
    return count * matrix + copies + count * workspace


def plan_batches(
    items: Iterable[MatrixItem],
    itemsize: int,
    budget: int,
    settings: KrylovSettings,
    top_k: int,
    exact: bool = False,
) -> list[Batch]:
    """Same-shape groups (tall orientation), largest first, cut into batches.

    A batch is as large as possible with its peak (`batch_peak_bytes`) within 2/3 of the budget
    and its buffer within 1/3, so that any batch can be loaded while any other is solved. A
    single matrix too large for that is a batch of its own, loaded only when nothing else is in
    flight (prefetch False), so memory never holds more than the budget or that one matrix's
    peak. Items keep their relative order within a group.
    """
    groups: dict[tuple[int, int], list[MatrixItem]] = {}
    for item in items:
        groups.setdefault(item.tall_shape, []).append(item)
    batches: list[Batch] = []
    previous_peak: int | None = None
    for shape in sorted(groups, key=lambda s: (-s[0] * s[1], s)):
        group = groups[shape]
        matrix = shape[0] * shape[1] * itemsize
        size = 1
        while size < len(group) and (
            3 * batch_peak_bytes(size + 1, shape, itemsize, settings, top_k, exact) <= 2 * budget
            and 3 * (size + 1) * matrix <= budget
        ):
            size += 1
        for start in range(0, len(group), size):
            chunk = tuple(group[start : start + size])
            buffer = len(chunk) * matrix
            peak = batch_peak_bytes(len(chunk), shape, itemsize, settings, top_k, exact)
            prefetch = previous_peak is not None and previous_peak + buffer <= budget
            batches.append(Batch(chunk, buffer, peak, prefetch))
            previous_peak = peak
    return batches


# --------------------------------------------------------------------------------------------
# Loading: file bytes -> staging buffer -> compute buffer (on the compute device)
# --------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    batch: Batch
    buffer: torch.Tensor  # (B, m, n) tall, compute dtype, on the device, scaled to unit norm
    frobenius: list[float]
    nonfinite: list[int]


class _Loader:
    """Fills a batch's compute buffer. Runs in the loader thread; `seconds` is its busy time.

    On CUDA, host bytes land in two pinned staging buffers used in turn, are copied to the device
    on a side stream (asynchronously, so the next file read overlaps the transfer) and converted
    to the compute dtype there: bf16/fp16 cross the bus at their stored size.
    """

    def __init__(self, reader: TensorReader, plan: ScanPlan) -> None:
        self.reader = reader
        self.plan = plan
        self.seconds = 0.0
        self._cuda = plan.device.type == "cuda"
        self._host: list[torch.Tensor] = []
        self._ready: list[Any] = []  # CUDA events: staging buffer i may be overwritten
        self._turn = 0
        self._stream: Any = None

    def load(self, batch: Batch) -> _Loaded:
        t0 = time.perf_counter()
        try:
            if not self._cuda:
                return self._load(batch)
            # Everything the loader does on the device (allocation, transfers, upcasts, norms)
            # runs on its own stream, so it overlaps the solver's kernels on the default stream.
            stream = self._copy_stream()
            with torch.cuda.device(self.plan.device), torch.cuda.stream(stream):
                loaded = self._load(batch)
                stream.synchronize()  # every write into the buffer has landed
            # The buffer is freed by the solver's thread after default-stream work: the caching
            # allocator must not hand it to the loader's stream before that work is done.
            loaded.buffer.record_stream(torch.cuda.default_stream(self.plan.device))
            return loaded
        finally:
            self.seconds += time.perf_counter() - t0

    def _load(self, batch: Batch) -> _Loaded:
        try:
            return self._fill(batch)
        finally:
            # Pages touched through a memory map (formats without positional reads) count in
            # RSS while mapped: unmap after every batch, so they leave with it.
            self.reader.release_mappings()

    def _fill(self, batch: Batch) -> _Loaded:
        tall_m, tall_n = batch.items[0].tall_shape
        buffer = torch.empty(
            len(batch.items), tall_m, tall_n, dtype=self.plan.dtype, device=self.plan.device
        )
        frobenius: list[float] = []
        nonfinite: list[int] = []
        for slot, item in enumerate(batch.items):
            target = buffer[slot]
            if self._streamable(item):
                self._stream_into(item, target)
                norm, bad = _finish_target(target)
            else:
                norm, bad = _copy_source(_source_matrix(self.reader, item), target)
            frobenius.append(norm)
            nonfinite.append(bad)
        return _Loaded(batch, buffer, frobenius, nonfinite)

    def _streamable(self, item: MatrixItem) -> bool:
        entry = item.target.entry
        if item.target.scale is not None or not self.reader.can_read_into(entry):
            return False
        if entry.dtype in _STREAMED_DTYPES:
            return True
        # float64 into float64 is exact; into float32 it needs the source's own norm first.
        return entry.dtype == "F64" and self.plan.dtype == torch.float64

    def _stream_into(self, item: MatrixItem, target: torch.Tensor) -> None:
        """Copy the stored (m, n) matrix into `target` ((m, n), or (n, m) for a wide one),
        a few MiB of rows at a time, converting to the compute dtype on the way."""
        entry = item.target.entry
        stored = _STREAMED_DTYPES.get(entry.dtype, torch.float64)
        m, n = item.target.matrix_shape
        row_bytes = n * stored.itemsize
        first = (item.index or 0) * m * row_bytes  # a stacked tensor's matrices lie back to back
        wide = m < n
        if not self._cuda and not wide and stored == self.plan.dtype:
            # Stored as computed: read straight into the buffer, no staging copy at all.
            self.reader.read_into(entry, target, first)
            return
        rows_per_chunk = max(1, STAGING_BUFFER_BYTES // row_bytes)
        for r0 in range(0, m, rows_per_chunk):
            rows = min(rows_per_chunk, m - r0)
            dest = target[:, r0 : r0 + rows] if wide else target[r0 : r0 + rows]
            host = self._staging(rows * row_bytes, stored, (rows, n))
            self.reader.read_into(entry, host, first + r0 * row_bytes)
            if self._cuda:
                self._to_device(host, dest, wide)
            else:
                dest.copy_(host.mT if wide else host)

    def _staging(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        """A (rows, n) view of the next staging buffer, once its previous transfer is done."""
        size = max(nbytes, STAGING_BUFFER_BYTES)
        if not self._host:
            count = 2 if self._cuda else 1
            self._host = [
                torch.empty(size, dtype=torch.uint8, pin_memory=self._cuda) for _ in range(count)
            ]
            self._ready = [None] * count
        turn = self._turn
        if self._ready[turn] is not None:
            self._ready[turn].synchronize()
        if self._host[turn].numel() < nbytes:  # a single row wider than the staging buffer
            self._host[turn] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._cuda)
        return self._host[turn][:nbytes].view(dtype).view(shape)

    def _to_device(self, host: torch.Tensor, dest: torch.Tensor, wide: bool) -> None:
        """Runs on the loader's stream (see `load`): the transfer is asynchronous from pinned
        memory, and the event tells `_staging` when this host buffer may be refilled."""
        staged = host.to(self.plan.device, non_blocking=True)  # stored dtype on the bus
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        dest.copy_(staged.mT if wide else staged)  # the bf16/fp16 -> fp32 upcast, on device
        self._ready[self._turn] = event
        self._turn = (self._turn + 1) % len(self._host)

    def _copy_stream(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.plan.device)  # type: ignore[no-untyped-call]
        return self._stream


def _finish_target(target: torch.Tensor) -> tuple[float, int]:
    """Norm, non-finite count and unit-norm scaling of a matrix copied exactly into `target`.

    bf16/fp16/fp32 values (and float64 into float64) are exact in the buffer, so the norm and
    the NaN/Inf count can be taken from it.
    """
    norm = _buffer_norm(target)
    bad = 0 if math.isfinite(norm) else _count_nonfinite(target)
    if not math.isfinite(norm) or norm == 0.0:
        # float64 weights near 1e200 overflow the sum of squares, near 1e-200 underflow it.
        norm = 0.0 if bad else frobenius_norm(target)
    # Scale to unit Frobenius norm: tiny fp16 or huge weights stay well inside float32's range
    # through the Krylov products; singular values are rescaled afterwards.
    _scale_to_unit(target, norm)
    return norm, bad


def unit_scale(norm: float) -> float:
    """The power of two the buffer is divided by: norm / unit_scale(norm) lies in [0.5, 1).

    A power of two, not the norm itself, so that the scaling is exact: a BF16 or F16
    checkpoint's values stay exactly representable in their own dtype, and the bf16 products
    (pss_cli.core.spectra) see the stored matrix, not a rounded copy of it.
    """
    return math.ldexp(1.0, math.frexp(norm)[1])


def _scale_to_unit(target: torch.Tensor, norm: float) -> None:
    # Divide, never multiply by 1/scale: for a subnormal norm (5e-324) 1/scale overflows to inf
    # and 0 * inf = NaN reached LAPACK (found by tests/test_fuzz.py). A norm beyond float64's
    # range (inf without NaN/Inf entries) is reported as non-finite; the buffer is unused.
    if 0.0 < norm < math.inf:
        target.div_(unit_scale(norm))
    else:
        target.zero_()


def _copy_source(source: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    """The fallback path: a whole (m, n) source matrix (memory-mapped or dequantized)."""
    oriented = source if source.shape[0] >= source.shape[1] else source.mT
    if source.dtype == torch.float64 and target.dtype == torch.float32:
        # float64 weights may not fit float32: measure on the source, scale, then copy.
        bad = _count_nonfinite(source)
        norm = 0.0 if bad else frobenius_norm(source)
        if 0.0 < norm < math.inf:
            target.copy_(oriented / unit_scale(norm))
        else:
            target.zero_()
        return norm, bad
    # copy_ into a reused buffer, not .float(): 10-15x faster on CPU (docs/DESIGN.md).
    target.copy_(oriented)
    norm = _buffer_norm(target)
    bad = 0 if math.isfinite(norm) else _count_nonfinite(source)
    if not math.isfinite(norm) or norm == 0.0:
        norm = 0.0 if bad else frobenius_norm(source)
    _scale_to_unit(target, norm)
    return norm, bad


def _source_matrix(reader: TensorReader, item: MatrixItem) -> torch.Tensor:
    """One whole (m, n) matrix in its stored dtype (dequantized when it has a scale): for
    quantized tensors, float64 sources of a float32 scan, and formats without positional reads.
    Only this matrix's bytes are read, not its whole stack."""
    target = item.target
    slot = item.index if item.index is not None else 0
    matrix = _read_matrix(reader, target.entry, target.matrix_shape, slot)
    if matrix is None:
        matrix = target.as_matrices(reader.read(target.entry))[slot]
    if target.scale is not None:
        # Dequantize in float32 (float64 for float64 scales): q * scale, scale broadcast per
        # tensor or per channel as stored. The spectrum of q alone means nothing.
        scale = _read_matrix(reader, target.scale, None, 0)
        if scale is None:
            scale = reader.read(target.scale)
        dtype = torch.float64 if scale.dtype == torch.float64 else torch.float32
        scales = target.as_matrices(torch.broadcast_to(scale, target.entry.shape))[slot]
        matrix = matrix.to(dtype) * scales.to(dtype)
    return matrix


def _read_matrix(
    reader: TensorReader, entry: TensorEntry, shape: tuple[int, int] | None, slot: int
) -> torch.Tensor | None:
    """Matrix `slot` of `entry` viewed as (-1, *shape) (the whole tensor when shape is None),
    read into a fresh tensor with positional reads; None where the reader cannot (then the
    caller maps the file)."""
    dtype = torch_dtype_or_none(entry.dtype)
    if dtype is None or not reader.can_read_into(entry):
        return None
    out = torch.empty(shape if shape is not None else entry.shape, dtype=dtype)
    reader.read_into(entry, out, slot * out.numel() * out.element_size())
    return out


# --------------------------------------------------------------------------------------------
# Solving
# --------------------------------------------------------------------------------------------


def _solve(loaded: _Loaded, plan: ScanPlan) -> list[LayerResult]:
    chunk = loaded.batch.items
    config = plan.config
    settings = plan.settings
    buffer = loaded.buffer
    frobenius = loaded.frobenius
    nonfinite = loaded.nonfinite
    tall_m, tall_n = chunk[0].tall_shape
    usable = [
        slot
        for slot in range(len(chunk))
        if nonfinite[slot] == 0 and 0 < frobenius[slot] < math.inf
    ]
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
                full[slot] = spectra[row] * unit_scale(frobenius[slot])
                top[slot] = full[slot][:k]
                solver[slot] = "exact"
        else:
            start = None
            if not uses_exact_path(tall_m, tall_n, k, settings):
                start = gaussian_start([chunk[s].seed for s in usable], tall_n, settings.block_size)
            result = top_singular_values(matrices, k, start, settings)
            for row, slot in enumerate(usable):
                top[slot] = result.values[row] * unit_scale(frobenius[slot])
                iterations[slot] = result.iterations[row]
                if result.iterations[row] == 0:
                    solver[slot] = "exact"
                else:
                    solver[slot] = "exact-fallback" if result.exact[row] else "krylov"

    results = []
    for slot, item in enumerate(chunk):
        if nonfinite[slot] or frobenius[slot] == math.inf:
            metrics = SpectralMetrics(None, None, None, None, None)
        else:
            metrics = spectral_metrics(top[slot], frobenius[slot], full.get(slot))
        results.append(
            _layer_result(
                item,
                plan.layout,
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
    """||W||_F of a float32/64 matrix, exact in float64: chunks of ~4M entries copied into one
    reused float64 scratch buffer, then rows of 1024 reduced in float64.

    Converting each chunk into a fresh float64 tensor (the previous way) cost ~4x more (AMD
    EPYC Zen 4, 2 threads, shared: 953 vs 229 ms for an 11008 x 4096 matrix in one run; fresh
    allocations, not arithmetic, dominate: NOTES on `copy_` into a reused buffer), and torch's
    float64-accumulating norm of float32 data ~2.3x more. A float32 sum over millions of entries
    was off by 4e-5 (relative). NaN/Inf propagate (the caller then counts them).
    """
    rows_per_chunk = max(1, NORM_CHUNK_ENTRIES // max(1, matrix.shape[-1]))
    scratch = torch.empty(
        min(matrix.numel(), rows_per_chunk * matrix.shape[-1]),
        dtype=torch.float64,
        device=matrix.device,
    )
    total = 0.0
    for chunk in torch.split(matrix, rows_per_chunk):
        flat = scratch[: chunk.numel()]
        flat.copy_(chunk.reshape(-1))
        total += _sum_of_squares(flat)
    return math.sqrt(total)


def _sum_of_squares(flat: torch.Tensor) -> float:
    """sum(x^2) of a float64 vector in an order that does not depend on the thread count.

    A whole-vector reduction (torch.dot, .sum()) splits the work among threads, so its rounding
    changes with OMP_NUM_THREADS, and a distributed scan (torchrun sets one thread per process)
    would then differ from a single-process one in the last bits. Rows of 1024 are each reduced
    by one thread (torch splits an inner-dimension reduction by rows), and the few thousand row
    sums stay below torch's parallel grain size.
    """
    body = flat.numel() - flat.numel() % _NORM_ROW
    total = 0.0
    if body:
        norms = torch.linalg.vector_norm(flat[:body].view(-1, _NORM_ROW), dim=1)
        total += float(norms.mul(norms).sum())
    if body < flat.numel():
        tail = flat[body:]
        total += float(tail.mul(tail).sum())
    return total


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


def _layer_result(
    item: MatrixItem,
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
    if nonfinite or frobenius == math.inf:  # inf: finite entries, norm beyond float64
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
        frobenius_norm=None if nonfinite or frobenius == math.inf else frobenius,
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
