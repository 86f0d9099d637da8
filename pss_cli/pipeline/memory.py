"""The memory plan: same-shape device batches sized so that the batch being solved, its solver
workspace and the next batch (prefetched) stay within the budget."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pss_cli.config import CUDA_FREE_MEMORY_FRACTION, ScanConfig
from pss_cli.core.mixed_precision import UPCAST_CHUNK_ENTRIES
from pss_cli.core.spectra import KrylovSettings, iteration_budget, uses_exact_path
from pss_cli.pipeline.plan import MatrixItem


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
    buffer_itemsize: int | None = None,
) -> int:
    """Upper estimate of the memory a batch of `count` tall (m, n) matrices needs while solved.

    The buffer itself; up to two partial copies of it (the finite, nonzero matrices are gathered
    when some are not, and the solver drops converged matrices by indexing, which copies the
    rest); and per matrix either the two Krylov bases ((m + n) x (iterations + 1) * block) or, on
    the exact path, LAPACK's copy of the matrix plus its (n, n) workspace.
    itemsize: the compute dtype's; buffer_itemsize: the buffer's, when it differs (a BF16
    checkpoint's Krylov batch loaded as stored, pss_cli/pipeline/loader.py).
    """
    m, n = shape
    stored = itemsize if buffer_itemsize is None else buffer_itemsize
    matrix = m * n * stored
    copies = 2 * (count - 1) * matrix
    if exact or uses_exact_path(m, n, min(top_k, n), settings):
        workspace = m * n * itemsize + n * n * itemsize
    else:
        columns = (iteration_budget(n, settings) + 1) * settings.block_size
        # Both bases: the bf16 path keeps no left basis, but a matrix it cannot vouch for is
        # solved again with compute-dtype products, which keep both.
        workspace = (m + n) * columns * itemsize
        if stored != itemsize:
            # A bf16 buffer is its own bf16 copy; its compute-dtype products (the Rayleigh-Ritz
            # one, and every product of the retry) convert one slab at a time.
            workspace += min(m, max(1, UPCAST_CHUNK_ENTRIES // n)) * n * itemsize
        elif settings.bf16_products:
            workspace += m * n * 2  # A in bf16 (core/mixed_precision.py: Products)
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
