"""The pilot LR sweeps (one seed, LRs a factor 2 apart) that decide whether this model is in the
paper's regime; each stressor is one named change to the base settings."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import run_grid
from model import ModelConfig
from train import RunConfig

PILOT_LRS = tuple(1e-3 * 2**i for i in range(9))  # 1e-3 .. 0.256
STRESSORS: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "base": ({}, {}),
    "beta2-0.999": ({"beta2": 0.999}, {}),
    "warmup-5": ({"warmup_steps": 5}, {}),
    "batch-4": ({"batch_size": 4}, {}),
    "post-ln": ({}, {"post_ln": True}),
    "post-ln-warmup-5": ({"warmup_steps": 5}, {"post_ln": True}),
    "bf16": ({"bf16": True}, {}),
}


def pilot_jobs(
    name: str, base: RunConfig, mbase: ModelConfig, lrs: tuple[float, ...] = PILOT_LRS
) -> list[tuple[RunConfig, ModelConfig]]:
    run_kw, model_kw = STRESSORS[name]
    cfg = replace(base, **run_kw)  # type: ignore[arg-type]
    mcfg = replace(mbase, **model_kw)  # type: ignore[arg-type]
    return [(replace(cfg, lr=lr), mcfg) for lr in lrs]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("stressor", choices=sorted(STRESSORS))
    parser.add_argument("--out", type=Path, default=Path("runs/paper_regime/pilot"))
    parser.add_argument("--steps", type=int, default=500)
    # The stressor pilots stop at 0.064 (7 LRs) to fit the shared machine: a divergence LR above
    # 0.064 is > 16x any best LR seen (1e-3..4e-3), outside the regime whatever happens there.
    parser.add_argument("--n-lrs", type=int, default=None)
    args = parser.parse_args()
    n_lrs = args.n_lrs if args.n_lrs is not None else (9 if args.stressor == "base" else 7)
    jobs = pilot_jobs(
        args.stressor, RunConfig(max_steps=args.steps), ModelConfig(), PILOT_LRS[:n_lrs]
    )
    results = run_grid(jobs, args.out)
    for r in results:
        ev = r["evals"]
        best = min((v for _, v in ev if v is not None), default=float("nan"))
        print(
            f"{args.stressor} lr {r['config']['lr']:.4g}: final {ev[-1][1]} best {best:.3f} "
            f"max gnorm {max((g for g in r['grad_norm'] if g is not None), default=0):.1f} "
            f"{r['seconds']:.1f}s"
        )
