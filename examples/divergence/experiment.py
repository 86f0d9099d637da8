"""The pieces of the divergence experiment: detectors, arms, pss calls, resumes, summaries.

run_experiment.py wires them together; the CI smoke test (tests/test_experiment_smoke.py) runs
them on a tiny config. pss is only ever called through its CLI (`pss trend`, `pss scan`,
`pss smooth`, as a user would), in subprocesses.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from model import ModelConfig
from train import RunResult, TrainConfig, train

PSS = [sys.executable, "-m", "pss_cli"]


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Arm:
    """One way to continue from a checkpoint."""

    name: str
    smooth_method: str | None = None  # pss smooth --method
    optimizer_state: str | None = None  # pss smooth --optimizer-state
    lr_factor: float = 1.0
    grad_clip: float | None = None
    rewarm_steps: int = 0
    # Rolling back = starting from the pre-explosion checkpoint: an arm marked pre_only is not
    # run from the post-explosion one.
    pre_only: bool = False


def default_arms() -> tuple[Arm, ...]:
    arms = [Arm("unchanged")]
    for method in ("cap", "conv", "softmax", "clip"):
        for policy in ("reset", "keep"):
            arms.append(Arm(f"{method}/{policy}", smooth_method=method, optimizer_state=policy))
    arms += [
        # pss's own resume recipe: after zeroing the moments, re-warm the LR.
        Arm("cap/reset+rewarm", smooth_method="cap", optimizer_state="reset", rewarm_steps=50),
        # Rollback and lower the LR (OPT's fix): from the pre-explosion checkpoint only.
        Arm("lr/2", lr_factor=0.5, pre_only=True),
        Arm("lr/10", lr_factor=0.1, pre_only=True),
        Arm("gradclip 1.0", grad_clip=1.0),
    ]
    return tuple(arms)


@dataclass(frozen=True)
class Detection:
    """When a run counts as exploded; see docs/EXPERIMENTS.md "Definitions"."""

    window: int = 20  # trailing mean of the train loss over this many steps
    loss_jump: float = 1.0  # exploded: smoothed loss > best smoothed loss so far + loss_jump (nats)
    grad_spike_factor: float = 10.0  # grad spike: grad norm > factor x trailing median
    grad_spike_history: int = 50  # steps in that trailing median
    # Steps not searched: the initial plunge from ln(256) (also the fallback warning's reference).
    ignore_first: int = 50
    # Recovered: smoothed loss back within this margin of the pre-explosion loss (nats).
    recovery_margin: float = 0.1


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    base: TrainConfig = field(default_factory=TrainConfig)
    resume_steps: int = 200
    resume_eval_every: int = 25
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[Arm, ...] = field(default_factory=default_arms)
    detection: Detection = field(default_factory=Detection)
    # The post-explosion start: the first checkpoint at least this many steps after the explosion.
    post_offset: int = 1
    workers: int = 2
    # Pipeline checks only (the CI smoke test): when the base run does not explode, pick the
    # resume points around this step anyway. None: no explosion, no resumes.
    assume_explosion_at: int | None = None
    # A second base run at a stable LR: does pss warn where nothing goes wrong? (None: skip.)
    control_lr: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Detectors (pure functions of logged numbers)


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` values (fewer at the start); NaN/Inf propagate as inf."""
    out: list[float] = []
    total, count, bad = 0.0, 0, 0
    for i, v in enumerate(values):
        if math.isfinite(v):
            total, count = total + v, count + 1
        else:
            bad += 1
        if i >= window:
            old = values[i - window]
            if math.isfinite(old):
                total, count = total - old, count - 1
            else:
                bad -= 1
        out.append(math.inf if bad or not count else total / count)
    return out


def explosion_step(
    steps: list[int], losses: list[float], det: Detection, reference: float | None = None
) -> int | None:
    """First step whose smoothed loss exceeds the best smoothed loss so far (or `reference`,
    when given: the pre-explosion loss for a resumed run) by det.loss_jump, or is NaN/Inf."""
    best = math.inf if reference is None else reference
    for step, value in zip(steps, smoothed(losses, det.window), strict=True):
        if step > det.ignore_first and (not math.isfinite(value) or value > best + det.loss_jump):
            return step
        if reference is None:
            best = min(best, value)
    return None


def grad_spike_step(steps: list[int], grad_norms: list[float], det: Detection) -> int | None:
    """First step whose grad norm exceeds det.grad_spike_factor x the median of the previous
    det.grad_spike_history steps (or is NaN/Inf)."""
    for i, step in enumerate(steps):
        if step <= det.ignore_first or i < det.grad_spike_history:
            continue
        if not math.isfinite(grad_norms[i]):
            return step
        history = [g for g in grad_norms[i - det.grad_spike_history : i] if math.isfinite(g)]
        if history and grad_norms[i] > det.grad_spike_factor * statistics.median(history):
            return step
    return None


def steps_to_recover(
    steps: list[int], losses: list[float], target: float, ceiling: float, window: int
) -> int | None:
    """Steps from the first one until the smoothed loss is <= target for good: the first step
    at or below `target` after which it never again exceeds `ceiling` (None: never)."""
    values = smoothed(losses, window)
    last_bad = max((i for i, v in enumerate(values) if not v <= ceiling), default=-1)
    for i in range(last_bad + 1, len(values)):
        if values[i] <= target:
            return steps[i] - steps[0] + 1
    return None


# --------------------------------------------------------------------------------------------
# pss through its CLI


def run_pss(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*PSS, *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"pss {' '.join(args)} failed with exit code {proc.returncode}:\n{proc.stderr}"
        )
    return proc


def pss_trend_available() -> bool:
    return run_pss(["trend", "--help"], check=False).returncode == 0


def pss_trend(run_dir: Path, out_dir: Path) -> dict[str, Any] | None:
    """`pss trend RUN --format json` (and its plot), or None when this pss has no trend."""
    if not pss_trend_available():
        return None
    args = ["trend", str(run_dir), "--format", "json", "-q"]
    proc = run_pss([*args, "--plot", str(out_dir / "trend.png")], check=False)
    if proc.returncode not in (0, 1):  # 1: warnings found (a finding, like pss check)
        # Plotting is optional (matplotlib): retry without it before giving up.
        proc = run_pss(args, check=False)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"pss trend {run_dir} failed ({proc.returncode}):\n{proc.stderr}")
    report: dict[str, Any] = json.loads(proc.stdout)
    (out_dir / "trend.json").write_text(json.dumps(report, indent=2))
    return report


def trend_first_warning(report: dict[str, Any]) -> tuple[int | None, str]:
    """The first warning's step in a `pss trend --format json` report (`verdict`), and what
    fired then (warning kinds and layers)."""
    verdict = report.get("verdict") or {}
    step = verdict.get("first_warning_step")
    if not isinstance(step, int):
        return None, "no warning"
    fired = sorted(
        {
            f"{w['kind']} {layer['name']}"
            for layer in report.get("layers", [])
            for w in layer.get("warnings", [])
            if w.get("step") == step
        }
    )
    return step, f"{len(fired)} warning(s): " + "; ".join(fired)


def trend_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The verdict of a `pss trend` report (without its long lists), and the first step at which
    each kind of warning fired (floor: stable rank below the threshold; drop; sigma_growth)."""
    verdict = {
        k: v
        for k, v in (report.get("verdict") or {}).items()
        if k not in ("warning_layers_per_step", "commands", "layers_to_smooth")
    }
    first_by_kind: dict[str, int] = {}
    for layer in report.get("layers", []):
        for w in layer.get("warnings", []):
            kind, step = str(w.get("kind")), w.get("step")
            if isinstance(step, int) and step < first_by_kind.get(kind, 1 << 62):
                first_by_kind[kind] = step
    return {"verdict": verdict, "first_warning_by_kind": dict(sorted(first_by_kind.items()))}


def checkpoints_of(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in run_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def scan_checkpoints(run_dir: Path, out_dir: Path) -> dict[int, dict[str, Any]]:
    """`pss scan --format json` of every checkpoint of the run: per-checkpoint spectra for the
    plot and the table (min stable rank, max sigma_max of the smoothable matrices)."""
    from concurrent.futures import ThreadPoolExecutor

    def scan(step: int, path: Path) -> tuple[int, dict[str, Any]]:
        target = out_dir / f"scan-{step}.json"
        model = path / "model.safetensors"
        fresh = target.is_file() and target.stat().st_mtime >= model.stat().st_mtime
        if not fresh:  # a rerun of an interrupted experiment reuses the scans still valid
            run_pss(["scan", str(path), "--format", "json", "-q", "-o", str(target)])
        return step, json.loads(target.read_text())

    with ThreadPoolExecutor(2) as pool:  # two pss processes at a time (2 cores)
        return dict(pool.map(lambda c: scan(*c), checkpoints_of(run_dir)))


def smooth_checkpoint(src: Path, dst: Path, arm: Arm) -> dict[str, Any]:
    """`pss smooth SRC --out DST --method M --optimizer-state P --format json`: the report."""
    assert arm.smooth_method is not None and arm.optimizer_state is not None
    saved = dst.parent / f"{dst.name}.smooth.json"
    # A rerun reuses a finished smoothing of the same (unchanged) checkpoint.
    if (
        saved.is_file()
        and (dst / "model.safetensors").is_file()
        and saved.stat().st_mtime >= (src / "model.safetensors").stat().st_mtime
    ):
        cached: dict[str, Any] = json.loads(saved.read_text())
        return cached
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    proc = run_pss(
        [
            "smooth",
            str(src),
            "--out",
            str(dst),
            "--method",
            arm.smooth_method,
            "--optimizer-state",
            arm.optimizer_state,
            "--format",
            "json",
            "-q",
        ]
    )
    report: dict[str, Any] = json.loads(proc.stdout)
    saved.write_text(json.dumps(report, indent=2))
    return report


# --------------------------------------------------------------------------------------------
# Resumes


@dataclass(frozen=True)
class ResumeJob:
    start: str  # "pre" or "post"
    arm: Arm
    seed: int
    checkpoint: Path  # the (possibly smoothed) folder to resume from
    out_dir: Path
    model: ModelConfig
    cfg: TrainConfig


def resume_config(exp: ExperimentConfig, arm: Arm, seed: int, start_step: int) -> TrainConfig:
    return replace(
        exp.base,
        lr=exp.base.lr * arm.lr_factor,
        grad_clip=arm.grad_clip,
        rewarm_steps=arm.rewarm_steps,
        seed=seed,
        max_steps=start_step + exp.resume_steps,
        save_every=0,
        save_final=False,
        eval_every=exp.resume_eval_every,
        threads=1,  # resumes run `workers` at a time, one core each
    )


def run_resume(job: ResumeJob) -> dict[str, Any]:
    """Train one resume, or load its result when an earlier (interrupted) experiment finished
    it with the same config: a rerun of the experiment continues where it stopped."""
    cache = job.out_dir / "resume.json"
    key = {"checkpoint": str(job.checkpoint), "model": asdict(job.model), "cfg": asdict(job.cfg)}
    if cache.is_file():
        cached: dict[str, Any] = json.loads(cache.read_text())
        if cached.get("key") == key:
            row: dict[str, Any] = cached["result"]
            return row
    result = train(job.out_dir, job.model, job.cfg, resume_from=job.checkpoint)
    row = {
        "start": job.start,
        "arm": job.arm.name,
        "seed": job.seed,
        "steps": result.steps,
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "evals": result.evals,
        "seconds": result.seconds,
    }
    cache.write_text(json.dumps({"key": key, "result": row}))
    return row


def run_base(out_dir: Path, exp: ExperimentConfig) -> RunResult:
    """Train the base run, or load it when a finished one with the same config is there."""
    cache = out_dir / "base.json"
    key = {"model": asdict(exp.model), "cfg": asdict(exp.base)}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            fields = cached["result"]
            fields["out_dir"] = Path(fields["out_dir"])
            fields["checkpoints"] = [Path(p) for p in fields["checkpoints"]]
            fields["evals"] = [tuple(e) for e in fields["evals"]]
            return RunResult(**fields)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # stale checkpoints of another config must not be mixed in
    result = train(out_dir, exp.model, exp.base, quiet=False)
    fields = asdict(result)
    fields["out_dir"] = str(result.out_dir)
    fields["checkpoints"] = [str(p) for p in result.checkpoints]
    cache.write_text(json.dumps({"key": key, "result": fields}))
    return result


# --------------------------------------------------------------------------------------------
# Per-run metrics and the table


def resume_metrics(
    run: dict[str, Any],
    det: Detection,
    reference_loss: float,
    start_step: int,
    after_explosion: bool,
) -> dict[str, Any]:
    """Per resumed run (docs/EXPERIMENTS.md "Definitions"), with ref = the base run's smoothed
    train loss at the pre-explosion checkpoint:

    - exploded_at: steps after the resume at which the smoothed loss first exceeded ref +
      det.loss_jump; for a resume from inside the explosion (`after_explosion`), only once it
      had come back below that line ("exploded again"). None: never.
    - recovered_in: steps after the resume until the smoothed loss is <= ref + det.recovery_margin
      for good (never again above ref + det.loss_jump). None: not within the resume.
    - final_eval_loss: validation loss at the last step (inf when the run went NaN).
    """
    steps, losses = run["steps"], run["losses"]
    ceiling = reference_loss + det.loss_jump
    values = smoothed(losses, det.window)
    calm_from = 0
    if after_explosion:
        calm_from = next((i for i, v in enumerate(values) if v <= ceiling), len(values))
    exploded = next(
        (steps[i] for i in range(calm_from, len(values)) if not values[i] <= ceiling), None
    )
    evals = run["evals"]
    final_eval = evals[-1][1] if evals else math.nan
    return {
        "exploded_at": None if exploded is None else exploded - start_step,
        "final_eval_loss": final_eval if math.isfinite(final_eval) else math.inf,
        "recovered_in": steps_to_recover(
            steps, losses, reference_loss + det.recovery_margin, ceiling, det.window
        ),
    }


def _mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "NaN (all)"
    text = f"{statistics.fmean(finite):.3f}"
    if len(finite) > 1:
        text += f" ± {statistics.stdev(finite):.3f}"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)} NaN)"
    return text


def summarize(rows: list[dict[str, Any]], arms: tuple[Arm, ...]) -> list[dict[str, Any]]:
    """One row per (start, arm) with the seeds' metrics gathered."""
    table = []
    for start in ("pre", "post"):
        for arm in arms:
            runs = [r for r in rows if r["start"] == start and r["arm"] == arm.name]
            if not runs:
                continue
            exploded = [r["exploded_at"] for r in runs if r["exploded_at"] is not None]
            recovered = [r["recovered_in"] for r in runs if r["recovered_in"] is not None]
            table.append(
                {
                    "start": start,
                    "arm": arm.name,
                    "seeds": len(runs),
                    "exploded": len(exploded),
                    "exploded_at": sorted(exploded),
                    "final_eval_loss": [r["final_eval_loss"] for r in runs],
                    "final_eval_loss_text": _mean_std([r["final_eval_loss"] for r in runs]),
                    "recovered": len(recovered),
                    "recovered_in": sorted(recovered),
                }
            )
    return table


def table_markdown(table: list[dict[str, Any]], resume_steps: int) -> str:
    lines = [
        "| start | arm | re-exploded (step after resume) | final val loss (mean ± std) "
        f"| back to pre-explosion loss within {resume_steps} steps (steps) |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        exploded = f"{row['exploded']}/{row['seeds']}"
        if row["exploded_at"]:
            exploded += " (" + ", ".join(map(str, row["exploded_at"])) + ")"
        recovered = f"{row['recovered']}/{row['seeds']}"
        if row["recovered_in"]:
            recovered += " (" + ", ".join(map(str, row["recovered_in"])) + ")"
        lines.append(
            f"| {row['start']} | {row['arm']} | {exploded} | {row['final_eval_loss_text']} "
            f"| {recovered} |"
        )
    return "\n".join(lines) + "\n"
