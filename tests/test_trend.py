"""`pss trend`: run discovery, the detector, the cache, the verdict and its outputs."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pss_cli import pipeline
from pss_cli.app import app
from pss_cli.config import ScanConfig, TrendConfig
from pss_cli.errors import CheckpointNotFoundError, UsageError
from pss_cli.trend.analysis import analyse_run
from pss_cli.trend.detect import (
    DROP,
    FLOOR,
    SIGMA_GROWTH,
    grad_spike_step,
    layer_warnings,
    loss_spike_step,
    low_from_start,
)
from pss_cli.trend.discovery import LogPoint, discover_run, step_from_name
from tests.spectra_factory import spiky, with_spectrum
from tests.trend_factory import LAYERS, write_run

STEPS = [100, 200, 300, 400, 500, 600, 700]
COLLAPSING = (LAYERS[0], LAYERS[3])


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["trend", *args], terminal_width=200)


def trend_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = invoke(*args, "--format", "json", "--quiet")
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


# --- discovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("checkpoint-1500", 1500),
        ("step-20", 20),
        ("step_20", 20),
        ("step20", 20),
        ("global_step300", 300),
        ("iter_0000700", 700),
        ("step-5.safetensors", 5),
        ("checkpoint-100-pss-smoothed", None),
        ("checkpoint-", None),
        ("runs", None),
        ("model.safetensors", None),
    ],
)
def test_step_from_name(name: str, step: int | None) -> None:
    assert step_from_name(name) == step


@pytest.mark.parametrize(
    "naming",
    ["checkpoint-{step}", "step-{step}", "step_{step}", "global_step{step}", "iter_{step:07d}"],
)
def test_each_naming_scheme_is_discovered_in_step_order(tmp_path: Path, naming: str) -> None:
    write_run(tmp_path, [30, 1000, 200], naming=naming)
    (tmp_path / "logs").mkdir()  # not a checkpoint
    (tmp_path / ".pss-cache").mkdir()
    run = discover_run([tmp_path])
    assert [c.step for c in run.checkpoints] == [30, 200, 1000]
    assert all(c.step_source == "name" for c in run.checkpoints)


def test_smoothed_outputs_beside_the_checkpoints_are_not_part_of_the_run(tmp_path: Path) -> None:
    write_run(tmp_path, [10, 20])
    shutil.copytree(tmp_path / "checkpoint-20", tmp_path / "checkpoint-20-pss-smoothed")
    assert [c.path.name for c in discover_run([tmp_path]).checkpoints] == [
        "checkpoint-10",
        "checkpoint-20",
    ]


def test_explicit_paths_take_steps_from_trainer_state_or_order(tmp_path: Path) -> None:
    a, b = write_run(tmp_path, [10, 20], naming="run-{step}")
    run = discover_run([b, a])  # no step in the names, none in a trainer_state: user's order
    assert [(c.path, c.step, c.step_source) for c in run.checkpoints] == [
        (b, 0, "order"),
        (a, 1, "order"),
    ]
    for path, step in ((a, 10), (b, 20)):
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    run = discover_run([b, a])
    assert [(c.path, c.step, c.step_source) for c in run.checkpoints] == [
        (a, 10, "trainer_state"),
        (b, 20, "trainer_state"),
    ]


def test_two_checkpoints_with_one_step_are_refused(tmp_path: Path) -> None:
    write_run(tmp_path, [10], naming="step-{step}")
    write_run(tmp_path, [10], naming="step_{step}")
    with pytest.raises(UsageError, match="two checkpoints claim step 10"):
        discover_run([tmp_path])


def test_a_folder_without_checkpoints_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoints found"):
        discover_run([tmp_path])
    result = invoke(str(tmp_path))
    assert result.exit_code == 3
    assert result.output.startswith("Error: no checkpoints found")
    assert "Traceback" not in result.output


def test_a_lightning_run_folder_points_at_its_checkpoints(tmp_path: Path) -> None:
    # Lightning keeps checkpoints in lightning_logs/version_N/checkpoints/epoch=E-step=N.ckpt:
    # the run folder's top level has none, and the hint names where they are.
    deep = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    deep.mkdir(parents=True)
    (deep / "epoch=0-step=100.ckpt").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointNotFoundError) as raised:
        discover_run([tmp_path])
    assert raised.value.hint == f"its checkpoints are in '{deep}': pss trend {deep}"


def test_log_history_is_read_from_the_latest_trainer_state(tmp_path: Path) -> None:
    write_run(tmp_path, [100, 200, 300], loss_spike_step=250, log_every=10)
    run = discover_run([tmp_path])
    assert run.log_source == tmp_path / "checkpoint-300" / "trainer_state.json"
    assert [p.step for p in run.log] == list(range(10, 301, 10))  # eval entries merged away


# --- the detector (pure) -------------------------------------------------------------------------


def test_detector_fires_on_drop_floor_and_growth_at_the_collapse_step() -> None:
    steps = [1, 2, 3, 4, 5]
    sr = [40.0, 42.0, 41.0, 3.0, 2.5]
    sigma = [1.0, 1.1, 1.2, 6.0, 6.5]
    flagged = [s < 5 for s in sr]
    events = layer_warnings(steps, sr, sigma, flagged, [False] * 5, TrendConfig(warn_on_drop=True))
    first = [e for e in events if e.step == 4]
    assert {e.kind for e in first} == {FLOOR, DROP, SIGMA_GROWTH}
    default = layer_warnings(steps, sr, sigma, flagged, [False] * 5, TrendConfig())
    assert {e.kind for e in default if e.step == 4} == {FLOOR, SIGMA_GROWTH}  # drops: opt-in
    assert min(e.step for e in events) == 4
    drop = next(e for e in first if e.kind == DROP)
    assert drop.reference == pytest.approx(1 + 0.5 * (41.0 - 1))  # half the distance to rank one


def test_floor_fires_when_a_layer_falls_below_it_not_when_it_starts_there() -> None:
    steps = [1, 2, 3, 4, 5, 6]
    sr = [6.0, 5.5, 4.8, 5.2, 4.9, 4.7]  # small changes: only the floor can fire
    flagged = [s < 5 for s in sr]
    events = layer_warnings(steps, sr, [1.0] * 6, flagged, [False] * 6, TrendConfig())
    assert [(e.kind, e.step) for e in events] == [(FLOOR, 3), (FLOOR, 5)]  # each fall below
    low = [3.0, 2.9, 3.1, 2.8]
    events = layer_warnings([1, 2, 3, 4], low, [1.0] * 4, [True] * 4, [False] * 4, TrendConfig())
    assert events == ()
    assert low_from_start(low, [True] * 4, [False] * 4)
    assert low_from_start([None, 3.0], [False, True], [True, False])  # first defined point
    assert not low_from_start(sr, flagged, [False] * 6)


def test_a_drop_is_measured_on_the_distance_to_rank_one() -> None:
    # A small model: healthy SR 2.5, collapse to 1.2 is an 87 % fall of the excess over 1,
    # though less than a halving of SR itself.
    sr = [2.6, 2.5, 2.45, 1.2]
    config = TrendConfig(warn_on_drop=True)
    events = layer_warnings([1, 2, 3, 4], sr, [1.0] * 4, [True] * 4, [False] * 4, config)
    assert [(e.kind, e.step) for e in events] == [(DROP, 4)]


def test_quiet_roles_only_warn_about_nonfinite_values() -> None:
    sr = [40.0, 41.0, 3.0, None]
    sigma = [1.0, 1.0, 9.0, None]
    flagged = [False, False, True, False]
    bad = [False, False, False, True]
    events = layer_warnings([1, 2, 3, 4], sr, sigma, flagged, bad, TrendConfig(), spectral=False)
    assert [(e.kind, e.step) for e in events] == [("nonfinite", 4)]


def test_detector_is_quiet_on_drift_and_noise() -> None:
    steps = list(range(20))
    sr = [30.0 * (1 - 0.01 * t) * (1.05 if t % 2 else 0.95) for t in steps]
    sigma = [1.0 + 0.05 * t for t in steps]
    events = layer_warnings(steps, sr, sigma, [False] * 20, [False] * 20, TrendConfig())
    assert events == ()


def test_a_drop_is_judged_against_the_recent_window_only() -> None:
    # A slow decline 40 -> 12 over many checkpoints is not a sudden drop; 12 -> 5 is.
    sr = [40.0, 34.0, 29.0, 24.0, 20.0, 16.0, 13.0, 12.0, 5.0]
    steps = list(range(len(sr)))
    events = layer_warnings(
        steps,
        sr,
        [1.0] * len(sr),
        [False] * len(sr),
        [False] * len(sr),
        TrendConfig(warn_on_drop=True),
    )
    assert [(e.kind, e.step) for e in events] == [(DROP, 8)]


def test_learning_from_init_is_not_a_warning_by_default() -> None:
    # The examples/ control run (docs/EXPERIMENTS.md): SR 50 -> 22 while sigma_max grows 1.5x
    # per checkpoint, freshly initialised attention learning; no explosion followed.
    sr = [50.4, 40.1, 22.1, 14.2, 11.3, 10.1, 10.1, 9.0, 7.7]
    sigma = [0.63, 0.73, 1.04, 1.42, 1.73, 2.01, 2.19, 2.48, 2.89]
    steps = list(range(20, 200, 20))
    flagged = [s < 5 for s in sr]
    assert layer_warnings(steps, sr, sigma, flagged, [False] * 9, TrendConfig()) == ()
    with_drops = layer_warnings(
        steps, sr, sigma, flagged, [False] * 9, TrendConfig(warn_on_drop=True)
    )
    assert [e.step for e in with_drops][:1] == [60]


def test_undefined_values_are_gaps_not_zeros() -> None:
    events = layer_warnings(
        [1, 2, 3, 4],
        [30.0, None, 31.0, 29.0],
        [1.0, None, 1.0, 1.1],
        [False] * 4,
        [False, True, False, False],
        TrendConfig(),
    )
    assert [(e.kind, e.step) for e in events] == [("nonfinite", 2)]


def test_grad_and_loss_spikes() -> None:
    log = [LogPoint(s, 3.0 - 0.01 * s, 1.0) for s in range(0, 100, 10)]
    log += [LogPoint(100, 3.1, 4.0), LogPoint(110, 6.0, 50.0), LogPoint(120, float("nan"), None)]
    config = TrendConfig()
    assert grad_spike_step(log, config) == 100  # 4.0 > 2.5 x EMA(1.0)
    assert loss_spike_step(log, config) == 110  # 6.0 > 1.5 x 2.1
    assert grad_spike_step(log[:10], config) is None
    assert loss_spike_step(log[:10], config) is None
    nan_only = [LogPoint(s, 2.0, 1.0) for s in range(6)] + [LogPoint(6, float("nan"), None)]
    assert loss_spike_step(nan_only, config) == 6


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("collapse_step", [300, 600])
def test_warns_at_the_collapse_on_the_collapsing_layers_only(
    tmp_path: Path, seed: int, collapse_step: int
) -> None:
    write_run(
        tmp_path, STEPS, COLLAPSING, collapse_step, seed=seed, loss_spike_step=collapse_step + 50
    )
    code, data = trend_json(str(tmp_path))
    verdict = data["verdict"]
    assert code == 1
    assert verdict["status"] == "collapse"
    assert verdict["first_warning_step"] == collapse_step
    assert sorted(verdict["first_warning_layers"]) == sorted(COLLAPSING)
    warned = {layer["name"] for layer in data["layers"] if layer["warnings"]}
    assert warned == set(COLLAPSING)
    previous = STEPS[STEPS.index(collapse_step) - 1]
    assert verdict["last_healthy_step"] == previous
    assert verdict["last_healthy_checkpoint"] == str(tmp_path / f"checkpoint-{previous}")
    assert sorted(verdict["layers_to_smooth"]) == sorted(COLLAPSING)
    assert verdict["loss_spike_step"] == collapse_step + 50
    assert verdict["lead_steps_loss"] == 50


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_healthy_run_gets_no_warning_and_exit_0(tmp_path: Path, seed: int) -> None:
    write_run(tmp_path, STEPS, seed=seed, loss_spike_step=10**6)
    code, data = trend_json(str(tmp_path))
    assert code == 0
    assert data["verdict"]["status"] == "healthy"
    assert data["verdict"]["first_warning_step"] is None
    assert all(not layer["warnings"] for layer in data["layers"])
    assert data["verdict"]["commands"] == []


def test_layers_already_low_at_the_first_checkpoint_are_a_level_not_a_warning(
    tmp_path: Path,
) -> None:
    write_run(tmp_path, STEPS[:4], COLLAPSING, STEPS[0])  # collapsed before the first save
    result = invoke(str(tmp_path), "--quiet")
    assert result.exit_code == 0, result.output
    assert "verdict: healthy" in result.stdout
    assert "2 of 4 matrices were already below the stable-rank floor" in result.stdout
    _, data = trend_json(str(tmp_path))
    low = {layer["name"] for layer in data["layers"] if layer["low_from_start"]}
    assert low == set(COLLAPSING)


def test_embeddings_and_lm_head_collapse_without_a_warning(tmp_path: Path) -> None:
    layers = (*LAYERS, "model.embed_tokens.weight", "lm_head.weight")
    write_run(tmp_path, STEPS, (LAYERS[1], *layers[-2:]), 400, layers=layers)
    code, data = trend_json(str(tmp_path))
    assert code == 1
    assert data["verdict"]["first_warning_layers"] == [LAYERS[1]]
    assert data["verdict"]["status"] == "warning"  # one layer: not "many at once"
    assert data["verdict"]["layers_to_smooth"] == [LAYERS[1]]
    by_name = {layer["name"]: layer for layer in data["layers"]}
    assert by_name["lm_head.weight"]["stable_rank"][-1] < 3  # it did collapse, and is followed


def test_the_printed_smooth_command_runs(tmp_path: Path) -> None:
    write_run(tmp_path / "run", STEPS, COLLAPSING, 400)
    _, data = trend_json(str(tmp_path / "run"))
    command = data["verdict"]["commands"][0]
    argv = shlex.split(command)
    assert argv[:3] == ["pss", "smooth", str(tmp_path / "run" / "checkpoint-400")]
    result = CliRunner().invoke(app, [*argv[1:], "--quiet"])
    assert result.exit_code == 0, result.output
    out = Path(argv[argv.index("--out") + 1])
    assert out.is_dir()
    # The repaired checkpoint sits beside the run's checkpoints but is not taken for one.
    _, again = trend_json(str(tmp_path / "run"))
    assert again["steps"] == STEPS


def test_table_output_names_the_verdict_and_the_resume_point(tmp_path: Path) -> None:
    write_run(tmp_path, STEPS, COLLAPSING, 500, loss_spike_step=600)
    result = invoke(str(tmp_path), "--quiet")
    assert result.exit_code == 1
    out = result.stdout
    assert "verdict: COLLAPSE: first warning at step 500 (2 of 4 matrices at once)" in out
    assert f"last healthy checkpoint: {tmp_path / 'checkpoint-400'} (step 400)" in out
    assert "loss spike at step 600: warned 100 steps ahead" in out
    assert "pss smooth " in out and "--layers " + LAYERS[0] in out
    assert all(name in out for name in COLLAPSING)


def test_explicit_checkpoints_in_order(tmp_path: Path) -> None:
    paths = write_run(tmp_path, STEPS, COLLAPSING, 400)
    code, data = trend_json(*(str(p) for p in paths[2:]))
    assert code == 1
    assert data["steps"] == STEPS[2:]
    assert data["verdict"]["first_warning_step"] == 400


def test_an_unreadable_checkpoint_is_a_gap(tmp_path: Path) -> None:
    write_run(tmp_path, STEPS, COLLAPSING, 500)
    weights = tmp_path / "checkpoint-300" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    result = invoke(str(tmp_path), "--format", "json", "--quiet")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    failed = [c for c in data["checkpoints"] if c["status"] == "failed"]
    assert [c["step"] for c in failed] == [300] and "checkpoint-300" in failed[0]["error"]
    assert all(layer["stable_rank"][2] is None for layer in data["layers"])
    assert data["verdict"]["first_warning_step"] == 500
    assert "step 300: cannot scan" in result.stderr


def test_no_readable_checkpoint_at_all_exits_3(tmp_path: Path) -> None:
    for path in write_run(tmp_path, [1, 2]):
        (path / "model.safetensors").write_bytes(b"\x00" * 4)
    result = invoke(str(tmp_path), "--quiet")
    assert result.exit_code == 3
    assert "Error: none of the run's checkpoints could be scanned" in result.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--drop-fraction", "1.5"),
        ("--window", "0"),
        ("--sigma-growth", "1"),
        ("--collapse-layers", "0"),
    ],
)
def test_bad_detector_settings_are_usage_errors(tmp_path: Path, option: str, value: str) -> None:
    write_run(tmp_path, [1, 2])
    result = invoke(str(tmp_path), option, value)
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: {option}")


def test_json_is_deterministic_apart_from_timings(tmp_path: Path) -> None:
    write_run(tmp_path, STEPS, COLLAPSING, 400, loss_spike_step=450)
    _, first = trend_json(str(tmp_path), "--no-cache")
    _, second = trend_json(str(tmp_path))  # fills the cache
    _, third = trend_json(str(tmp_path))  # served from it
    for data in (first, second, third):
        data.pop("timings")
    assert first == second == third
    assert first["schema"] == "pss-trend" and first["schema_version"] == 1


# --- the cache -----------------------------------------------------------------------------------


@pytest.fixture
def count_scans(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    scanned: list[Path] = []
    real = pipeline.scan_checkpoint

    def counting(path: Path, config: ScanConfig, progress: Any = None) -> Any:
        scanned.append(path)
        return real(path, config, progress)

    monkeypatch.setattr(pipeline, "scan_checkpoint", counting)
    return scanned


def test_each_checkpoint_is_scanned_once_and_a_growing_run_only_scans_the_new_ones(
    tmp_path: Path, count_scans: list[Path]
) -> None:
    write_run(tmp_path, STEPS[:4])
    analyse_run([tmp_path], ScanConfig(), TrendConfig())
    assert len(count_scans) == 4
    report = analyse_run([tmp_path], ScanConfig(), TrendConfig())
    assert len(count_scans) == 4
    assert [c.from_cache for c in report.checkpoints] == [True] * 4
    write_run(tmp_path, STEPS[4:])  # the run went on: three new checkpoints
    count_scans.clear()
    report = analyse_run([tmp_path], ScanConfig(), TrendConfig())
    assert count_scans == [tmp_path / f"checkpoint-{step}" for step in STEPS[4:]]
    assert [c.from_cache for c in report.checkpoints] == [True] * 4 + [False] * 3


def test_a_growing_run_scans_only_its_new_checkpoints(
    tmp_path: Path, count_scans: list[Path]
) -> None:
    write_run(tmp_path, STEPS[:4], COLLAPSING, 10**6)
    analyse_run([tmp_path], ScanConfig(), TrendConfig())
    count_scans.clear()
    write_run(tmp_path, STEPS[4:], COLLAPSING, 600)  # training went on: three new saves
    report = analyse_run([tmp_path], ScanConfig(), TrendConfig())
    assert count_scans == [tmp_path / f"checkpoint-{step}" for step in STEPS[4:]]
    assert report.steps == tuple(STEPS)
    assert report.verdict.first_warning_step == 600


def test_a_changed_checkpoint_is_rescanned_even_with_same_size_and_mtime(
    tmp_path: Path, count_scans: list[Path]
) -> None:
    write_run(tmp_path, STEPS[:3], COLLAPSING, 10**6)
    analyse_run([tmp_path], ScanConfig(), TrendConfig())
    count_scans.clear()
    weights = tmp_path / "checkpoint-200" / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the data, not at the edges
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size
    report = analyse_run([tmp_path], ScanConfig(), TrendConfig())
    assert count_scans == [tmp_path / "checkpoint-200"]
    assert [c.from_cache for c in report.checkpoints] == [True, False, True]


def test_scan_settings_are_part_of_the_key(tmp_path: Path, count_scans: list[Path]) -> None:
    write_run(tmp_path, STEPS[:2])
    analyse_run([tmp_path], ScanConfig(), TrendConfig())
    analyse_run([tmp_path], ScanConfig(seed=1), TrendConfig())
    analyse_run([tmp_path], ScanConfig(exclude=("*q_proj*",)), TrendConfig())
    assert len(count_scans) == 6
    analyse_run([tmp_path], ScanConfig(), TrendConfig(drop_fraction=0.3))  # detector only
    assert len(count_scans) == 6


def test_a_corrupt_cache_entry_is_a_miss(tmp_path: Path, count_scans: list[Path]) -> None:
    write_run(tmp_path, STEPS[:2])
    first = analyse_run([tmp_path], ScanConfig(), TrendConfig())
    for entry in (tmp_path / ".pss-cache").iterdir():
        entry.write_text("{not json")
    count_scans.clear()
    again = analyse_run([tmp_path], ScanConfig(), TrendConfig())
    assert len(count_scans) == 2
    assert again.layers == first.layers


def test_no_cache_and_cache_dir(tmp_path: Path, count_scans: list[Path]) -> None:
    write_run(tmp_path / "run", STEPS[:2])
    assert invoke(str(tmp_path / "run"), "--no-cache", "-q").exit_code == 0
    assert not (tmp_path / "run" / ".pss-cache").exists()
    assert invoke(str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"), "-q").exit_code == 0
    assert len(list((tmp_path / "c").glob("scan-*.json"))) == 2
    count_scans.clear()
    assert invoke(str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"), "-q").exit_code == 0
    assert count_scans == []


def test_an_unwritable_cache_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    write_run(tmp_path / "run", STEPS[:2])
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke(str(tmp_path / "run"), "--cache-dir", str(blocker / "sub"), "-q")
    assert result.exit_code == 0, result.output
    # Once, not once per checkpoint.
    assert result.stderr.count("Warning: cannot write the scan cache") == 1


# --- plots ---------------------------------------------------------------------------------------


def test_png_svg_and_html_plots(tmp_path: Path) -> None:
    write_run(tmp_path / "run", STEPS, COLLAPSING, 400, loss_spike_step=450)
    for suffix in ("png", "svg", "html"):
        plot = tmp_path / f"trend.{suffix}"
        result = invoke(str(tmp_path / "run"), "--plot", str(plot), "-q")
        assert result.exit_code == 1, result.output
        data = plot.read_bytes()
        if suffix == "png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
        elif suffix == "svg":
            assert b"<svg" in data[:2000]
        else:
            text = data.decode()
            assert text.startswith("<!DOCTYPE html>") and "<svg" in text
            assert "first warning at step 400" in text
            assert "http://" not in text.split("<svg", 1)[0]  # no external resources


def test_a_healthy_run_without_log_still_plots(tmp_path: Path) -> None:
    write_run(tmp_path / "run", STEPS[:3])
    plot = tmp_path / "trend.png"
    assert invoke(str(tmp_path / "run"), "--plot", str(plot), "-q").exit_code == 0
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_bad_plot_path_is_refused_before_scanning(tmp_path: Path, count_scans: list[Path]) -> None:
    write_run(tmp_path / "run", STEPS[:2])
    result = invoke(str(tmp_path / "run"), "--plot", str(tmp_path / "trend.jpg"))
    assert result.exit_code == 2 and "unknown file type" in result.output
    result = invoke(str(tmp_path / "run"), "--plot", str(tmp_path / "missing" / "t.png"))
    assert result.exit_code == 2
    assert count_scans == []


def test_missing_matplotlib_is_a_clear_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    write_run(tmp_path / "run", STEPS[:2])
    result = invoke(str(tmp_path / "run"), "--plot", str(tmp_path / "t.png"))
    assert result.exit_code == 2
    assert "Error: --plot needs matplotlib" in result.output
    assert "pip install 'pss-checkpoint[plot]'" in result.output


# --- hostile inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        "[" * 100_000,  # nested deeper than json's recursion limit
        "not json",
        json.dumps([1, 2, 3]),
        json.dumps({"global_step": "x", "log_history": "nope"}),
        json.dumps({"log_history": [None, {"step": "1", "loss": 2}, {"step": 3, "loss": "NaN"}]}),
    ],
)
def test_a_bad_trainer_state_is_ignored_not_fatal(tmp_path: Path, state: str) -> None:
    paths = write_run(tmp_path, STEPS[:3])
    (paths[-1] / "trainer_state.json").write_text(state)
    code, data = trend_json(str(tmp_path))
    assert code == 0
    assert data["log"] == [] and data["log_source"] is None


def test_a_fifo_trainer_state_is_not_opened(tmp_path: Path) -> None:
    paths = write_run(tmp_path, STEPS[:2])
    os.mkfifo(paths[-1] / "trainer_state.json")  # opening it for reading would block forever
    code, data = trend_json(str(tmp_path))
    assert code == 0 and data["log"] == []


def test_control_characters_in_tensor_names_cannot_forge_output_lines(tmp_path: Path) -> None:
    evil = "evil\n\x1b[31mverdict: healthy.weight"
    layers = (*LAYERS, evil)
    write_run(tmp_path, STEPS[:5], (evil, LAYERS[0]), 400, layers=layers)
    result = invoke(str(tmp_path), "--quiet")
    assert result.exit_code == 1
    assert "\x1b" not in result.stdout
    assert not any(line.startswith("verdict: healthy") for line in result.stdout.splitlines())
    assert "evil\\n\\x1b[31mverdict: healthy.weight" in result.stdout
    _, data = trend_json(str(tmp_path))
    assert evil in data["verdict"]["layers_to_smooth"]  # JSON keeps the exact name


def test_a_compute_failure_on_one_checkpoint_is_a_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pss_cli.errors import ComputeError

    write_run(tmp_path, STEPS[:4], COLLAPSING, 10**6)
    real = pipeline.scan_checkpoint

    def failing(path: Path, config: ScanConfig, progress: Any = None) -> Any:
        if path.name == "checkpoint-200":
            raise ComputeError("the solver failed on 'x'", "report it")
        return real(path, config, progress)

    monkeypatch.setattr(pipeline, "scan_checkpoint", failing)
    report = analyse_run([tmp_path], ScanConfig(), TrendConfig(), use_cache=False)
    assert [c.status for c in report.checkpoints] == ["ok", "failed", "ok", "ok"]
    assert (
        report.checkpoints[1].error is not None and "solver failed" in report.checkpoints[1].error
    )
    assert report.verdict.status == "healthy"


def _decaying(n: int, decay: float, spike: float, seed: int) -> Any:
    """(n, n) matrix with singular values exp(-i / decay), sigma_1 raised by `spike`."""
    import torch

    s = torch.exp(-torch.arange(n, dtype=torch.float64) / decay)
    s[0] += spike
    return with_spectrum(n, n, s, seed).float().contiguous()


def test_layers_to_smooth_include_collapses_that_start_below_the_floor(tmp_path: Path) -> None:
    # A small model's matrices can sit below the floor from the start (SR ~2-3): their collapse
    # to rank one is no `floor` event, only sigma_max growth. Before, one layer crossing the
    # floor made the recipe drop them, leaving rank-1 matrices in the repaired checkpoint.
    from safetensors.torch import save_file

    below = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight")
    crosses = "model.layers.0.self_attn.q_proj.weight"
    grows_healthy = "model.layers.1.self_attn.q_proj.weight"  # sigma grows, SR stays high
    for step in STEPS[:5]:
        bad = step >= 400
        tensors = {
            below[0]: _decaying(64, 4.0, 30.0 if bad else 0.0, 1),
            below[1]: _decaying(64, 2.0, 30.0 if bad else 0.0, 2),
            crosses: _decaying(64, 13.0, 30.0 if bad else 0.0, 3),
            grows_healthy: _decaying(64, 40.0, 0.0, 4) * (4.0 if bad else 1.0),
        }
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
    _, data = trend_json(str(tmp_path))
    verdict = data["verdict"]
    assert verdict["first_warning_step"] == 400
    assert grows_healthy in verdict["first_warning_layers"]  # it warned (sigma growth) ...
    assert sorted(verdict["layers_to_smooth"]) == sorted([*below, crosses])  # ... not smoothed


def test_an_incomplete_trainer_checkpoint_is_named_in_the_recipe_and_by_smooth(
    tmp_path: Path,
) -> None:
    # Trainer writes the weights first and trainer_state.json last: a trend run in between
    # picked the half-written folder to repair without a word, and the resume failed.
    run = tmp_path / "run"
    write_run(run, STEPS[:5], COLLAPSING, 500, loss_spike_step=10**6)
    (run / "checkpoint-500" / "trainer_state.json").unlink()
    _, data = trend_json(str(run))
    verdict = data["verdict"]
    assert verdict["repair_checkpoint"] == str(run / "checkpoint-500")
    assert any("checkpoint-500" in c and "trainer_state.json" in c for c in verdict["commands"][1:])
    result = CliRunner().invoke(
        app, ["smooth", str(run / "checkpoint-500"), "--out", str(tmp_path / "out"), "--all"]
    )
    assert result.exit_code == 0, result.output
    assert "trainer_state.json" in result.stdout and "resume_from_checkpoint fails" in result.stdout
    # A run that never wrote trainer_state.json (save_pretrained alone) gets no such note.
    plain = tmp_path / "plain"
    write_run(plain, STEPS[:5], COLLAPSING, 500)
    _, without = trend_json(str(plain))
    assert without["verdict"]["repair_checkpoint"] == str(plain / "checkpoint-500")
    assert not any("trainer_state" in c for c in without["verdict"]["commands"])


def test_a_wrapper_prefix_turned_on_mid_run_is_one_series(tmp_path: Path) -> None:
    # torch.compile switched on after a resume saves `_orig_mod.`-prefixed names: the matrices
    # became new series whose first point was already collapsed ("low from the start"), and
    # the collapse read as healthy (exit 0).
    write_run(tmp_path, STEPS[:3])
    compiled = tuple(name.replace("model.", "_orig_mod.model.", 1) for name in LAYERS)
    write_run(
        tmp_path, STEPS[3:5], (compiled[0], compiled[3]), STEPS[3], layers=compiled, spike=12.0
    )
    code, data = trend_json(str(tmp_path))
    assert code == 1 and data["verdict"]["first_warning_step"] == STEPS[3]
    assert len(data["layers"]) == len(LAYERS)  # one series per matrix
    # The recipe names the matrices as the repair checkpoint stores them.
    assert sorted(data["verdict"]["layers_to_smooth"]) == sorted([compiled[0], compiled[3]])


def test_accelerate_and_olmo_core_step_folders(tmp_path: Path) -> None:
    # accelerate's automatic naming: checkpoints/checkpoint_N ("no checkpoints found" before).
    write_run(tmp_path / "acc", [0, 1, 2, 3], COLLAPSING, 3, naming="checkpoint_{step}")
    _, data = trend_json(str(tmp_path / "acc"))
    assert data["steps"] == [0, 1, 2, 3] and data["verdict"]["first_warning_step"] == 3
    # OLMo-core: stepN/model_and_optim/ holds the DCP checkpoint.
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    for step in (100, 200):
        tensors = load_file(
            str(tmp_path / "acc" / f"checkpoint_{step // 100}" / "model.safetensors")
        )
        dcp.save(
            {"model": tensors},
            checkpoint_id=str(tmp_path / "olmo" / f"step{step}" / "model_and_optim"),
        )
    (tmp_path / "olmo" / "step100" / "train").mkdir()  # the trainer state beside it
    _code, data = trend_json(str(tmp_path / "olmo"))
    assert data["steps"] == [100, 200]
    assert all(c["status"] == "ok" for c in data["checkpoints"])


def test_lightning_names_with_metrics_and_versions(tmp_path: Path) -> None:
    import torch

    def save(name: str, step: int, spike: float) -> None:
        weight = {
            "model.layers.0.mlp.up_proj.weight": with_spectrum(
                48, 64, spiky(48, (spike,)), 1
            ).float()
        }
        torch.save({"state_dict": weight, "global_step": step}, tmp_path / name)

    save("epoch=0-step=10-val_loss=1.08.ckpt", 10, 1.0)
    save("epoch=1-step=20-val_loss=0.95.ckpt", 20, 1.0)
    save("epoch=1-step=20-val_loss=0.95-v1.ckpt", 20, 9.0)  # a resumed run saved step 20 again
    _code, data = trend_json(str(tmp_path))
    assert data["steps"] == [10, 20]
    last = next(c for c in data["checkpoints"] if c["step"] == 20)
    assert last["path"].endswith("-v1.ckpt")  # the newest save of the step


def test_the_same_checkpoint_named_twice_counts_once(tmp_path: Path) -> None:
    write_run(tmp_path, STEPS[:2])
    a, b = str(tmp_path / "checkpoint-100"), str(tmp_path / "checkpoint-200")
    _, data = trend_json(a, b, a + "/")
    assert data["steps"] == [100, 200]
