"""Learning-rate sweep: which LR makes the tiny GPT explode within the budget?

    python examples/divergence/sweep.py --out runs/sweep --lrs 1e-3 3e-3 1e-2 0.25 --steps 400

prints a Markdown table (one row per LR: best and final smoothed train loss, final validation
loss, loss explosion and grad-norm spike steps by the experiment's detectors, peak grad norm) and
writes `sweep.json`. The other training settings are those of the experiment's base run (warm-up
100 steps, then constant); `--set KEY=VALUE` changes them. docs/EXPERIMENTS.md reports the sweep
that chose the experiment's LR.
"""

from __future__ import annotations

import argparse
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from experiment import Detection, explosion_step, grad_spike_step, smoothed
from model import ModelConfig
from train import TrainConfig, train


def _one(out: Path, lr: float, steps: int, overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = replace(TrainConfig(), lr=lr, max_steps=steps, save_every=0, eval_every=25, threads=1)
    cfg = replace(cfg, **overrides)
    result = train(out / f"lr-{lr:g}", ModelConfig(), cfg)
    det = Detection()
    curve = [x for x in smoothed(result.losses, det.window) if math.isfinite(x)]
    return {
        "lr": lr,
        "steps": result.last_step,
        "best_smoothed_loss": min(curve) if curve else None,
        "final_smoothed_loss": curve[-1] if curve else None,
        "final_eval_loss": result.evals[-1][1] if result.evals else None,
        "exploded_at": explosion_step(result.steps, result.losses, det),
        "grad_spike_at": grad_spike_step(result.steps, result.grad_norms, det),
        "max_grad_norm": max(g for g in result.grad_norms if math.isfinite(g)),
        "evals": result.evals,
        "overrides": overrides,
        "seconds": result.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="other TrainConfig fields, e.g. warmup_steps=200 beta2=0.95",
    )
    args = parser.parse_args()
    types = {k: type(v) for k, v in asdict(TrainConfig()).items()}
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = types[key](value)
    n = len(args.lrs)
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(_one, [args.out] * n, args.lrs, [args.steps] * n, [overrides] * n))
    print(
        "| lr | best loss | final loss | final val loss | loss explosion | grad spike "
        "| max grad norm |\n|---|---|---|---|---|---|---|"
    )
    for row in rows:
        print(
            f"| {row['lr']:g} | {row['best_smoothed_loss']:.2f} | {row['final_smoothed_loss']:.2f} "
            f"| {row['final_eval_loss']:.2f} | {row['exploded_at'] or '-'} "
            f"| {row['grad_spike_at'] or '-'} | {row['max_grad_norm']:.1f} |"
        )
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
