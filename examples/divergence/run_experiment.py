"""The evidence experiment: diverge a real run, see whether pss warns, repair it, resume it.

    python examples/divergence/run_experiment.py --out runs/divergence --img-dir docs/img

1. trains the base run (one run, seed 0) at a learning rate that makes it explode, saving a
   Hugging Face-like checkpoint every `save_every` steps;
2. times the explosion (loss jump) and the grad-norm spike from the per-step log, and asks
   `pss trend` for its first warning (falls back to per-checkpoint `pss scan` reports, with the
   rule stated in the output, when this pss has no `trend` command);
3. from the last checkpoint before the explosion ("pre") and the first one after it ("post"),
   resumes every arm (unchanged, `pss smooth` with each method and optimizer policy, LR lowered,
   gradient clipping) with each seed (the data order after the resume);
4. writes `results.json`, `table.md` and the plots (`experiment-base.png`,
   `experiment-resumes.png`) into OUT (the plots into --img-dir when given).

Everything is deterministic for a given torch build and thread count; see docs/EXPERIMENTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from experiment import (
    ExperimentConfig,
    ResumeJob,
    checkpoints_of,
    explosion_step,
    grad_spike_step,
    pss_trend,
    resume_config,
    resume_metrics,
    run_base,
    run_resume,
    scan_checkpoints,
    smooth_checkpoint,
    smoothed,
    summarize,
    table_markdown,
    trend_first_warning,
    trend_summary,
)
from model import ModelConfig
from train import TrainConfig

_SMOOTH_KEYS = (
    "name",
    "stable_rank_before",
    "stable_rank_after",
    "sigma_max_before",
    "sigma_max_after",
    "relative_change",
)


def full_config() -> ExperimentConfig:
    """The configuration behind docs/EXPERIMENTS.md (chosen by the sweep reported there)."""
    base = TrainConfig(
        lr=0.25,
        warmup_steps=100,
        max_steps=400,
        batch_size=16,
        save_every=20,
        eval_every=25,
        log_every=5,
        threads=1,  # as the resumes: seed 0 of "unchanged" from "pre" replays the base run
    )
    return ExperimentConfig(
        model=ModelConfig(), base=base, resume_steps=150, post_offset=20, control_lr=3e-3
    )


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def warning_from_scans(
    scans: dict[int, dict[str, Any]], warmup: int
) -> tuple[int | None, str, dict[int, dict[str, float]]]:
    """Fallback when `pss trend` is unavailable: the `pss check --baseline` rules PSS007/PSS008
    applied to the scans: warn at the first checkpoint where a smoothable matrix's stable rank
    fell below half, or its sigma_max grew above twice, its value at the reference checkpoint
    (the first at or after step `warmup`, when the loss has left its initial plunge). Also
    returns per-checkpoint summaries for the plot."""
    per_step: dict[int, dict[str, float]] = {}
    for step, report in scans.items():
        layers = [
            layer
            for layer in report["layers"]
            if layer["role"] not in ("embedding", "lm_head") and layer["stable_rank"] is not None
        ]
        per_step[step] = {
            "min_stable_rank": min(layer["stable_rank"] for layer in layers),
            "max_sigma_max": max(layer["sigma_max"] for layer in layers),
        }
    after_warmup = [s for s in sorted(scans) if s >= warmup]
    if not after_warmup:
        return None, "no checkpoint after the warm-up", per_step
    ref_step = after_warmup[0]
    reference = {
        layer["name"]: layer
        for layer in scans[ref_step]["layers"]
        if layer["stable_rank"] is not None
    }
    for step in after_warmup[1:]:
        for layer in scans[step]["layers"]:
            ref = reference.get(layer["name"])
            if ref is None or layer["role"] in ("embedding", "lm_head"):
                continue
            if layer["stable_rank"] is None:
                return step, f"{layer['name']}: non-finite", per_step
            if layer["stable_rank"] < 0.5 * ref["stable_rank"]:
                return (
                    step,
                    f"{layer['name']}: stable rank {ref['stable_rank']:.2f} -> "
                    f"{layer['stable_rank']:.2f} (PSS007 rule vs checkpoint-{ref_step})",
                    per_step,
                )
            if layer["sigma_max"] > 2.0 * ref["sigma_max"]:
                return (
                    step,
                    f"{layer['name']}: sigma_max {ref['sigma_max']:.3f} -> "
                    f"{layer['sigma_max']:.3f} (PSS008 rule vs checkpoint-{ref_step})",
                    per_step,
                )
    return None, "no warning", per_step


def pick_starts(
    run_dir: Path, exploded_at: int, post_offset: int
) -> tuple[tuple[int, Path], tuple[int, Path] | None]:
    ckpts = checkpoints_of(run_dir)
    pre = [c for c in ckpts if c[0] < exploded_at]
    post = [c for c in ckpts if c[0] >= exploded_at + post_offset]
    if not pre:
        raise SystemExit(f"no checkpoint before the explosion at step {exploded_at}")
    return pre[-1], (post[0] if post else None)


def analyse(run_dir: Path, analysis: Path, warmup: int) -> dict[str, Any]:
    """pss's view of a run: `pss scan` of every checkpoint, and the first warning from
    `pss trend` (or from the scans, by the stated rule, when this pss has no trend)."""
    analysis.mkdir(parents=True, exist_ok=True)
    scans = scan_checkpoints(run_dir, analysis)
    fallback_step, fallback_reason, spectra = warning_from_scans(scans, warmup)
    trend = pss_trend(run_dir, analysis)
    summary: dict[str, Any] | None = None
    if trend is not None:
        step, reason = trend_first_warning(trend)
        source = "pss trend"
        summary = trend_summary(trend)
    else:
        step, reason = fallback_step, fallback_reason
        source = "pss scan per checkpoint + PSS007/PSS008 rule (pss trend unavailable)"
    _log(f"{run_dir.name}: first warning ({source}): step {step}: {reason}")
    return {
        "first_warning": {"step": step, "reason": reason, "source": source},
        "fallback_warning": {"step": fallback_step, "reason": fallback_reason},
        "trend": summary,
        "spectra": {str(k): v for k, v in sorted(spectra.items())},
    }


def run(out: Path, exp: ExperimentConfig, img_dir: Path | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(exp.to_json(), indent=2))
    base_dir = out / "base"
    _log(f"base run: lr {exp.base.lr:g}, {exp.base.max_steps} steps -> {base_dir}")
    base = run_base(base_dir, exp)
    det = exp.detection
    exploded = explosion_step(base.steps, base.losses, det)
    spike = grad_spike_step(base.steps, base.grad_norms, det)
    _log(f"base run: {base.seconds:.0f} s; loss explosion at {exploded}, grad spike at {spike}")

    warning = analyse(base_dir, out / "analysis", det.ignore_first)
    control: dict[str, Any] | None = None
    if exp.control_lr is not None:
        control_exp = replace(exp, base=replace(exp.base, lr=exp.control_lr))
        _log(f"control run: lr {exp.control_lr:g} -> {out / 'control'}")
        control_run = run_base(out / "control", control_exp)
        control_warning = analyse(out / "control", out / "analysis-control", det.ignore_first)
        control = {
            "lr": exp.control_lr,
            "steps": control_run.steps,
            "losses": control_run.losses,
            "grad_norms": control_run.grad_norms,
            "evals": control_run.evals,
            "exploded_at": explosion_step(control_run.steps, control_run.losses, det),
            **control_warning,
        }

    rows: list[dict[str, Any]] = []
    starts: dict[str, Any] = {}
    split_at = exploded if exploded is not None else exp.assume_explosion_at
    if split_at is None:
        _log("the base run did not explode: no resumes (raise the LR or the step budget)")
    else:
        if exploded is None:
            _log(f"no explosion; resuming around the assumed step {split_at} (pipeline check)")
        pre, post = pick_starts(base_dir, split_at, exp.post_offset)
        candidates = {"pre": pre, "post": post}
        window = exp.detection.window
        smooth_losses = smoothed(base.losses, window)
        jobs: list[ResumeJob] = []
        for start, picked in candidates.items():
            if picked is None:
                _log(f"no checkpoint after the explosion: no '{start}' resumes")
                continue
            step, folder = picked
            # The pre-explosion loss: the base run's smoothed train loss at the pre checkpoint.
            starts[start] = {"step": step, "checkpoint": str(folder)}
            smoothed_cache: dict[str, Path | None] = {}
            for arm in exp.arms:
                if arm.pre_only and start != "pre":
                    continue
                source = folder
                if arm.smooth_method is not None:
                    key = f"{arm.smooth_method}-{arm.optimizer_state}"
                    dst = out / "smoothed" / start / key / folder.name
                    if key not in smoothed_cache:  # arms differing only after the resume share it
                        try:
                            report = smooth_checkpoint(folder, dst, arm)
                        except RuntimeError as exc:  # reported, not fatal: the other arms run
                            _log(f"{start} {arm.name}: pss smooth failed: {exc}")
                            starts[start].setdefault("smooth_errors", {})[key] = str(exc)
                            smoothed_cache[key] = None
                        else:
                            smoothed_cache[key] = dst
                            starts[start].setdefault("smoothed", {})[key] = {
                                "layers": [
                                    {k: layer[k] for k in _SMOOTH_KEYS}
                                    for layer in report["layers"]
                                ],
                                "optimizer": report.get("optimizer"),
                            }
                    smoothed_dir = smoothed_cache[key]
                    if smoothed_dir is None:
                        continue
                    source = smoothed_dir
                for seed in exp.seeds:
                    cfg = resume_config(exp, arm, seed, step)
                    run_dir = (
                        out
                        / "resumes"
                        / start
                        / arm.name.replace("/", "-").replace(" ", "_")
                        / f"seed-{seed}"
                    )
                    jobs.append(ResumeJob(start, arm, seed, source, run_dir, exp.model, cfg))
        pre_step = pre[0]
        reference = smooth_losses[base.steps.index(pre_step)]
        starts["reference_loss"] = reference
        _log(f"{len(jobs)} resumes of {exp.resume_steps} steps, {exp.workers} at a time")
        with ProcessPoolExecutor(exp.workers) as pool:
            results_iter = pool.map(run_resume, jobs) if exp.workers > 1 else map(run_resume, jobs)
            for job, result in zip(jobs, results_iter, strict=True):
                start_step = starts[job.start]["step"]
                result.update(
                    resume_metrics(
                        result, exp.detection, reference, start_step, job.start == "post"
                    )
                )
                rows.append(result)
                _log(
                    f"{job.start} {job.arm.name} seed {job.seed}: exploded_at "
                    f"{result['exploded_at']}, final eval {result['final_eval_loss']:.3f}, "
                    f"recovered in {result['recovered_in']} ({result['seconds']:.0f} s)"
                )

    table = summarize(rows, exp.arms)
    results = {
        "config": exp.to_json(),
        "base": {
            "steps": base.steps,
            "losses": base.losses,
            "grad_norms": base.grad_norms,
            "evals": base.evals,
            "seconds": base.seconds,
            "exploded_at": exploded,
            "grad_spike_at": spike,
            **warning,
        },
        "control": control,
        "starts": starts,
        "runs": rows,
        "table": table,
        "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (out / "table.md").write_text(table_markdown(table, exp.resume_steps))
    draw(results, img_dir if img_dir is not None else out)
    _log(f"done in {results['seconds']:.0f} s: {out / 'results.json'}, {out / 'table.md'}")
    return results


def draw(results: dict[str, Any], img: Path) -> None:
    from plots import plot_base, plot_resumes

    img.mkdir(parents=True, exist_ok=True)
    plot_base(results, img / "experiment-base.png")
    if results["runs"]:
        plot_resumes(results, img / "experiment-resumes.png")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/divergence"))
    parser.add_argument("--img-dir", type=Path, help="write the plots here (default: OUT)")
    parser.add_argument("--workers", type=int, default=2, help="resumes run in parallel")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the plots from OUT/results.json"
    )
    args = parser.parse_args()
    if args.replot:
        draw(json.loads((args.out / "results.json").read_text()), args.img_dir or args.out)
        return
    exp = replace(full_config(), workers=args.workers)
    results = run(args.out, exp, args.img_dir)
    print((args.out / "table.md").read_text())
    if not math.isfinite(results["seconds"]):
        raise SystemExit(3)


if __name__ == "__main__":
    main()
