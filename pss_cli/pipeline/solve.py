"""Solving: each loaded batch through the core solvers, one batch at a time (the next one loaded
by a background thread), into per-matrix results."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch

from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.config import MIN_STABLE_RANK_FRACTION_OF_RANK, ScanConfig
from pss_cli.core.krylov_basis import import_lapack_in_background
from pss_cli.core.lapack import set_own_threads
from pss_cli.core.metrics import SpectralMetrics, spectral_metrics, stable_rank_floor
from pss_cli.core.norms import scale_back
from pss_cli.core.spectra import (
    exact_singular_values,
    gaussian_start,
    top_singular_values,
    uses_exact_path,
)
from pss_cli.pipeline.loader import _Loaded, _Loader
from pss_cli.pipeline.memory import Batch, batch_budget_bytes, batch_peak_bytes, plan_batches
from pss_cli.pipeline.plan import (
    FLAG_LOW_STABLE_RANK,
    FLAG_NONFINITE,
    FLAG_ZERO,
    SOLVER_MASK,
    ComputeOutcome,
    MatrixItem,
    ProgressCallback,
    ScanPlan,
    krylov_path,
    relative_file,
)
from pss_cli.results import LayerResult


def compute_items(
    plan: ScanPlan, items: Sequence[MatrixItem], progress: ProgressCallback | None = None
) -> ComputeOutcome:
    """Analyse `items` (all of the plan's, or one rank's share), batch by batch.

    On a GPU, or a CPU with one thread: one batch at a time, batch i+1 read and converted by a
    loader thread while batch i is solved (file reads and torch kernels release the GIL), when
    `plan_batches` says both fit the memory budget. On a CPU with two or more threads: two
    batches solved at once, each on half of the threads (`_compute_concurrently` says why).
    """
    outcome = ComputeOutcome()
    itemsize = torch.empty((), dtype=plan.dtype).element_size()
    budget = batch_budget_bytes(plan.device, plan.config)
    threads = torch.get_num_threads()
    concurrent = plan.device.type == "cpu" and threads >= 2 and not _address_space_limited()
    # Two solvers share the budget: each plans its batches within half of it, so that two
    # batches and a third being loaded fit (`plan_batches`' 2/3 + 1/3 rule, per half).
    batches = plan_batches(
        items,
        itemsize,
        budget // SOLVERS if concurrent else budget,
        plan.settings,
        plan.config.top_k,
        plan.config.exact,
    )
    if concurrent and len(batches) == 1 and len(batches[0].items) >= 2:
        batches = _halves(batches[0], itemsize, plan)  # work for both solvers
    if any(krylov_path(b.items[0].tall_shape, plan.config, plan.settings) for b in batches):
        import_lapack_in_background()
    counter = _Progress(progress, items)
    with TensorReader(plan.layout) as reader, ThreadPoolExecutor(1, "pss-loader") as pool:
        _start_loader(pool, threads)
        loader = _Loader(reader, plan)
        if concurrent:
            _compute_concurrently(
                plan, batches, loader, pool, budget, threads, itemsize, outcome, counter
            )
        else:
            _compute_in_turn(plan, batches, loader, pool, outcome, counter)
        outcome.read_seconds = loader.seconds
    return outcome


# Batches solved at once on a CPU (`_compute_concurrently`).
SOLVERS = 2


class _Progress:
    """The progress callback's counts, advanced as batches finish."""

    def __init__(self, progress: ProgressCallback | None, items: Sequence[MatrixItem]) -> None:
        self.progress = progress
        self.total = len(items)
        self.bytes_total = sum(item.nbytes for item in items)
        self.done = 0
        self.bytes_done = 0
        if progress is not None:
            progress(0, self.total, "", 0, self.bytes_total)

    def advance(self, batch: Batch) -> None:
        self.done += len(batch.items)
        self.bytes_done += sum(item.nbytes for item in batch.items)
        if self.progress is not None:
            name = batch.items[-1].target.entry.name
            self.progress(self.done, self.total, name, self.bytes_done, self.bytes_total)


def _address_space_limited() -> bool:
    """Whether the process runs under an address-space limit (`ulimit -v`, RLIMIT_AS).

    Every thread reserves its stack and its BLAS buffers against it: two solvers took 350-420
    MiB more address space than one, and under `ulimit -v` 1.1-1.2 GB they hung in scipy's
    OpenBLAS where one solver finished (QA, AMD EPYC Zen 4). Under such a limit the scan solves
    one batch at a time, on all threads.
    """
    try:
        import resource
    except ImportError:  # Windows has no resource module
        return False
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        return False
    return soft != resource.RLIM_INFINITY


def _halves(batch: Batch, itemsize: int, plan: ScanPlan) -> list[Batch]:
    """A batch cut in two; each half's peak is below the whole batch's, which fits half the
    budget, so both fit beside each other."""
    middle = (len(batch.items) + 1) // 2
    halves: list[Batch] = []
    for part in (batch.items[:middle], batch.items[middle:]):
        shape = part[0].tall_shape
        buffer = len(part) * shape[0] * shape[1] * itemsize
        peak = batch_peak_bytes(
            len(part), shape, itemsize, plan.settings, plan.config.top_k, plan.config.exact
        )
        halves.append(Batch(part, buffer, peak, prefetch=bool(halves)))
    return halves


def _compute_in_turn(
    plan: ScanPlan,
    batches: list[Batch],
    loader: _Loader,
    pool: ThreadPoolExecutor,
    outcome: ComputeOutcome,
    counter: _Progress,
) -> None:
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
        counter.advance(batch)


def _compute_concurrently(
    plan: ScanPlan,
    batches: list[Batch],
    loader: _Loader,
    pool: ThreadPoolExecutor,
    budget: int,
    threads: int,
    itemsize: int,
    outcome: ComputeOutcome,
    counter: _Progress,
) -> None:
    """Solve SOLVERS batches at once, each on threads // SOLVERS of torch's CPU threads.

    Why: a scan's solver is not all GEMM. Its QRs, Ritz values and bookkeeping run on one thread
    (pss_cli/core/lapack.py: one LAPACK thread keeps results reproducible) while the other cores
    idle, and a skinny (m x n) @ (n x 32) product gains little from a second thread. Measured on
    an AMD EPYC Zen 4 (2 threads, docs/BENCHMARKS.md): one bf16 forward + adjoint product pair of
    an 11008 x 4096 matrix took 34.4 ms on two threads, 50.7 ms on one, and two such pairs on one
    thread each, at once, 54.8 ms; the Llama block's seven matrices took 2.40 s one after another
    on two threads and 1.89 s two at a time on one thread each.

    Memory: a batch is loaded only once its peak (`batch_peak_bytes`, with the buffer's own
    dtype) fits in the budget beside the peaks of the batches in flight, or when nothing is in
    flight (a single matrix larger than the budget runs alone), so memory never holds more than
    the budget or that one batch's peak. At most SOLVERS batches are solved and one more loaded.
    The batch of fewest bytes is loaded first, then the rest largest first (`_quick_start`).

    Reproducibility: on a CPU with two or more threads every matrix is solved on the same thread
    count (threads // SOLVERS), however many batches the scan has, so the results do not depend
    on the batching (a budget, an --include, a distributed rank's share), on which solver took
    a matrix, or on what ran beside it. A lone batch of several matrices is cut in two so that
    both solvers have work; a lone matrix runs on half of the threads.

    torch keeps one thread count per OS thread, and `torch.set_num_threads` also sets the count
    that threads starting afterwards take: each solver thread sets its own once, when the pool
    starts, and the caller's count is then set again, so a thread that the host program starts
    during the scan gets the caller's count, not a solver's.
    """
    each = max(1, threads // SOLVERS)
    in_flight: dict[
        Future[tuple[list[LayerResult], float, float]], tuple[Batch, int, Future[_Loaded]]
    ] = {}
    reserved = 0
    intervals: list[tuple[float, float]] = []

    def harvest() -> None:
        # Wait for one solve (or more) to finish; collect its results and free its reservation.
        nonlocal reserved
        finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in finished:
            batch, peak, _ = in_flight.pop(future)
            results, start, end = future.result()
            reserved -= peak
            intervals.append((start, end))
            for result in results:
                outcome.results[(result.name, result.index)] = result
            counter.advance(batch)

    with ThreadPoolExecutor(SOLVERS, "pss-solver") as solvers:
        try:
            _start_solvers(solvers, each)
            torch.set_num_threads(threads)  # the count new threads take: the caller's again
            for batch in _quick_start(batches):
                peak = batch_peak_bytes(
                    len(batch.items),
                    batch.items[0].tall_shape,
                    itemsize,
                    plan.settings,
                    plan.config.top_k,
                    plan.config.exact,
                    loader.buffer_dtype(batch).itemsize,
                )
                while in_flight and (len(in_flight) > SOLVERS or reserved + peak > budget):
                    harvest()
                reserved += peak
                loading = pool.submit(loader.load, batch)
                solving = solvers.submit(_solve_when_loaded, loading, plan)
                in_flight[solving] = (batch, peak, loading)
            while in_flight:
                harvest()
        except BaseException:
            # An error (or Ctrl-C) stops the scan: batches not started are dropped, the running
            # ones finish before the error propagates (a thread cannot be stopped).
            for future, (_, _, loading) in in_flight.items():
                future.cancel()
                loading.cancel()
            raise
        finally:
            # The threads this scan's solvers set stay theirs; the caller's count is restored
            # (torch.set_num_threads also sets the count new threads start with).
            torch.set_num_threads(threads)
    outcome.compute_seconds = _covered_seconds(intervals)


def _quick_start(batches: list[Batch]) -> list[Batch]:
    """The batches with the one of fewest bytes moved to the front, the rest in their order
    (largest first, `plan_batches`, so that the small ones even out the end).

    Why: at the start the solvers wait for the one loader thread, which read the largest batches
    first: on the Llama block the first solver waited 0.24 s (the wide down_proj, transposed on
    its way in) and the second 0.38 s. A small first batch starts a solver after 0.03 s, and the
    loader reads the large ones beside it. Llama-block scan 1.59-1.60 -> 1.50-1.53 s,
    GPT-2-small-shaped 1.73-1.74 -> 1.63 s (Intel Xeon with AMX, 2 threads, medians of 5, two
    runs each).
    """
    if not batches:
        return batches
    first = min(range(len(batches)), key=lambda i: batches[i].buffer_bytes)
    return [batches[first], *batches[:first], *batches[first + 1 :]]


def _start_loader(pool: ThreadPoolExecutor, threads: int) -> None:
    """Start the loader's thread with its own torch thread count set to one, then set the
    caller's `threads` again as the count new threads take (`_compute_concurrently` says why).

    Why one: the loader's work (norms, conversions, the power-of-two scaling) overlaps the
    solvers', which already have every thread. With the caller's count its kernels ran on two
    OpenMP threads whose spinning took cores from the solvers: the Llama-block scan used 3.5-4.1
    s of CPU in 1.85-2.12 s, and 2.9-3.3 s of CPU in 1.60-1.82 s with a one-thread loader
    (Intel Xeon with AMX, 2 threads, 5 scans each, two runs of each). Its results do not
    depend on its thread count: copies and divisions by powers of two are exact, and the norm
    is summed in a fixed order (core/norms.py).
    """
    try:
        pool.submit(set_own_threads, 1).result()
    finally:
        torch.set_num_threads(threads)


def _start_solvers(solvers: ThreadPoolExecutor, threads: int) -> None:
    """Start every solver thread and set its own torch thread count
    (`pss_cli.core.lapack.set_own_threads`). The barrier holds each start task until all have
    begun, so that each lands on a thread of its own."""
    barrier = threading.Barrier(SOLVERS)

    def start() -> None:
        set_own_threads(threads)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()

    started = []
    try:
        for _ in range(SOLVERS):
            started.append(solvers.submit(start))
    except BaseException:
        # A thread that could not start (a process or thread limit): release those waiting
        # for it, or they, and the pool's shutdown with them, wait forever.
        barrier.abort()
        raise
    for future in started:
        future.result()


def _solve_when_loaded(
    loading: Future[_Loaded], plan: ScanPlan
) -> tuple[list[LayerResult], float, float]:
    loaded = loading.result()
    start = time.perf_counter()
    results = _solve(loaded, plan)
    return results, start, time.perf_counter()


def _covered_seconds(intervals: list[tuple[float, float]]) -> float:
    """Wall seconds during which at least one of the intervals ran."""
    covered = 0.0
    reach = -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def _solve(loaded: _Loaded, plan: ScanPlan) -> list[LayerResult]:
    chunk = loaded.batch.items
    config = plan.config
    settings = plan.settings
    buffer = loaded.buffer
    frobenius = loaded.frobenius
    nonfinite = loaded.nonfinite
    tall_m, tall_n = chunk[0].tall_shape
    finite = [
        slot
        for slot in range(len(chunk))
        if nonfinite[slot] == 0 and 0 < frobenius[slot] < math.inf
    ]
    masks = {slot for slot in finite if _is_mask(buffer[slot], frobenius[slot])}
    usable = [slot for slot in finite if slot not in masks]
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
                full[slot] = scale_back(spectra[row], loaded.exponents[slot])
                top[slot] = full[slot][:k]
                solver[slot] = "exact"
        else:
            start = None
            if not uses_exact_path(tall_m, tall_n, k, settings):
                start = gaussian_start([chunk[s].seed for s in usable], tall_n, settings.block_size)
            result = top_singular_values(matrices, k, start, settings)
            for row, slot in enumerate(usable):
                top[slot] = scale_back(result.values[row], loaded.exponents[slot])
                iterations[slot] = result.iterations[row]
                if result.iterations[row] == 0:
                    solver[slot] = "exact"
                else:
                    solver[slot] = "exact-fallback" if result.exact[row] else "krylov"

    results = []
    for slot, item in enumerate(chunk):
        if slot in masks:
            solver[slot] = SOLVER_MASK  # assemble_report lists it as skipped, with the reason
            metrics = SpectralMetrics(None, None, None, None, None)
        elif nonfinite[slot] or frobenius[slot] == math.inf:
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


def _is_mask(matrix: torch.Tensor, frobenius: float) -> bool:
    """Whether a matrix's values are all 0 or 1 (at least one 1): a mask buffer, such as a
    causal tril(ones) kept in a state dict, which a checkpoint cannot tell from a weight.

    Such a matrix is never a trained weight, and analysing it did harm: a causal mask has a
    stable rank of ~1.2, so it was flagged, failed `pss check`, and `pss smooth` rewrote its
    zeros, switching causal masking off. `matrix` is the buffer, divided by a power of two
    (exactly) since loading; `frobenius` its true norm. A cheap test first: a 0/1 matrix's
    squared norm is its count of ones, an integer, which a trained weight's almost never is.
    """
    squared = frobenius * frobenius  # inf for float64 norms beyond 1e154: not a mask
    if not 0.5 <= squared <= matrix.numel() + 0.5:
        return False
    count = round(squared)
    if abs(squared - count) > 1e-9 * squared:
        return False
    top = matrix.amax()
    # Every nonzero value equal, and as many of them as the squared norm: each is exactly 1.
    return (
        bool(((matrix == 0) | (matrix == top)).all()) and int(torch.count_nonzero(matrix)) == count
    )


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
        file=relative_file(layout, target.entry.file),
        shape=target.entry.shape,
        matrix_shape=target.matrix_shape,
        dtype=target.entry.dtype,
        role=str(target.role),
        block=target.block,
        view=str(target.view),
        # The quantization scale, or the weight-norm magnitude g, the matrix was computed with.
        scale_tensor=next(
            (part.name for part in (target.scale, target.norm_magnitude) if part is not None),
            None,
        ),
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
