"""The v2 figures (matplotlib, PNG): the pilot sweeps, the LR-sensitivity curve per arm
(Wortsman et al. 2023, arXiv 2309.14322), and the loss curves of the one-shot repairs."""

from __future__ import annotations

import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import analysis


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _smooth(values: list[float | None], k: int = 20) -> list[float]:
    out, window = [], []
    for v in values:
        window.append(v if v is not None and math.isfinite(v) else math.nan)
        window = window[-k:]
        finite = [w for w in window if math.isfinite(w)]
        out.append(sum(finite) / len(finite) if len(finite) == len(window) else math.nan)
    return out


def draw_all(
    out: Path, results: dict[str, Any], curves: dict[str, list[dict[str, Any]]], img_dir: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    foot = f"CPU: {cpu_name()}, 1 thread per run (2 shared cores)"
    top = analysis.UNIGRAM_NATS + 0.6

    # 1. pilots: final val loss vs LR per setting; train-loss curves of the chosen setting.
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, pilot in results["pilots"].items():
        rows = pilot["rows"]
        a.plot([r["lr"] for r in rows], [min(r["final_val"], top) for r in rows], "o-", label=name)
    a.axhline(analysis.UNIGRAM_NATS, color="grey", ls="--", label="unigram H1")
    a.set_xscale("log")
    a.set_xlabel("peak LR")
    a.set_ylabel("final val loss (nats/byte, clipped)")
    a.set_title("pilot sweeps (1 seed, 500 steps)")
    a.legend(fontsize=7)
    for r in sorted(curves[results["setting"]], key=lambda r: r["config"]["lr"]):
        b.plot(
            r["steps"],
            [min(v, top) if not math.isnan(v) else top for v in _smooth(r["loss"])],
            label=f"lr {r['config']['lr']:g}",
        )
    b.axhline(analysis.UNIGRAM_NATS, color="grey", ls="--")
    b.set_xlabel("step")
    b.set_ylabel("train loss, 20-step mean")
    b.set_title(f"pilot '{results['setting']}': train loss")
    b.legend(fontsize=7)
    fig.text(0.01, 0.01, foot, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(img_dir / "paper-regime-pilot.png", dpi=110)
    plt.close(fig)

    # 2. LR sensitivity per arm: mean (line) and each seed (dots) of the final val loss.
    if "tables" in results:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, table in results["tables"].items():
            lrs = sorted(table, key=float)
            line = ax.plot(
                [float(x) for x in lrs], [table[x]["mean_val"] for x in lrs], "o-", label=arm
            )[0]
            for x in lrs:
                ys = [min(v if v is not None else top, top) for v in table[x]["per_seed"]]
                ax.scatter([float(x)] * len(ys), ys, s=10, color=line.get_color(), alpha=0.5)
        ax.axhline(analysis.UNIGRAM_NATS, color="grey", ls="--", label="unigram H1")
        ax.set_xscale("log")
        ax.set_xlabel("peak LR")
        ax.set_ylabel("final val loss (mean of 3 seeds; capped at H1)")
        ax.set_title(f"LR sensitivity per arm (setting '{results['setting']}')")
        ax.legend(fontsize=7)
        fig.text(0.01, 0.01, foot, fontsize=7)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(img_dir / "paper-regime-lr-sensitivity.png", dpi=110)
        plt.close(fig)

    # 3. one-shot repairs: train loss (20-step mean) of each resume, per explosion.
    # The pooled repairs (with the extra seeds' explosions) include the pre-registered ones.
    rep = results.get("repair_pooled") or results.get("repair")
    if rep and rep["cases"]:
        n = len(rep["cases"])
        cols = min(n, 3)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
        for j in range(n, rows * cols):
            axes[j // cols][j % cols].axis("off")
        for i, case in enumerate(rep["cases"]):
            ax = axes[i // cols][i % cols]
            for arm, resumes in rep["resumes"].items():
                steps, loss = resumes[i]["curve"]
                ax.plot(
                    steps,
                    [min(v, top) if not math.isnan(v) else top for v in _smooth(loss)],
                    label=arm,
                )
            ax.axvline(case["onset"], color="red", ls=":", label="onset (baseline)")
            ax.axhline(analysis.UNIGRAM_NATS, color="grey", ls="--")
            ax.set_title(f"seed {case['seed']}, lr {case['lr']:g}: resume from {case['pre']}")
            ax.set_xlabel("step")
            ax.set_ylabel("train loss, 20-step mean")
            ax.legend(fontsize=7)
        fig.text(0.01, 0.01, foot, fontsize=7)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(img_dir / "paper-regime-repair.png", dpi=110)
        plt.close(fig)
