"""Everything of docs/EXPERIMENTS.md v2 in one command: the pilots, the arms, the one-shot repairs,
the verdicts (results.json, table.md) and the plots.

    python examples/paper_regime/run_all.py --out runs/paper_regime --img-dir docs/img

Each run is cached as JSON under --out, so a second call redraws from the cache and an interrupted
one resumes. `--smoke` runs a tiny slice (the CI test) that checks the pipeline, not the outcome.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import analysis
from grid import run_grid
from model import ModelConfig
from pilot import PILOT_LRS, STRESSORS, pilot_jobs
from train import RunConfig, run

STRESSOR_ORDER = ("base", "post-ln", "beta2-0.999", "warmup-5", "batch-4")
REGIME_BEST = 2.2
REGIME_RATIO = 16.0
REGIME_LEARNT = 2.5
ARM_ORDER = ("baseline", "pss", "skip", "clip", "qknorm", "zloss")
# The guard's other smoothing methods, "at fewer LRs only if time is left" (the rules): arm
# "pss-<method>" is arm "pss" with that method; --method-grid picks their LRs.
METHOD_ARMS = ("pss-cap", "pss-softmax", "pss-clip")
SEEDS = (0, 1, 2)
REPAIR_ARMS = ("unchanged", "smooth", "smooth+lr/2", "lr/2", "skip50", "clip")
SAVE_EVERY = 25


def guard_available() -> bool:
    try:
        import pss_cli.guard  # noqa: F401
    except ImportError:
        return False
    return True


def regime(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The pilot's verdict: best LR and loss, smallest diverging LR D, D / best LR, in regime?"""
    rows = sorted((analysis.summarise(r) for r in results), key=lambda r: r["lr"])
    best = min(rows, key=lambda r: r["final_val"])
    div = [r for r in rows if r["diverged"]]
    d = div[0] if div else None
    ratio = d["lr"] / best["lr"] if d else math.inf
    ok = (
        best["final_val"] <= REGIME_BEST
        and d is not None
        and ratio <= REGIME_RATIO
        and d["best_val"] < REGIME_LEARNT
    )
    return {
        "best_lr": best["lr"],
        "best_val": best["final_val"],
        "divergence_lr": d["lr"] if d else None,
        "ratio": ratio,
        "in_regime": ok,
        "rows": [
            {
                k: r[k]
                for k in (
                    "lr",
                    "final_val",
                    "best_val",
                    "diverged",
                    "exploded_at",
                    "spikes",
                    "max_logit",
                )
            }
            for r in rows
        ],
    }


def run_pilots(
    out: Path,
    base: RunConfig,
    mbase: ModelConfig,
    lrs: tuple[float, ...],
    workers: int,
    order: tuple[str, ...] = STRESSOR_ORDER,
) -> tuple[str, dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    verdicts: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for name in order:
        n = len(lrs) if name == "base" else min(len(lrs), 7)
        results = run_grid(pilot_jobs(name, base, mbase, lrs[:n]), out / "pilot", workers)
        verdicts[name], curves[name] = regime(results), results
        print(
            f"pilot {name}: {verdicts[name]['ratio']=} {verdicts[name]['in_regime']=}",
            file=sys.stderr,
        )
        if verdicts[name]["in_regime"]:
            return name, verdicts, curves
    chosen = min(verdicts, key=lambda k: (verdicts[k]["ratio"], k != "base"))
    return chosen, verdicts, curves


def arm_jobs(
    setting: str,
    base: RunConfig,
    mbase: ModelConfig,
    grid: list[float],
    arms: tuple[str, ...],
    seeds: tuple[int, ...] = SEEDS,
) -> list[tuple[RunConfig, ModelConfig]]:
    run_kw, model_kw = STRESSORS[setting]
    cfg = replace(base, **run_kw)  # type: ignore[arg-type]
    mcfg = replace(mbase, **model_kw)  # type: ignore[arg-type]
    # The most informative runs first (the top LR, every arm, seed by seed): on a shared machine
    # an experiment cut short by its deadline still has paired arms where they differ.
    return [
        (_arm(replace(cfg, lr=lr, seed=s), arm), mcfg)
        for lr in sorted(grid, reverse=True)
        for s in seeds
        for arm in arms
    ]


def _arm(cfg: RunConfig, arm: str) -> RunConfig:
    if arm.startswith("pss-"):  # another smoothing method of the online guard
        return replace(cfg, arm="pss", guard_method=arm.removeprefix("pss-"))
    return replace(cfg, arm=arm)


def pss_smooth(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    cmd = [
        sys.executable,
        "-m",
        "pss_cli",
        "smooth",
        str(src),
        "--out",
        str(dst),
        "--method",
        "conv",
        "--optimizer-state",
        "keep",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")


def repair(
    out: Path,
    explosions: list[tuple[RunConfig, ModelConfig, dict[str, Any]]],
    workers: int,
    save_every: int = SAVE_EVERY,
    cached_only: bool = False,
) -> dict[str, Any]:
    """One-shot repairs from each explosion's last checkpoint >= 5 steps before its onset (with
    `cached_only`: the explosions whose six resumes are all on disk)."""
    cases = []
    jobs: list[tuple[RunConfig, ModelConfig]] = []
    for cfg, mcfg, summary in explosions:
        onset = summary["onset"]
        pre = ((onset - 5) // save_every) * save_every
        if pre <= 0:
            continue
        folder = out / "repair" / f"seed{cfg.seed}-lr{cfg.lr:g}"
        ckpt = folder / f"checkpoint-{pre}"
        smoothed = folder / f"checkpoint-{pre}-smooth"
        if cached_only and not smoothed.is_dir():
            continue
        if not ckpt.is_dir():
            run(replace(cfg, save_at=(pre,), out_dir=str(folder), max_steps=pre), mcfg)
        if not smoothed.is_dir():
            pss_smooth(ckpt, smoothed)
        base = replace(cfg, save_at=(), out_dir=None, warmup_steps=cfg.warmup_steps)
        arms = {
            "unchanged": replace(base, resume_from=str(ckpt)),
            "smooth": replace(base, resume_from=str(smoothed)),
            "smooth+lr/2": replace(base, resume_from=str(smoothed), lr=cfg.lr / 2),
            "lr/2": replace(base, resume_from=str(ckpt), lr=cfg.lr / 2),
            "skip50": replace(base, resume_from=str(ckpt), data_offset=50),
            "clip": replace(base, resume_from=str(ckpt), grad_clip=1.0),
        }
        cases.append(
            {
                "seed": cfg.seed,
                "lr": cfg.lr,
                "pre": pre,
                "onset": onset,
                "exploded_at": summary["exploded_at"],
            }
        )
        case_jobs = [(c, mcfg) for c in arms.values()]
        if cached_only and len(run_grid(case_jobs, out / "repair" / "runs", cached_only=True)) < 6:
            continue
        jobs.extend(case_jobs)
    results = run_grid(jobs, out / "repair" / "runs", workers)
    resumes: dict[str, list[dict[str, Any]]] = {a: [] for a in REPAIR_ARMS}
    for i, case in enumerate(cases):
        for j, arm in enumerate(REPAIR_ARMS):
            r = results[i * len(REPAIR_ARMS) + j]
            s = analysis.summarise(r, after=case["pre"])
            resumes[arm].append(
                {
                    "reexploded": s["exploded_at"] is not None or s["nonfinite"],
                    "final_val": s["final_val"],
                    "reexploded_at": s["exploded_at"],
                    "curve": [r["steps"], r["loss"]],
                }
            )
    return {"cases": cases, "resumes": resumes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/paper_regime"))
    parser.add_argument("--img-dir", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--grid", default="0.25,0.5,1,2,4", help="arm LRs as multiples of D")
    parser.add_argument("--arms", default=",".join(ARM_ORDER))
    parser.add_argument(
        "--method-arms",
        default="",
        help=f"other guard methods to run as extra arms (e.g. {','.join(METHOD_ARMS)})",
    )
    parser.add_argument(
        "--method-grid", default="0.5,1", help="the LRs of --method-arms, as multiples of D"
    )
    parser.add_argument(
        "--confirm-seeds",
        default="",
        help="v2.1: new seeds at D for the confirmatory test of --confirm-arm (e.g. 15,...,26)",
    )
    parser.add_argument("--confirm-arm", default="pss-clip")
    parser.add_argument("--confirm-controls", default="baseline,skip")
    parser.add_argument("--confirm-context", default="pss", help="arms run beside, no verdict")
    parser.add_argument(
        "--repair-seeds",
        default="",
        help="extra baseline seeds run at D only to find more explosions for claim (a) "
        "(a supplement, reported apart from the pre-registered verdict)",
    )
    parser.add_argument("--stop-after", choices=("pilot", "arms", "repair"), default=None)
    parser.add_argument("--smoke", action="store_true", help="a tiny slice for CI")
    parser.add_argument(
        "--cached-only", action="store_true", help="report the arm runs already on disk; run none"
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    base, mbase, lrs = RunConfig(max_steps=500), ModelConfig(), PILOT_LRS
    order, seeds = STRESSOR_ORDER, SEEDS
    if args.smoke:
        # A tiny model at an LR that explodes within 60 steps: every stage runs, in seconds.
        base = replace(
            base,
            max_steps=60,
            warmup_steps=5,
            eval_every=20,
            spectra_every=20,
            eval_batches=2,
            batch_size=4,
        )
        mbase = ModelConfig(width=32, n_layer=1, n_head=2, context=16)
        lrs, order, seeds = (3e-3, 3.0), ("base",), (0,)
    setting, pilots, curves = run_pilots(args.out, base, mbase, lrs, args.workers, order)
    results: dict[str, Any] = {"setting": setting, "pilots": pilots}
    d = pilots[setting]["divergence_lr"] or max(lrs)
    grid = [d * float(m) for m in args.grid.split(",")]
    results["grid"] = grid
    if args.stop_after != "pilot":
        arms = tuple(a for a in args.arms.split(",") if a)
        if not guard_available():
            arms = tuple(a for a in arms if a not in ("pss", "skip"))
            results["guard"] = "not available: guard arms not run"
        jobs = arm_jobs(setting, base, mbase, grid, arms, seeds)
        method_arms = tuple(a for a in args.method_arms.split(",") if a)
        if method_arms and guard_available():
            method_grid = [d * float(m) for m in args.method_grid.split(",")]
            jobs += arm_jobs(setting, base, mbase, method_grid, method_arms, seeds)
            arms += method_arms
        runs = run_grid(jobs, args.out / "arms", args.workers, cached_only=args.cached_only)
        rows = [analysis.summarise(r) for r in runs]
        ran = [a for a in arms if any(r["arm"] == a for r in rows)]
        tables = {a: analysis.arm_table([r for r in rows if r["arm"] == a]) for a in ran}
        results["rows"] = rows
        results["tables"] = {a: {str(k): v for k, v in t.items()} for a, t in tables.items()}
        results["msl"] = {a: analysis.max_stable_lr(t) for a, t in tables.items()}
        results["best_loss"] = {a: analysis.best_loss(t) for a, t in tables.items()}
        if all(a in tables for a in ("pss", "skip", "baseline")):
            results["claim_b"] = analysis.verdict_b(tables)
        if args.stop_after != "arms":
            explosions = pick_explosions(rows, runs, setting, base, mbase, seeds)
            if explosions:
                rep = repair(
                    args.out,
                    explosions,
                    args.workers,
                    5 if args.smoke else SAVE_EVERY,
                    cached_only=args.cached_only,
                )
                results["repair"] = rep
                if len(rep["cases"]):
                    results["claim_a"] = analysis.verdict_a(rep["resumes"])
            extra_seeds = tuple(int(x) for x in args.repair_seeds.split(",") if x)
            if extra_seeds:
                # More seeds of the baseline at D, for more independent explosions; the
                # pooled table applies claim (a)'s rule unchanged to every explosion found.
                extra = run_grid(
                    arm_jobs(setting, base, mbase, [d], ("baseline",), extra_seeds),
                    args.out / "arms",
                    args.workers,
                    cached_only=args.cached_only,
                )
                more = pick_explosions(
                    [analysis.summarise(r) for r in extra], extra, setting, base, mbase, extra_seeds
                )
                pooled = repair(
                    args.out,
                    explosions + more,
                    args.workers,
                    5 if args.smoke else SAVE_EVERY,
                    cached_only=args.cached_only,
                )
                results["repair_seeds"] = list(extra_seeds)
                results["repair_pooled"] = pooled
                if len(pooled["cases"]):
                    results["claim_a_pooled"] = analysis.verdict_a(pooled["resumes"])
    confirm_seeds = tuple(int(x) for x in args.confirm_seeds.split(",") if x)
    if confirm_seeds and args.stop_after != "pilot" and guard_available():
        controls = tuple(a for a in args.confirm_controls.split(",") if a)
        context = tuple(a for a in args.confirm_context.split(",") if a)
        confirm_arms = (*controls, args.confirm_arm, *context)
        confirm = run_grid(
            arm_jobs(setting, base, mbase, [d], confirm_arms, confirm_seeds),
            args.out / "arms",
            args.workers,
            cached_only=args.cached_only,
        )
        confirm_rows = [analysis.summarise(r) for r in confirm]
        results["confirm_rows"] = confirm_rows
        results["claim_confirm"] = analysis.verdict_confirm(
            confirm_rows, args.confirm_arm, controls
        )
    results["wall_seconds"] = time.perf_counter() - t0
    (args.out / "results.json").write_text(json.dumps(analysis_json(results), indent=1))
    import report

    (args.out / "table.md").write_text(report.tables(analysis_json(results)))
    if args.img_dir is not None:
        import plots

        plots.draw_all(args.out, results, curves, args.img_dir)
    print(
        json.dumps(
            {
                k: results.get(k)
                for k in (
                    "setting",
                    "grid",
                    "msl",
                    "best_loss",
                    "claim_b",
                    "claim_a",
                    "claim_a_pooled",
                    "claim_confirm",
                    "wall_seconds",
                )
            },
            default=str,
        ),
        file=sys.stderr,
    )


def pick_explosions(
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    setting: str,
    base: RunConfig,
    mbase: ModelConfig,
    seeds: tuple[int, ...] = SEEDS,
) -> list[tuple[RunConfig, ModelConfig, dict[str, Any]]]:
    """The baseline runs at the smallest LR where all 3 seeds explode, else one exploding run per
    seed at the smallest LRs (docs/EXPERIMENTS.md v2, claim (a))."""
    base_rows = [
        (r, raw)
        for r, raw in zip(rows, runs, strict=True)
        if r["arm"] == "baseline" and r["exploded_at"] is not None
    ]
    chosen: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for lr in sorted({r["lr"] for r, _ in base_rows}):
        at = [(r, raw) for r, raw in base_rows if r["lr"] == lr]
        if len({r["seed"] for r, _ in at}) == len(seeds):
            chosen = at
            break
    if not chosen:
        seen: set[int] = set()
        for r, raw in sorted(base_rows, key=lambda x: x[0]["lr"]):
            if r["seed"] not in seen:
                seen.add(r["seed"])
                chosen.append((r, raw))
    run_kw, model_kw = STRESSORS[setting]
    mcfg = replace(mbase, **model_kw)  # type: ignore[arg-type]
    out = []
    for r, _ in chosen:
        cfg = replace(base, **run_kw, arm="baseline", lr=r["lr"], seed=r["seed"])  # type: ignore[arg-type]
        out.append((cfg, mcfg, r))
    return out


def analysis_json(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): analysis_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [analysis_json(v) for v in value]
    return value


if __name__ == "__main__":
    main()
