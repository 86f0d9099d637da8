"""Orchestration of a scan.

layout -> selection -> shape groups -> device batches -> core -> results.

Memory: nothing larger than one device batch is ever held. Each matrix is streamed from its file
(positional reads, no memory map) through a small staging buffer into the batch's compute buffer,
converted to the compute dtype on the way (on the GPU for a CUDA scan), and batches are sized by
`plan_batches` so that the batch being solved, its solver workspace and the next batch (loaded by
a background thread while this one computes) stay within the budget. On a CPU with two or more
threads two batches are solved at once (`solve.py`), each admitted only when its peak fits
beside those in flight.

The three phases `plan_scan`, `compute_items` and `assemble_report` are separate so that a
distributed scan (pss_cli.distributed) can give each process a share of the items and rebuild the
same report on rank 0. No printing and no CLI here: progress goes through a callback.

Modules: `plan` (headers, selection, items, device, precision), `memory` (batches within the
budget), `loader` (file -> compute buffer), `solve` (core solvers -> per-matrix results),
`assemble` (the report). The norms are in `pss_cli.core.norms`.
"""

from pss_cli.core.norms import NORM_CHUNK_ENTRIES, frobenius_norm, unit_scale
from pss_cli.pipeline.assemble import assemble_report, scan_checkpoint
from pss_cli.pipeline.loader import _Loaded, _Loader
from pss_cli.pipeline.memory import Batch, batch_budget_bytes, batch_peak_bytes, plan_batches
from pss_cli.pipeline.plan import (
    FLAG_LOW_STABLE_RANK,
    FLAG_NONFINITE,
    FLAG_ZERO,
    ComputeOutcome,
    MatrixItem,
    ProgressCallback,
    ScanPlan,
    matrix_seed,
    plan_scan,
    precision_timings,
    resolve_device,
    with_precision,
)
from pss_cli.pipeline.solve import compute_items

__all__ = [
    "FLAG_LOW_STABLE_RANK",
    "FLAG_NONFINITE",
    "FLAG_ZERO",
    "NORM_CHUNK_ENTRIES",
    "Batch",
    "ComputeOutcome",
    "MatrixItem",
    "ProgressCallback",
    "ScanPlan",
    "_Loaded",
    "_Loader",
    "assemble_report",
    "batch_budget_bytes",
    "batch_peak_bytes",
    "compute_items",
    "frobenius_norm",
    "matrix_seed",
    "plan_batches",
    "plan_scan",
    "precision_timings",
    "resolve_device",
    "scan_checkpoint",
    "unit_scale",
    "with_precision",
]
