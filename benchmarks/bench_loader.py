"""Isolate the cost of a scan's loading step (the streaming regression of docs/BENCHMARKS.md).

    python benchmarks/bench_loader.py [--repeats N]

Writes the llama-block workload of bench_scan.py to a temporary folder, then times, per pass over
its 7 BF16 matrices (best and median of N): the whole loader (positional reads into the staging
buffer, bf16 -> fp32 copy into the compute buffer, the float64 Frobenius norm, the unit scaling),
the same with the previous norm (each chunk converted into a fresh float64 tensor), the norm alone
(new and previous), the reads into the staging buffer alone, and a memory-mapped read + copy_ (the
pre-streaming way). Everything runs on the main thread (no loader thread), so the figures are
the loading work itself, whatever the overlap with solving.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks.bench_scan import llama_block, write_checkpoint
from pss_cli import pipeline
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.config import ProductPrecision, ScanConfig
from pss_cli.pipeline import loader as pipeline_loader


def _old_norm(matrix: torch.Tensor) -> float:
    """The norm before this change: every chunk converted into a fresh float64 tensor."""
    rows_per_chunk = max(1, pipeline.NORM_CHUNK_ENTRIES // max(1, matrix.shape[-1]))
    total = 0.0
    for chunk in torch.split(matrix, rows_per_chunk):
        flat = chunk.reshape(-1).to(torch.float64)
        rows = flat[: flat.numel() - flat.numel() % 1024].view(-1, 1024)
        total += float(rows.mul(rows).sum(dim=1).sum())
    return math.sqrt(total)


def _time(work: Callable[[], object], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pss-loader-") as tmp:
        path = Path(tmp) / "model.safetensors"
        write_checkpoint(llama_block(), path)
        plan = pipeline.plan_scan(path, ScanConfig(precision=ProductPrecision.FP32))
        batches = pipeline.plan_batches(
            plan.items, 4, plan.config.cpu_batch_bytes, plan.settings, plan.config.top_k
        )
        with TensorReader(plan.layout) as reader:
            loader = pipeline._Loader(reader, plan)

            def load_all() -> None:
                for batch in batches:
                    loader.load(batch)

            buffers = {item.tall_shape: torch.empty(item.tall_shape) for item in plan.items}

            def norms(norm: Callable[[torch.Tensor], float]) -> Callable[[], None]:
                def run() -> None:
                    for item in plan.items:
                        norm(buffers[item.tall_shape])

                return run

            def reads_only() -> None:
                for item in plan.items:
                    target = buffers[item.tall_shape]
                    loader._stream_into(item, target)

            def mapped() -> None:
                with safe_open(str(path), framework="pt") as handle:
                    for item in plan.items:
                        source = handle.get_tensor(item.target.entry.name)
                        oriented = source if source.shape[0] >= source.shape[1] else source.mT
                        buffers[item.tall_shape].copy_(oriented)

            rows = [("loader, new norm (read + convert + norm + scale)", load_all)]
            rows.append(
                ("norm alone, new (reused float64 scratch)", norms(pipeline_loader.buffer_norm))
            )
            rows.append(("norm alone, previous (fresh float64 chunks)", norms(_old_norm)))
            rows.append(("staging reads + bf16->fp32 copy, no norm", reads_only))
            rows.append(("mmap get_tensor + copy_ (pre-streaming way), no norm", mapped))
            results = [(label, _time(work, args.repeats)) for label, work in rows]
            original = pipeline_loader.buffer_norm
            pipeline_loader.buffer_norm = _old_norm  # type: ignore[assignment]
            try:
                results.append(("loader, previous norm", _time(load_all, args.repeats)))
            finally:
                pipeline_loader.buffer_norm = original  # type: ignore[assignment]
    print(f"7 matrices of a Llama-7B-shaped block (BF16), {torch.get_num_threads()} threads")
    print("| step | best s | median s |\n|---|---|---|")
    for label, (best, med) in results:
        print(f"| {label} | {best:.3f} | {med:.3f} |")


if __name__ == "__main__":
    main()
