"""Markdown tables of results.json for docs/EXPERIMENTS.md v2 (written to table.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "inf/NaN"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def tables(results: dict[str, Any]) -> str:
    out: list[str] = []
    out.append("#### Pilots (1 seed, 500 steps; final val loss, nats/byte; * = diverged)\n")
    settings = list(results["pilots"])
    lrs = sorted({r["lr"] for p in results["pilots"].values() for r in p["rows"]})
    out.append(
        "| setting | "
        + " | ".join(f"{lr:g}" for lr in lrs)
        + " | best LR | D | D/best | in regime |"
    )
    out.append("|---" * (len(lrs) + 5) + "|")
    for name in settings:
        p = results["pilots"][name]
        by = {r["lr"]: r for r in p["rows"]}
        cells = [
            (_f(by[lr]["final_val"], 2) + ("*" if by[lr]["diverged"] else "")) if lr in by else "-"
            for lr in lrs
        ]
        d = p["divergence_lr"]
        out.append(
            f"| {name} | " + " | ".join(cells) + f" | {p['best_lr']:g} | "
            f"{'none' if d is None else f'{d:g}'} | {'-' if d is None else _f(p['ratio'], 0)} | "
            f"{'yes' if p['in_regime'] else 'no'} |"
        )
    if "tables" in results:
        out.append(f"\n#### Arms (setting `{results['setting']}`; 3 seeds; final val loss)\n")
        out.append(
            "| arm | LR | diverged | mean (capped at H1) | seed 0 / 1 / 2 | spikes "
            "| triggers (rate) | skipped | max attn logit |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        rows = results["rows"]
        for arm, table in results["tables"].items():
            for lr, t in sorted(table.items(), key=lambda kv: float(kv[0])):
                at = [r for r in rows if r["arm"] == arm and r["lr"] == float(lr)]
                n_steps = 500 * len(at)
                trig = sum(r["triggers"] for r in at)
                out.append(
                    f"| {arm} | {float(lr):g} | {t['diverged']}/{t['n']} | {_f(t['mean_val'])} | "
                    + " / ".join(_f(v, 2) for v in t["per_seed"])
                    + f" | {sum(r['spikes'] for r in at)} | "
                    + f"{trig} ({100 * trig / n_steps:.2f} %) | "
                    f"{sum(r['skipped'] for r in at)} | "
                    + _f(max((r["max_logit"] or 0.0) for r in at), 0)
                    + " |"
                )
        out.append("\n| arm | max stable LR | best loss (mean of 3 seeds, best LR) |")
        out.append("|---|---|---|")
        grid = {float(x) for x in results.get("grid", [])}
        for arm, table in results["tables"].items():
            msl = results["msl"][arm]
            shown = "below the grid" if msl is None else f"{msl:g}"
            ran = {float(x) for x in table}
            if grid and ran != grid:  # an arm run at a few LRs only (the other guard methods)
                shown = "n/a (run at " + ", ".join(f"{x:g}" for x in sorted(ran)) + " only)"
            out.append(f"| {arm} | {shown} | {_f(results['best_loss'][arm])} |")
    for key, title in (
        ("repair", "One-shot repairs"),
        ("repair_pooled", "One-shot repairs, pooled with the extra seeds' explosions"),
    ):
        _repair_table(out, results.get(key), title)
    for claim in ("claim_b", "claim_a", "claim_a_pooled"):
        if claim in results:
            out.append(f"\n{claim}: `{json.dumps(results[claim])}`")
    return "\n".join(out) + "\n"


def _repair_table(out: list[str], rep: dict[str, Any] | None, title: str) -> None:
    if rep and rep["cases"]:
        out.append(f"\n#### {title} (final val loss; R = re-exploded)\n")
        cases = rep["cases"]
        out.append(
            "| resume | "
            + " | ".join(f"seed {c['seed']} lr {c['lr']:g} from {c['pre']}" for c in cases)
            + " |"
        )
        out.append("|---" * (len(cases) + 1) + "|")
        for arm, resumes in rep["resumes"].items():
            out.append(
                f"| {arm} | "
                + " | ".join(
                    _f(r["final_val"]) + (" R" if r["reexploded"] else "") for r in resumes
                )
                + " |"
            )


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/paper_regime/results.json")
    print(tables(json.loads(path.read_text())))
