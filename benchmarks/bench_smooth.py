"""What `pss smooth` costs on a GPT-2-small-shaped checkpoint with collapsed layers.

Prints, from one run (medians of --repeats): the scan alone; smooth's planning (scan + top-k
triplets + update, i.e. `--dry-run`); smooth end to end (plus writing ~500 MB and verifying: the
modified matrices re-measured, every tensor's bytes hashed); and a full-SVD rebuild of the same
matrices (torch.linalg.svd, cap the values, U diag(s') V^T), the naive way to do the same repair.

    python benchmarks/bench_smooth.py [--repeats 3] [--collapsed 6]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scan

from pss_cli.config import ScanConfig
from pss_cli.core.smoothing import cap_values
from pss_cli.pipeline import scan_checkpoint
from pss_cli.repair import SmoothConfig, smooth_checkpoint

# sigma_1 of a collapsed matrix, in units of its bulk edge: 10x puts the stable rank at ~3-4.5
# for the GPT-2 shapes (F^2 = short side; sigma_1^2 = 100 edge^2), below the default flag of 5.
COLLAPSE_FACTOR = 10.0


def collapse(path: Path, count: int) -> list[str]:
    """Add a dominant rank-1 direction to `count` MLP/attention matrices spread over the blocks."""
    tensors = load_file(str(path))
    names = [n for n in tensors if n.startswith("h.") and tensors[n].ndim == 2]
    # Stride 9 over the 4 matrices per block visits every role (c_attn, c_proj, c_fc, mlp c_proj).
    chosen = [names[(i * 9) % len(names)] for i in range(count)]
    generator = torch.Generator().manual_seed(7)
    for name in chosen:
        w = tensors[name]
        rows, cols = w.shape
        u = torch.randn(rows, 1, generator=generator)
        v = torch.randn(cols, 1, generator=generator)
        theta = COLLAPSE_FACTOR * bench_scan.bulk_edge((rows, cols))
        tensors[name] = w + theta * (u / u.norm()) @ (v / v.norm()).T
    save_file(tensors, str(path))
    return chosen


def timed(repeats: int, action) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def full_svd_rebuild(path: Path, names: list[str], targets: dict[str, float]) -> None:
    tensors = load_file(str(path))
    for name in names:
        w = tensors[name]
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        capped = cap_values(s.double(), float(w.norm()), s.numel(), targets[name]).float()
        _ = (u * capped) @ vh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--collapsed", type=int, default=6)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="pss-bench-smooth-") as tmp:
        work = Path(tmp)
        checkpoint = work / "model.safetensors"
        bench_scan.write_checkpoint(bench_scan.gpt2_small(), checkpoint)
        chosen = collapse(checkpoint, args.collapsed)
        scan_s, scan = timed(args.repeats, lambda: scan_checkpoint(checkpoint, ScanConfig()))
        flagged = [x.name for x in scan.layers if x.flags]  # type: ignore[attr-defined]
        plan_s, plan = timed(
            args.repeats, lambda: smooth_checkpoint(checkpoint, None, SmoothConfig(dry_run=True))
        )
        targets = {x.name: x.target_stable_rank for x in plan.layers}  # type: ignore[attr-defined]
        counter = iter(range(1000))
        full_s, report = timed(
            args.repeats,
            lambda: smooth_checkpoint(checkpoint, work / f"out{next(counter)}", SmoothConfig()),
        )
        rebuild_s, _ = timed(args.repeats, lambda: full_svd_rebuild(checkpoint, flagged, targets))
        layers = report.layers  # type: ignore[attr-defined]
        print(
            f"collapsed {len(chosen)} matrices; scan flags {len(flagged)}; smoothed {len(layers)}"
        )
        for layer in layers:
            print(
                f"  {layer.name:28s} {'x'.join(map(str, layer.matrix_shape)):>9s}  "
                f"SR {layer.stable_rank_before:6.2f} -> {layer.stable_rank_after:6.2f} "
                f"(target {layer.target_stable_rank:6.2f}), sigma_max {layer.sigma_max_before:6.3f}"
                f" -> {layer.sigma_max_after:6.3f}, verified {layer.verified}"
            )
        smoothing_only = plan_s - scan_s
        write_verify = full_s - plan_s
        rows = [
            ("pss scan", scan_s),
            ("pss smooth --dry-run (scan + triplets + update)", plan_s),
            ("pss smooth end to end (+ write ~500 MB + verify)", full_s),
            ("  of which smoothing the flagged matrices", smoothing_only),
            ("  of which writing + verifying", write_verify),
            ("full-SVD rebuild of the same matrices (compute only)", rebuild_s),
        ]
        print(f"\n| step | median s (of {args.repeats}) | vs scan |\n|---|---|---|")
        for label, seconds in rows:
            print(f"| {label} | {seconds:.2f} | {seconds / scan_s:.2f}x |")
        if smoothing_only > 0:
            print(
                f"\nsmoothing the flagged matrices: {smoothing_only:.2f} s vs full-SVD rebuild "
                f"{rebuild_s:.2f} s ({rebuild_s / smoothing_only:.1f}x)"
            )
        assert all(layer.verified for layer in layers), "a smoothed matrix failed verification"
        assert math.isfinite(full_s)


if __name__ == "__main__":
    main()
