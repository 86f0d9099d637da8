"""The CI integration files parse, and the `pss check` commands they run work on the samples."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pss_cli.app import app

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / ".pre-commit-hooks.yaml"
WORKFLOW = ROOT / "docs" / "github-actions-pss-check.yml"
SAMPLES = ROOT / "sample_checkpoints"
HEALTHY = SAMPLES / "healthy" / "model.safetensors"
DIVERGED = SAMPLES / "diverged" / "model.safetensors"


def _yaml(path: Path) -> Any:
    # PyYAML is not a declared dependency (CI installs only .[dev]); the hand-checks below run
    # everywhere, the full parse where PyYAML is present.
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: full YAML parse skipped")
    return yaml.safe_load(path.read_text())


def _hook_entry() -> str:
    match = re.search(r"^  entry: (.+)$", HOOKS.read_text(), re.M)
    assert match, "no entry line in .pre-commit-hooks.yaml"
    return match.group(1).strip()


def _run(argv: list[str]) -> int:
    assert argv[0] == "pss"
    return CliRunner().invoke(app, argv[1:]).exit_code


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PSS_MIN_STABLE_RANK", "PSS_FAIL_ON", "PSS_IGNORE", "GITHUB_STEP_SUMMARY"):
        monkeypatch.delenv(name, raising=False)


def test_pre_commit_hook_file_parses() -> None:
    (hook,) = _yaml(HOOKS)
    assert hook["id"] == "pss-check"
    assert hook["entry"] == _hook_entry()
    assert hook["language"] == "python" and hook["pass_filenames"] is True
    assert re.search(hook["files"], "models/model.safetensors")
    assert not re.search(hook["files"], "README.md")


def test_pre_commit_hook_command_works_on_the_samples() -> None:
    entry = shlex.split(_hook_entry())  # pre-commit appends the changed file names
    assert _run([*entry, str(HEALTHY)]) == 0
    assert _run([*entry, str(HEALTHY), str(DIVERGED)]) == 1


def _workflow_commands(model: Path) -> list[list[str]]:
    text = WORKFLOW.read_text()
    lines = re.findall(r"^\s+run: (pss .+)$", text, re.M)
    assert lines, "no `run: pss ...` step in the workflow"
    return [shlex.split(line.replace('"$MODEL"', shlex.quote(str(model)))) for line in lines]


def test_workflow_parses() -> None:
    workflow = _yaml(WORKFLOW)
    steps = workflow["jobs"]["gate"]["steps"]
    runs = [s["run"].strip() for s in steps if str(s.get("run", "")).startswith("pss ")]
    assert len(runs) == len(_workflow_commands(HEALTHY))
    assert workflow["permissions"]["security-events"] == "write"
    assert any(s.get("uses", "").startswith("github/codeql-action/upload-sarif") for s in steps)
    assert (ROOT / workflow["env"]["MODEL"]).is_file()


@pytest.mark.parametrize(("model", "gate_code"), [(HEALTHY, 0), (DIVERGED, 1)])
def test_workflow_commands_work_on_the_samples(
    model: Path, gate_code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    *steps, gate = _workflow_commands(model)
    for argv in steps:
        assert _run(argv) == 0, argv  # scan and SARIF (--exit-zero) never fail the job
    assert (tmp_path / "pss.sarif").is_file()
    assert _run(gate) == gate_code
    assert (tmp_path / "summary.md").read_text().startswith("## pss check")
