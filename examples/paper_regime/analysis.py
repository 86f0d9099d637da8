"""The decision rules of docs/EXPERIMENTS.md v2, as code: spikes, explosions, divergence, the max
stable LR, and the verdicts on claims (a) and (b). Pure functions of the per-run JSON logs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

UNIGRAM_NATS = 3.267  # entropy of the training text's byte frequencies (measured, see the doc)
SPIKE_NATS = 0.5
SPIKE_WINDOW = 20
EXPLOSION_NATS = 1.0
TIE_NATS = 0.02  # claim (a): a final val loss lower by more than this is "better"
BEST_LOSS_SLACK = 0.02  # claim (b): "no worse best loss"
WEAK_LOSS_SLACK = 0.10
TRIGGER_RATE_NOTE = 0.01  # above 1 % of steps: "the guard acted often"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def spikes(steps: Sequence[int], loss: Sequence[float | None], warmup: int) -> list[int]:
    """Steps after warm-up whose loss exceeds the previous 20 steps' median by > 0.5 nat; spike
    steps closer than 20 apart count once (the first)."""
    out: list[int] = []
    for i in range(SPIKE_WINDOW, len(loss)):
        if steps[i] <= warmup:
            continue
        prev = [v for v in loss[i - SPIKE_WINDOW : i] if _finite(v)]
        value = loss[i]
        if not prev:
            continue
        high = not _finite(value) or value > statistics.median(prev) + SPIKE_NATS  # type: ignore[operator]
        if high and (not out or steps[i] - out[-1] >= SPIKE_WINDOW):
            out.append(steps[i])
    return out


def explosion(
    steps: Sequence[int], loss: Sequence[float | None], warmup: int, after: int = 0
) -> tuple[int, int] | None:
    """(explosion step, onset step) or None: the 20-step trailing mean exceeds its lowest value so
    far (after warm-up and after `after`) by > 1 nat, or the loss is NaN/Inf."""
    lowest = math.inf
    spike_steps = spikes(steps, loss, warmup)
    for i, step in enumerate(steps):
        value = loss[i]
        if step <= max(warmup, after):
            continue
        if not _finite(value):
            return step, _onset(step, spike_steps)
        window = [v for v in loss[max(0, i - SPIKE_WINDOW + 1) : i + 1] if _finite(v)]
        mean = sum(window) / len(window)  # type: ignore[arg-type]
        if i + 1 >= SPIKE_WINDOW and steps[i - SPIKE_WINDOW + 1] > max(warmup, after):
            if mean > lowest + EXPLOSION_NATS:
                return step, _onset(step, spike_steps)
            lowest = min(lowest, mean)
    return None


def _onset(step: int, spike_steps: Sequence[int]) -> int:
    near = [s for s in spike_steps if step - SPIKE_WINDOW < s <= step]
    return near[0] if near else step


def final_val(run: dict[str, Any]) -> float:
    value = run["evals"][-1][1] if run["evals"] else None
    return float(value) if _finite(value) else math.inf


def arm_label(cfg: dict[str, Any]) -> str:
    """The arm a run belongs to: "pss" is the primary method (conv); the other guard methods
    run as arms "pss-<method>" (docs/EXPERIMENTS.md v2, "Arms")."""
    method = cfg.get("guard_method", "conv")
    if cfg["arm"] == "pss" and method != "conv":
        return f"pss-{method}"
    return str(cfg["arm"])


def summarise(run: dict[str, Any], after: int = 0) -> dict[str, Any]:
    cfg = run["config"]
    warmup = cfg["warmup_steps"]
    steps, loss = run["steps"], run["loss"]
    exp = explosion(steps, loss, warmup, after)
    fv = final_val(run)
    nonfinite = any(not _finite(v) for v in loss)
    n = len(steps)
    last = run["spectra"][-1] if run["spectra"] else None
    mats = last["matrices"] if last else {}
    return {
        "arm": arm_label(cfg),
        "lr": cfg["lr"],
        "seed": cfg["seed"],
        "final_val": fv,
        "best_val": min((v for _, v in run["evals"] if _finite(v)), default=math.inf),
        "exploded_at": exp[0] if exp else None,
        "onset": exp[1] if exp else None,
        "nonfinite": nonfinite,
        "diverged": nonfinite or exp is not None or fv > UNIGRAM_NATS,
        "spikes": len(spikes(steps, loss, max(warmup, after))),
        "triggers": len(run["triggered"]),
        "skipped": len(run["skipped"]),
        "smoothed": len(run["smoothed"]),
        "trigger_rate": len(run["triggered"]) / n if n else 0.0,
        "max_logit": max((s["max_logit"] for s in run["spectra"]), default=math.nan),
        "lm_head_sigma1": mats.get("lm_head.weight", {}).get("sigma1", math.nan),
        "min_sr": min((m["sr"] for m in mats.values()), default=math.nan),
        "seconds": run["seconds"],
        "guard_seconds": run.get("guard_seconds", 0.0),
    }


def capped(value: float) -> float:
    """A diverged run's loss counts as min(loss, H1): never better than learning nothing."""
    return min(value, UNIGRAM_NATS)


def arm_table(rows: Sequence[dict[str, Any]]) -> dict[float, dict[str, Any]]:
    """Per LR: n diverged, mean capped final val, per-seed values."""
    out: dict[float, dict[str, Any]] = {}
    for lr in sorted({r["lr"] for r in rows}):
        at = sorted((r for r in rows if r["lr"] == lr), key=lambda r: r["seed"])
        vals = [capped(r["final_val"]) for r in at]
        out[lr] = {
            "n": len(at),
            "diverged": sum(r["diverged"] for r in at),
            "mean_val": sum(vals) / len(vals),
            "per_seed": [r["final_val"] for r in at],
        }
    return out


def max_stable_lr(table: dict[float, dict[str, Any]]) -> float | None:
    """Largest grid LR with 0 diverged at it and every smaller grid LR (None: below the grid)."""
    best: float | None = None
    for lr in sorted(table):
        if table[lr]["diverged"]:
            break
        best = lr
    return best


def best_loss(table: dict[float, dict[str, Any]]) -> float:
    return min(t["mean_val"] for t in table.values())


def _grid_index(lr: float | None, grid: Sequence[float]) -> int:
    return -1 if lr is None else sorted(grid).index(lr)


def verdict_b(tables: dict[str, dict[float, dict[str, Any]]]) -> dict[str, Any]:
    pss, base, skip = tables["pss"], tables["baseline"], tables["skip"]
    grid = sorted(base)
    i_pss = _grid_index(max_stable_lr(pss), grid)
    i_base = _grid_index(max_stable_lr(base), grid)
    i_skip = _grid_index(max_stable_lr(skip), grid)
    d_loss = best_loss(pss) - best_loss(base)
    n_div = {k: sum(t["diverged"] for t in tables[k].values()) for k in ("pss", "baseline", "skip")}
    if i_pss > i_base and i_pss > i_skip and d_loss <= BEST_LOSS_SLACK:
        verdict = "supported"
    elif i_pss > i_base and i_pss > i_skip and d_loss <= WEAK_LOSS_SLACK:
        verdict = "weak"
    elif i_base < i_pss <= i_skip:
        verdict = "weak (the gain is the skipping)"
    elif (
        i_pss == i_base
        and n_div["pss"] + 3 <= n_div["baseline"]
        and n_div["pss"] + 3 <= n_div["skip"]
    ):
        verdict = "weak"
    else:
        verdict = "not supported"
    return {
        "verdict": verdict,
        "msl": {k: max_stable_lr(tables[k]) for k in ("pss", "baseline", "skip")},
        "best_loss_delta": d_loss,
        "diverged_runs": n_div,
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> int:
    """+1 when resume a beats b (did not re-explode where b did, or same status and final val lower
    by > 0.02 nat), -1 for the reverse, 0 for a tie."""
    if a["reexploded"] != b["reexploded"]:
        return 1 if b["reexploded"] else -1
    fa, fb = capped(a["final_val"]), capped(b["final_val"])
    if fa < fb - TIE_NATS:
        return 1
    if fb < fa - TIE_NATS:
        return -1
    return 0


def verdict_a(resumes: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """resumes[arm][i]: the resume of explosion i ({reexploded, final_val})."""

    def tally(x: str, y: str) -> tuple[int, int, int]:
        res = [compare(a, b) for a, b in zip(resumes[x], resumes[y], strict=True)]
        return res.count(1), res.count(0), res.count(-1)

    t1, t2 = tally("smooth", "unchanged"), tally("smooth+lr/2", "lr/2")

    def ok(t: tuple[int, int, int]) -> bool:
        return t[0] >= 2 and t[2] == 0

    if ok(t1) and ok(t2):
        verdict = "supported"
    elif (
        (t1[0] > t1[2] and t2[0] > t2[2])
        or (ok(t1) and t2[1] == sum(t2))
        or (ok(t2) and t1[1] == sum(t1))
    ):
        verdict = "weak"
    else:
        verdict = "not supported"
    return {"verdict": verdict, "smooth_vs_unchanged": t1, "smooth_lr2_vs_lr2": t2}


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n


def verdict_confirm(
    rows: Sequence[dict[str, Any]], arm: str, controls: Sequence[str]
) -> dict[str, Any]:
    """docs/EXPERIMENTS.md v2.1: `arm` against each control on paired seeds at one LR."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows if r["arm"] == arm})
    out: dict[str, Any] = {"arm": arm, "seeds": seeds, "controls": {}}

    def mean_capped(name: str) -> float:
        return statistics.fmean(capped(by[(name, s)]["final_val"]) for s in seeds)

    n_arm = sum(by[(arm, s)]["diverged"] for s in seeds)
    passes, fewer = [], []
    for control in controls:
        wins = sum(by[(control, s)]["diverged"] and not by[(arm, s)]["diverged"] for s in seeds)
        losses = sum(by[(arm, s)]["diverged"] and not by[(control, s)]["diverged"] for s in seeds)
        p = sign_test_p(wins, losses)
        n_control = sum(by[(control, s)]["diverged"] for s in seeds)
        loss_ok = mean_capped(arm) <= mean_capped(control) + 0.02
        out["controls"][control] = {
            "diverged": n_control,
            "wins": wins,
            "losses": losses,
            "p": p,
            "mean_capped": mean_capped(control),
        }
        passes.append(wins - losses >= 4 and p <= 0.05 and loss_ok)
        fewer.append(n_arm < n_control)
    out["diverged"] = n_arm
    out["mean_capped"] = mean_capped(arm)
    if all(passes):
        out["verdict"] = "supported"
    elif all(fewer):
        out["verdict"] = "weak"
    else:
        out["verdict"] = "not supported"
    return out
