"""`pss trend` overlays the guard's JSONL event log: JSON, table, and markers on --plot."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.config import ScanConfig, TrendConfig
from pss_cli.trend.analysis import analyse_run
from pss_cli.trend.guard_log import GUARD_LOG_NAME, read_guard_log
from tests.trend_factory import write_run

STEPS = [10, 20, 30, 40]


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["trend", *args], terminal_width=200)


def write_log(path: Path, records: list[Any], header: bool = True) -> Path:
    lines: list[Any] = []
    if header:
        lines.append({"schema": "pss-guard-events", "version": 1, "config": {}, "started": "x"})
    lines.extend(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return path


# A spike at guard step 14 (the 15th optimizer step) smoothed and skipped; a log-only z-score
# trigger at guard step 24; decisions in between.
RECORDS: list[dict[str, Any]] = [
    {"step": 13, "kind": "decision", "grad_norm": 1.0, "skipped": False, "triggered": False},
    {"step": 14, "kind": "trigger", "reason": "grad norm 9.1 > 2.5 x EMA 1.2", "rule": "spike"},
    {"step": 14, "kind": "smooth", "reason": "smoothed 4 matrices", "matrices": 4},
    {"step": 14, "kind": "skip", "reason": "grad norm 9.1 > 2.5 x EMA 1.2"},
    {"step": 14, "kind": "decision", "grad_norm": 9.1, "skipped": True, "triggered": True},
    {"step": 24, "kind": "trigger", "reason": "z-score 3.1 > 2.5", "rule": "zscore"},
    {"step": 29, "kind": "decision", "grad_norm": 1.1, "skipped": False, "triggered": False},
]


def test_the_run_folders_log_is_found_and_reported_in_json(tmp_path: Path) -> None:
    write_run(tmp_path / "run", STEPS)
    write_log(tmp_path / "run" / GUARD_LOG_NAME, RECORDS)
    result = invoke(str(tmp_path / "run"), "--format", "json", "-q")
    assert result.exit_code == 0, result.output
    guard = json.loads(result.stdout)["guard"]
    assert guard["source"] == str(tmp_path / "run" / GUARD_LOG_NAME)
    assert guard["counts"] == {"trigger": 2, "skip": 1, "smooth": 1, "nonfinite": 0, "raise": 0}
    assert guard["skipped_train_steps"] == [15]
    assert guard["last_step"] == 29
    kinds = [(e["step"], e["train_step"], e["kind"]) for e in guard["events"]]
    assert kinds == [(14, 15, "trigger"), (14, 15, "skip"), (14, 15, "smooth"), (24, 25, "trigger")]
    # The log file is not mistaken for a checkpoint.
    assert [c["step"] for c in json.loads(result.stdout)["checkpoints"]] == STEPS


def test_without_a_log_the_field_is_null(tmp_path: Path) -> None:
    write_run(tmp_path / "run", STEPS[:2])
    result = invoke(str(tmp_path / "run"), "--format", "json", "-q")
    assert json.loads(result.stdout)["guard"] is None


def test_table_names_skips_and_the_first_trigger(tmp_path: Path) -> None:
    write_run(tmp_path / "run", STEPS)
    log = write_log(tmp_path / "elsewhere.jsonl", RECORDS)
    result = invoke(str(tmp_path / "run"), "--guard-log", str(log), "-q")
    assert result.exit_code == 0, result.output
    assert "guard log: 2 triggers, 1 skipped step, 1 smoothing" in result.stdout
    assert "skipped optimizer steps: 15" in result.stdout
    assert "first trigger at step 15: grad norm 9.1 > 2.5 x EMA 1.2" in result.stdout


def test_a_resumed_log_with_two_headers_counts_repeats_once(tmp_path: Path) -> None:
    header = {"schema": "pss-guard-events", "version": 1}
    log = write_log(tmp_path / "g.jsonl", [*RECORDS[:4], header, *RECORDS[2:], "not json"])
    overlay = read_guard_log(log)
    assert overlay.count("skip") == 1 and overlay.count("trigger") == 2
    assert overlay.bad_lines == 1


def test_missing_and_foreign_logs_are_clear_errors(tmp_path: Path) -> None:
    write_run(tmp_path / "run", STEPS[:2])
    result = invoke(str(tmp_path / "run"), "--guard-log", str(tmp_path / "nope.jsonl"), "-q")
    assert result.exit_code == 2 and "no such file" in result.output
    foreign = write_log(tmp_path / "other.jsonl", RECORDS, header=False)
    result = invoke(str(tmp_path / "run"), "--guard-log", str(foreign), "-q")
    assert result.exit_code == 3 and "is not a pss guard event log" in result.output


def test_plot_marks_skipped_and_flagged_steps(tmp_path: Path) -> None:
    from pss_cli.report.trend_figure import draw

    write_run(tmp_path / "run", STEPS, loss_spike_step=35)
    log = write_log(tmp_path / "run" / GUARD_LOG_NAME, RECORDS)
    report = analyse_run([tmp_path / "run"], ScanConfig(), TrendConfig(), use_cache=False)
    figure = draw(replace(report, guard=read_guard_log(log)))
    ax_sr = figure.axes[0]
    vertical = {
        (round(line.get_xdata()[0]), line.get_color())
        for line in ax_sr.get_lines()
        if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2
    }
    assert (15, "tab:purple") in vertical and (25, "tab:olive") in vertical
    labels = ax_sr.get_legend_handles_labels()[1]
    assert "guard skipped (1 steps)" in labels and "guard flagged (1 steps)" in labels
    plot = tmp_path / "trend.png"
    result = invoke(str(tmp_path / "run"), "--plot", str(plot), "-q")
    assert result.exit_code in (0, 1), result.output
    assert plot.read_bytes().startswith(b"\x89PNG")
