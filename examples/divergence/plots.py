"""The experiment's figures (matplotlib, Agg backend): the base run, and the resumes per arm."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from experiment import smoothed

_MARKS = (
    ("first_warning", "pss warning", "tab:green", "-"),
    ("grad_spike_at", "grad-norm spike", "tab:orange", "--"),
    ("exploded_at", "loss explosion", "tab:red", "-"),
)


def _event_steps(base: dict[str, Any]) -> list[tuple[int, str, str, str]]:
    marks = []
    for key, label, color, style in _MARKS:
        value = base[key]
        step = value.get("step") if isinstance(value, dict) else value
        if isinstance(step, int):
            marks.append((step, f"{label} (step {step})", color, style))
    return marks


def plot_base(results: dict[str, Any], path: Path) -> None:
    base = results["base"]
    window = results["config"]["detection"]["window"]
    steps, losses, grads = base["steps"], base["losses"], base["grad_norms"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8.5), sharex=True, constrained_layout=True)
    ax = axes[0]
    ax.plot(steps, losses, color="0.75", lw=0.6, label="train loss (per step)")
    mean_label = f"train loss ({window}-step mean)"
    ax.plot(steps, smoothed(losses, window), color="k", lw=1.4, label=mean_label)
    if base["evals"]:
        es, ev = zip(*base["evals"], strict=True)
        ax.plot(es, ev, "o", ms=3, color="tab:blue", label="validation loss")
    control = results.get("control")
    if control:
        ax.plot(
            control["steps"],
            smoothed(control["losses"], window),
            color="tab:cyan",
            lw=1.2,
            label=f"control run, lr {control['lr']:g} ({window}-step mean)",
        )
    ax.set_ylabel("loss (nats/byte, log scale)")
    ax.set_yscale("log")
    ax = axes[1]
    ax.semilogy(steps, grads, color="tab:purple", lw=0.7, label="base run")
    if control:
        ax.semilogy(
            control["steps"], control["grad_norms"], color="tab:cyan", lw=0.7, label="control run"
        )
    ax.legend(fontsize=7.5, loc="upper right")
    ax.set_ylabel("grad norm (before clipping)")
    ax = axes[2]
    ax2 = ax.twinx()
    runs = [(base, "base run", "tab:green")]
    if control:
        runs.append((control, "control run", "tab:cyan"))
    for run, name, color in runs:
        spectra = run["spectra"]
        cs = [int(x) for x in spectra]
        ax.plot(
            cs,
            [spectra[str(x)]["min_stable_rank"] for x in cs],
            "o-",
            color=color,
            ms=3,
            label=f"min stable rank, {name}",
        )
        ax2.plot(
            cs,
            [spectra[str(x)]["max_sigma_max"] for x in cs],
            "s--",
            color=color,
            ms=3,
            alpha=0.8,
            label=f"max sigma_1, {name}",
        )
    ax.set_ylabel("min stable rank (solid)\nattention + MLP matrices")
    ax2.set_ylabel("max sigma_1 (dashed, log scale)")
    ax2.set_yscale("log")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7.5, loc="center right")
    ax.set_xlabel("optimizer step")
    for a in axes:
        for step, label, color, style in _event_steps(base):
            a.axvline(step, color=color, ls=style, lw=1.2, label=label if a is axes[0] else None)
        for name, start in results["starts"].items():
            if isinstance(start, dict):
                a.axvline(
                    start["step"],
                    color="0.4",
                    ls=":",
                    lw=1.0,
                    label=f"resume '{name}' (checkpoint-{start['step']})" if a is axes[0] else None,
                )
    axes[0].legend(fontsize=7.5, loc="upper right", ncol=2)
    axes[0].set_title(
        f"Base run: lr {results['config']['base']['lr']:g}, "
        f"first warning from {base['first_warning']['source']}",
        fontsize=9,
    )
    fig.savefig(path, dpi=130)
    plt.close(fig)


# Panels of the resume figure: arms grouped so that each panel stays readable; "unchanged" is
# drawn in every panel as the reference.
def _is_usual_fix(arm: str) -> bool:
    return not arm.startswith(("cap", "conv", "softmax", "clip/"))


def _is_reset(arm: str) -> bool:
    return "/reset" in arm


def _is_keep(arm: str) -> bool:
    return arm.endswith("/keep")


_GROUPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("usual fixes", _is_usual_fix),
    ("pss smooth, optimizer state reset", _is_reset),
    ("pss smooth, optimizer state kept", _is_keep),
)
_COLORS = {
    "unchanged": "k",
    "lr/2": "tab:blue",
    "lr/10": "tab:cyan",
    "gradclip 1.0": "tab:purple",
    "cap": "tab:red",
    "conv": "tab:green",
    "softmax": "tab:orange",
    "clip": "tab:brown",
}


def _arm_style(arm: str) -> dict[str, Any]:
    if arm == "unchanged":
        return {"color": "k", "ls": "-", "lw": 2.0}
    method = arm.split("/")[0] if "/" in arm and not arm.startswith("lr/") else arm
    color = _COLORS.get(method, "tab:gray")
    return {"color": color, "ls": ":" if "rewarm" in arm else "-", "lw": 1.4}


def plot_resumes(results: dict[str, Any], path: Path) -> None:
    window = results["config"]["detection"]["window"]
    arms = [a["name"] for a in results["config"]["arms"]]
    starts = [s for s in ("pre", "post") if s in results["starts"]]
    base = results["base"]
    fig, axes = plt.subplots(
        len(starts),
        len(_GROUPS),
        figsize=(5.2 * len(_GROUPS), 3.9 * len(starts)),
        sharey=True,
        constrained_layout=True,
        squeeze=False,
    )
    base_curve = smoothed(base["losses"], window)
    ref = results["starts"].get("reference_loss")
    for row, start in enumerate(starts):
        start_step = results["starts"][start]["step"]
        for col, (group, member) in enumerate(_GROUPS):
            ax = axes[row][col]
            for arm in arms:
                if arm != "unchanged" and not member(arm):
                    continue
                runs = [r for r in results["runs"] if r["start"] == start and r["arm"] == arm]
                if not runs:
                    continue
                n = min(len(r["steps"]) for r in runs)
                steps = runs[0]["steps"][:n]
                cols = list(zip(*(smoothed(r["losses"], window)[:n] for r in runs), strict=True))
                style = _arm_style(arm)
                ax.plot(steps, [statistics.median(c) for c in cols], label=arm, **style)
                ax.fill_between(
                    steps,
                    [min(c) for c in cols],
                    [max(c) for c in cols],
                    color=style["color"],
                    alpha=0.15,
                    lw=0,
                )
            # The base run before the resume point, for context.
            lo = max(0, start_step - 60)
            ax.plot(
                base["steps"][lo:start_step],
                base_curve[lo:start_step],
                color="0.55",
                lw=2.5,
                alpha=0.6,
                label="base run before the resume",
            )
            if isinstance(ref, float):
                ax.axhline(
                    ref, color="tab:red", ls="--", lw=0.8, label=f"pre-explosion loss {ref:.2f}"
                )
            ax.set_yscale("log")
            ax.set_title(f"from '{start}' (checkpoint-{start_step}): {group}", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"train loss ({window}-step mean, log scale)")
            if row == len(starts) - 1:
                ax.set_xlabel("optimizer step")
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"Resumes: median of {len(results['config']['seeds'])} seeds, shaded min-max",
        fontsize=10,
    )
    fig.savefig(path, dpi=130)
    plt.close(fig)
