"""The v2 experiment (examples/paper_regime): its decision rules as unit tests on synthetic loss
curves, and the whole pipeline (pilot, arms, one-shot repair with `pss smooth`, verdicts, plots)
on a tiny slice in a subprocess. The slice checks that every stage runs and leaves consistent
output, not the scientific outcome."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "paper_regime"


def _load(name: str) -> ModuleType:
    # By path, under a unique name: examples/divergence has modules called `model` and `train` too,
    # and tests/test_experiment_smoke.py puts that folder on sys.path.
    spec = importlib.util.spec_from_file_location(
        f"paper_regime_{name}", EXAMPLE_DIR / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


analysis = _load("analysis")


def _flat(n: int, value: float = 2.0) -> list[float | None]:
    return [value] * n


def test_spike_needs_half_a_nat_over_the_trailing_median() -> None:
    loss = _flat(100)
    loss[60] = 2.49  # below the 0.5-nat line: not a spike
    loss[70] = 2.6
    loss[75] = 2.6  # within 20 steps of the previous spike: the same spike
    loss[95] = math.nan  # a non-finite loss is a spike
    steps = list(range(1, 101))
    assert analysis.spikes(steps, loss, warmup=10) == [71, 96]


def test_spikes_during_warmup_are_ignored() -> None:
    loss = _flat(60)
    loss[25] = 5.0
    assert analysis.spikes(list(range(1, 61)), loss, warmup=30) == []


def test_explosion_is_a_one_nat_rise_of_the_20_step_mean_with_its_onset() -> None:
    loss = _flat(200)
    for i in range(120, 200):
        loss[i] = 4.0
    steps = list(range(1, 201))
    exp = analysis.explosion(steps, loss, warmup=10)
    assert exp is not None
    step, onset = exp
    assert onset == 121  # the first step above the line
    # The trailing mean passes min + 1 nat once more than half of the window is at 4.0.
    assert 130 <= step <= 132


def test_no_explosion_on_a_smooth_curve_nor_inside_warmup() -> None:
    falling = [3.0 - i * 0.002 for i in range(300)]
    assert analysis.explosion(list(range(1, 301)), falling, warmup=30) is None  # type: ignore[arg-type]
    early = _flat(100)
    early[5] = 50.0
    assert analysis.explosion(list(range(1, 101)), early, warmup=30) is None


def test_nonfinite_loss_is_an_explosion() -> None:
    loss = _flat(80)
    loss[70] = math.inf
    exp = analysis.explosion(list(range(1, 81)), loss, warmup=10)
    assert exp is not None and exp[0] == 71


def _table(diverged: dict[float, int], val: float = 2.0) -> dict[float, dict[str, object]]:
    return {
        lr: {"n": 3, "diverged": d, "mean_val": val, "per_seed": [val] * 3}
        for lr, d in diverged.items()
    }


def test_max_stable_lr_needs_every_smaller_lr_stable() -> None:
    assert analysis.max_stable_lr(_table({1.0: 0, 2.0: 0, 4.0: 1, 8.0: 0})) == 2.0
    assert analysis.max_stable_lr(_table({1.0: 1, 2.0: 0})) is None


def test_claim_b_verdicts() -> None:
    grid = (1.0, 2.0, 4.0)
    base = _table(dict(zip(grid, (0, 1, 3), strict=True)))
    skip = _table(dict(zip(grid, (0, 1, 3), strict=True)))
    better = _table(dict(zip(grid, (0, 0, 3), strict=True)))
    tables = {"baseline": base, "skip": skip, "pss": better}
    assert analysis.verdict_b(tables)["verdict"] == "supported"
    # The same gain for skip-only: the smoothing adds nothing.
    tables["skip"] = better
    assert analysis.verdict_b(tables)["verdict"].startswith("weak")
    # A higher max stable LR at a clearly worse best loss.
    tables = {"baseline": base, "skip": skip, "pss": _table({1.0: 0, 2.0: 0, 4.0: 3}, val=2.5)}
    assert analysis.verdict_b(tables)["verdict"] == "not supported"
    tables = {"baseline": base, "skip": skip, "pss": base}
    assert analysis.verdict_b(tables)["verdict"] == "not supported"


def _resume(reexploded: bool, val: float) -> dict[str, object]:
    return {"reexploded": reexploded, "final_val": val}


def test_claim_a_verdicts() -> None:
    good = [_resume(False, 2.0)] * 3
    bad = [_resume(True, 3.0)] * 3
    tie = [_resume(False, 2.01)] * 3
    assert (
        analysis.verdict_a({"smooth": good, "unchanged": bad, "smooth+lr/2": good, "lr/2": bad})[
            "verdict"
        ]
        == "supported"
    )
    assert (
        analysis.verdict_a({"smooth": good, "unchanged": bad, "smooth+lr/2": good, "lr/2": tie})[
            "verdict"
        ]
        == "weak"
    )
    assert (
        analysis.verdict_a({"smooth": bad, "unchanged": good, "smooth+lr/2": good, "lr/2": bad})[
            "verdict"
        ]
        == "not supported"
    )


def test_sign_test_p_is_the_exact_binomial_tail() -> None:
    assert analysis.sign_test_p(5, 0) == 1 / 32
    assert analysis.sign_test_p(0, 0) == 1.0
    assert math.isclose(analysis.sign_test_p(6, 1), 8 / 128)  # P(X >= 6), n = 7


def _confirm_rows(arm_diverged: list[bool], control_diverged: list[bool]) -> list[dict]:
    rows = []
    for seed, (a, c) in enumerate(zip(arm_diverged, control_diverged, strict=True)):
        rows.append(
            {"arm": "pss-clip", "seed": seed, "diverged": a, "final_val": 3.4 if a else 2.2}
        )
        for control in ("baseline", "skip"):
            rows.append(
                {"arm": control, "seed": seed, "diverged": c, "final_val": 3.4 if c else 2.2}
            )
    return rows


def test_confirm_verdicts() -> None:
    controls = ("baseline", "skip")
    five_wins = _confirm_rows([False] * 12, [True] * 5 + [False] * 7)
    assert analysis.verdict_confirm(five_wins, "pss-clip", controls)["verdict"] == "supported"
    # 4 wins, 0 losses: p = 1/16 > 0.05
    four_wins = _confirm_rows([False] * 12, [True] * 4 + [False] * 8)
    assert analysis.verdict_confirm(four_wins, "pss-clip", controls)["verdict"] == "weak"
    worse = _confirm_rows([True] * 3 + [False] * 9, [False] * 12)
    assert analysis.verdict_confirm(worse, "pss-clip", controls)["verdict"] == "not supported"


def test_a_diverged_run_never_counts_better_than_the_unigram_line() -> None:
    assert analysis.capped(math.inf) == analysis.UNIGRAM_NATS
    assert analysis.compare(_resume(True, 50.0), _resume(True, 4.0)) == 0


def test_pipeline_slice_end_to_end(tmp_path: Path) -> None:
    out, img = tmp_path / "runs", tmp_path / "img"
    cmd = [
        sys.executable,
        str(EXAMPLE_DIR / "run_all.py"),
        "--smoke",
        "--out",
        str(out),
        "--img-dir",
        str(img),
        "--workers",
        "1",
        "--grid",
        "1",
        "--arms",
        "baseline,clip,pss,skip",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["setting"] == "base"
    assert set(results["tables"]) >= {"baseline", "clip"}
    for row in results["rows"]:
        assert row["seconds"] > 0
        assert row["max_logit"] is None or row["max_logit"] >= 0
    # The tiny model explodes at its high LR: the repair stage ran `pss smooth` and all 6 resumes.
    assert results["repair"]["cases"], "the smoke LR should explode"
    assert set(results["repair"]["resumes"]) == {
        "unchanged",
        "smooth",
        "smooth+lr/2",
        "lr/2",
        "skip50",
        "clip",
    }
    assert results["claim_a"]["verdict"] in ("supported", "weak", "not supported")
    if "pss" in results["tables"]:
        assert results["claim_b"]["verdict"].split(" ")[0] in ("supported", "weak", "not")
    for name in ("pilot", "lr-sensitivity", "repair"):
        assert (img / f"paper-regime-{name}.png").stat().st_size > 1000
