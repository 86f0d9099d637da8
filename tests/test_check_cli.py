"""`pss check` through the CLI: exit codes, every output format, baselines, config, CI outputs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.report.check_formats import CheckFormat
from tests.test_check import layer

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
HEALTHY = SAMPLES / "healthy" / "model.safetensors"
DIVERGED = SAMPLES / "diverged" / "model.safetensors"
COLLAPSED = {
    "transformer.h.2.mlp.c_fc.weight",
    "transformer.h.3.attn.c_attn.weight",
    "transformer.h.3.mlp.c_fc.weight",
}

# The part of the SARIF 2.1.0 schema (json.schemastore.org/sarif-2.1.0.json) that GitHub code
# scanning relies on: the full schema is ~150 kB; this keeps its names and required fields.
SARIF_SUBSET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["version", "runs", "$schema"],
    "properties": {
        "version": {"const": "2.1.0"},
        "runs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["tool", "results"],
                "properties": {
                    "tool": {
                        "type": "object",
                        "required": ["driver"],
                        "properties": {
                            "driver": {
                                "type": "object",
                                "required": ["name", "version", "rules"],
                                "properties": {
                                    "rules": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["id", "shortDescription", "help"],
                                        },
                                    }
                                },
                            }
                        },
                    },
                    "results": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "ruleId",
                                "level",
                                "message",
                                "locations",
                                "partialFingerprints",
                            ],
                            "properties": {
                                "level": {"enum": ["none", "note", "warning", "error"]},
                                "message": {"type": "object", "required": ["text"]},
                                "locations": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["physicalLocation"],
                                        "properties": {
                                            "physicalLocation": {
                                                "type": "object",
                                                "required": ["artifactLocation", "region"],
                                                "properties": {
                                                    "artifactLocation": {
                                                        "type": "object",
                                                        "required": ["uri"],
                                                    },
                                                    "region": {
                                                        "type": "object",
                                                        "required": ["startLine"],
                                                        "properties": {
                                                            "startLine": {
                                                                "type": "integer",
                                                                "minimum": 1,
                                                            }
                                                        },
                                                    },
                                                },
                                            }
                                        },
                                    },
                                },
                                "partialFingerprints": {
                                    "type": "object",
                                    "minProperties": 1,
                                    "additionalProperties": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PSS_* settings or GitHub summary from the outer environment, no stray pss.toml."""
    for name in ("PSS_MIN_STABLE_RANK", "PSS_FAIL_ON", "PSS_IGNORE", "GITHUB_STEP_SUMMARY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "pss.toml").write_text("")  # stops the upward search inside tmp_path
    monkeypatch.chdir(tmp_path)


def saved_report(path: Path, *layers: dict[str, Any]) -> Path:
    path.write_text(
        json.dumps({"schema_version": 1, "checkpoint": "m.safetensors", "layers": list(layers)})
    )
    return path


def rule_ids(output: str) -> set[str]:
    return set(re.findall(r"PSS\d{3}", output))


def test_healthy_passes_and_diverged_fails(runner: CliRunner) -> None:
    ok = runner.invoke(app, ["check", str(HEALTHY)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("pss check passed: 0 errors, 0 warnings in 18 matrices")
    bad = runner.invoke(app, ["check", str(DIVERGED)])
    assert bad.exit_code == 1
    errors = [line for line in bad.stdout.splitlines() if "[error]" in line]
    assert {line.split(": ")[1] for line in errors} == COLLAPSED
    assert all("PSS003" in line for line in errors)


@pytest.mark.parametrize("fmt", list(CheckFormat))
def test_every_format_fails_the_diverged_sample_with_pss003(runner: CliRunner, fmt: str) -> None:
    result = runner.invoke(app, ["check", str(DIVERGED), "--format", fmt])
    assert result.exit_code == 1
    assert {"PSS003", "PSS005", "PSS006"} <= rule_ids(result.stdout)
    if fmt in ("json", "sarif"):
        json.loads(result.stdout)
    if fmt == "junit":
        ET.fromstring(result.stdout)
    if fmt != "text":  # the verdict also goes to stderr, the result alone to stdout
        assert result.stderr.startswith("pss check failed: 3 errors, 6 warnings")


def test_json_format(runner: CliRunner) -> None:
    data = json.loads(runner.invoke(app, ["check", str(DIVERGED), "-f", "json"]).stdout)
    assert data["command"] == "check" and data["passed"] is False
    assert data["summary"] == {"errors": 3, "warnings": 6, "matrices": 18}
    assert {f["tensor"] for f in data["findings"] if f["rule"] == "PSS003"} == COLLAPSED


def test_sarif_has_what_github_needs(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # relative path on the command line -> relative artifact URIs
    rel = DIVERGED.relative_to(ROOT)
    sarif = json.loads(runner.invoke(app, ["check", str(rel), "-f", "sarif"]).stdout)
    assert sarif["version"] == "2.1.0" and "sarif-2.1.0" in sarif["$schema"]
    (run,) = sarif["runs"]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == [f"PSS{i:03d}" for i in range(1, 11)]
    assert all(r["shortDescription"]["text"] and r["help"]["text"] for r in rules)
    for res in run["results"]:
        location = res["locations"][0]["physicalLocation"]
        assert location["artifactLocation"]["uri"] == rel.as_posix()
        assert location["region"]["startLine"] == 1
        assert res["level"] in ("error", "warning", "note")
        assert res["message"]["text"]
        assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
        assert re.fullmatch(r"[0-9a-f]{64}", res["partialFingerprints"]["pssFinding/v1"])
    fingerprints = [r["partialFingerprints"]["pssFinding/v1"] for r in run["results"]]
    assert len(set(fingerprints)) == len(fingerprints) == 9
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed")
    jsonschema.validate(sarif, SARIF_SUBSET_SCHEMA)


def test_junit_one_case_per_file_and_rule(runner: CliRunner) -> None:
    root = ET.fromstring(runner.invoke(app, ["check", str(DIVERGED), "-f", "junit"]).stdout)
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == 10  # one file x 10 rules
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["PSS003 low-stable-rank"]  # warnings are below --fail-on error
    assert root.get("failures") == "1"


def test_github_annotations_are_capped(runner: CliRunner, tmp_path: Path) -> None:
    layers = [layer(f"e{i}", stable_rank=1.0, sigma1_over_sigma2=1.0) for i in range(15)]
    layers += [layer(f"w{i}", sigma1_over_sigma2=9.0) for i in range(12)]
    path = saved_report(tmp_path / "r.json", *layers)
    out = runner.invoke(app, ["check", str(path), "-f", "github"]).stdout.splitlines()
    assert sum(line.startswith("::error file=") for line in out) == 10
    assert sum(line.startswith("::warning file=") for line in out) == 10
    (notice,) = [line for line in out if line.startswith("::notice")]
    assert "7 more findings" in notice
    first = next(line for line in out if line.startswith("::error"))
    assert first == "::error file=model.safetensors,title=PSS003::e0: stable rank 1.00 below 5"


def test_github_step_summary_is_appended(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = runner.invoke(app, ["check", str(DIVERGED), "-f", "github"])
    assert result.exit_code == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n## pss check failed")
    assert text.count("| error | PSS003 |") == 3
    runner.invoke(app, ["check", str(DIVERGED), "-f", "text"])
    assert summary.read_text() == text  # only the github format writes the summary


def test_markdown_table(runner: CliRunner) -> None:
    out = runner.invoke(app, ["check", str(HEALTHY), "-f", "markdown"]).stdout
    assert out.startswith("## pss check passed") and "No findings." in out


def test_output_file_matches_stdout(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "out.sarif"
    result = runner.invoke(app, ["check", str(DIVERGED), "-f", "sarif", "-o", str(target)])
    assert result.exit_code == 1 and target.read_text() == result.stdout
    missing = runner.invoke(app, ["check", str(DIVERGED), "-o", str(tmp_path / "no" / "x")])
    assert missing.exit_code == 2


def test_fail_on_and_exit_zero(runner: CliRunner, tmp_path: Path) -> None:
    path = saved_report(tmp_path / "r.json", layer(sigma1_over_sigma2=9.0))
    assert runner.invoke(app, ["check", str(path)]).exit_code == 0  # a warning only
    assert runner.invoke(app, ["check", str(path), "--fail-on", "warning"]).exit_code == 1
    assert runner.invoke(app, ["check", str(DIVERGED), "--exit-zero"]).exit_code == 0
    assert runner.invoke(app, ["check", str(path), "--fail-on", "fatal"]).exit_code == 2


def test_precedence_through_the_cli(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pss.toml").write_text("min_stable_rank = 1.3\n")  # 1.27 still fails, 1.33 not
    out = runner.invoke(app, ["check", str(DIVERGED), "-f", "json"]).stdout
    assert [f["tensor"] for f in json.loads(out)["findings"] if f["rule"] == "PSS003"] == [
        "transformer.h.3.mlp.c_fc.weight"
    ]
    monkeypatch.setenv("PSS_MIN_STABLE_RANK", "1.0")  # env beats the file: all pass
    assert runner.invoke(app, ["check", str(DIVERGED)]).exit_code == 0
    flag = runner.invoke(app, ["check", str(DIVERGED), "--min-stable-rank", "5"])  # flag beats env
    assert flag.exit_code == 1


def test_config_errors_exit_2_naming_the_key(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "pss.toml").write_text("[roles.mlp_up]\nmin_stable_rnak = 2\n")
    result = runner.invoke(app, ["check", str(HEALTHY)])
    assert result.exit_code == 2
    assert "unknown key 'roles.mlp_up.min_stable_rnak'" in result.stderr
    assert result.stdout == ""


def test_baseline_through_the_cli(runner: CliRunner, tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    scan = runner.invoke(app, ["scan", str(HEALTHY), "-f", "json", "-o", str(base), "-q"])
    assert scan.exit_code == 0
    data = json.loads(
        runner.invoke(app, ["check", str(DIVERGED), "--baseline", str(base), "-f", "json"]).stdout
    )
    assert {f["tensor"] for f in data["findings"] if f["rule"] == "PSS007"} == COLLAPSED
    assert {f["tensor"] for f in data["findings"] if f["rule"] == "PSS008"} == COLLAPSED
    same = runner.invoke(app, ["check", str(HEALTHY), "--baseline", str(base)])
    assert same.exit_code == 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 99}')
    wrong = runner.invoke(app, ["check", str(HEALTHY), "--baseline", str(bad)])
    assert wrong.exit_code == 2 and "schema_version 99" in wrong.stderr
    folder = runner.invoke(app, ["check", str(HEALTHY), "--baseline", str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder, not a scan report" in folder.stderr
    assert "Hint: " in folder.stderr


def test_unreadable_checkpoints_are_pss002_findings(runner: CliRunner, tmp_path: Path) -> None:
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(HEALTHY.read_bytes()[:-100])
    sharded = tmp_path / "sharded"
    shutil.copytree(SAMPLES / "sharded", sharded)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    for path in (truncated, sharded, tmp_path / "absent.safetensors"):
        result = runner.invoke(app, ["check", str(path)])
        assert result.exit_code == 1, result.output
        assert result.stdout.startswith(f"{path}: -: PSS002 [error] ")
        assert "Traceback" not in result.output


def test_saved_report_input_does_not_import_torch(tmp_path: Path) -> None:
    report = saved_report(tmp_path / "r.json", layer(stable_rank=1.0))
    code = (
        "import sys; from pss_cli.app import app\n"
        f"try:\n    app(['check', {str(report)!r}, '-f', 'sarif'])\n"
        "except SystemExit as exc:\n    assert exc.code == 1, exc.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "PSS003" in done.stdout


def test_scan_once_gate_many(runner: CliRunner, tmp_path: Path) -> None:
    report = tmp_path / "diverged.json"
    runner.invoke(app, ["scan", str(DIVERGED), "-f", "json", "-o", str(report), "-q"])
    from_report = runner.invoke(app, ["check", str(report), "-f", "json"])
    from_checkpoint = runner.invoke(app, ["check", str(DIVERGED), "-f", "json"])
    a, b = json.loads(from_report.stdout), json.loads(from_checkpoint.stdout)
    assert (a["input"], b["input"]) == ("report", "checkpoint")
    assert a["findings"] == b["findings"]


def test_readme_example_matches(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    docs = [(ROOT / name).read_text() for name in ("README.md", "docs/check.md")]
    argv = [
        "check",
        "sample_checkpoints/diverged/model.safetensors",
        "--ignore",
        "PSS005",
        "--ignore",
        "PSS006",
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 1
    for text in docs:
        assert f"$ pss {' '.join(argv)}\n{result.stdout}```" in text


def test_nan_weights_are_pss001(runner: CliRunner, tmp_path: Path) -> None:
    import torch

    from tests.safetensors_factory import write_tensors

    weights = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    weights[3, 4] = float("nan")
    path = write_tensors(tmp_path / "nan.safetensors", {"h.0.mlp.c_fc.weight": weights})
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1
    assert "h.0.mlp.c_fc.weight: PSS001 [error] 1 non-finite entries (NaN/Inf)" in result.stdout


def test_unknown_rule_on_the_command_line_exits_2(runner: CliRunner) -> None:
    result = runner.invoke(app, ["check", str(HEALTHY), "--ignore", "PSS42"])
    assert result.exit_code == 2 and "unknown rule 'PSS42'" in result.stderr


def test_check_output_never_overwrites_the_checkpoint(tmp_path: Path) -> None:
    victim = tmp_path / "m.safetensors"
    shutil.copy(
        Path(__file__).resolve().parent.parent
        / "sample_checkpoints"
        / "healthy"
        / "model.safetensors",
        victim,
    )
    before = victim.read_bytes()
    result = CliRunner().invoke(app, ["check", str(victim), "-o", str(victim)])
    assert result.exit_code == 2
    assert victim.read_bytes() == before


def _scan_json(tmp_path: Path, name: str, tensors: dict) -> Path:
    from pss_cli.config import ScanConfig
    from pss_cli.pipeline import scan_checkpoint
    from pss_cli.report.json_report import render_json
    from tests.safetensors_factory import write_tensors

    checkpoint = write_tensors(tmp_path / f"{name}.safetensors", tensors)
    report = tmp_path / f"{name}.json"
    report.write_text(render_json(scan_checkpoint(checkpoint, ScanConfig())))
    return report


def test_review_regressions(tmp_path: Path) -> None:
    import torch

    runner = CliRunner()
    g = torch.Generator().manual_seed(0)
    # A hand-edited report with a wrong type is a usage error, not an internal error.
    report = _scan_json(tmp_path, "m", {"w": torch.randn(8, 8, generator=g)})
    data = json.loads(report.read_text())
    data["seed"] = "abc"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 2 and "internal error" not in result.stderr
    # A checkpoint given as --baseline gets a hint, not a codec error.
    checkpoint = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["check", str(report), "--baseline", str(checkpoint)])
    assert result.exit_code == 2 and "not a JSON scan report" in result.stderr
    # A baseline value near 0 makes the change infinite: no crash in JSON or SARIF.
    tiny = json.loads(report.read_text())
    tiny["layers"][0]["sigma_max"] = 5e-324
    base = tmp_path / "tiny.json"
    base.write_text(json.dumps(tiny))
    for fmt in ("json", "sarif"):
        result = runner.invoke(app, ["check", str(report), "--baseline", str(base), "-f", fmt])
        assert result.exit_code in (0, 1) and json.loads(result.stdout)
    # A model with nothing to analyse does not pass.
    empty = _scan_json(tmp_path, "empty", {"bias": torch.ones(4)})
    result = runner.invoke(app, ["check", str(empty), "-f", "junit"])
    assert result.exit_code == 1 and "PSS002" in result.stdout
    assert ET.fromstring(result.stdout.split("\n", 1)[1]).get("failures") == "1"
    # Control characters in a tensor name keep JUnit well-formed.
    odd = _scan_json(tmp_path, "odd", {"c\x01d": torch.ones(8, 8)})
    result = runner.invoke(app, ["check", str(odd), "-f", "junit"])
    ET.fromstring(result.stdout.split("\n", 1)[1])


def test_malformed_ignore_list_is_a_usage_error(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "pss.toml").write_text("ignore = [[1]]\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["check", str(HEALTHY)])
    assert result.exit_code == 2 and "'ignore'" in result.stderr


@pytest.mark.parametrize("name", ["sd.pt", "run.ckpt", "weights"])
def test_a_single_torch_file_is_its_own_artifact(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A .pt/.ckpt (or suffix-less torch file) is one artifact: findings, JSON, SARIF and the
    # GitHub annotations name it, not "sd.pt/sd.pt" (a path that does not exist).
    import torch
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    torch.save(load_file(DIVERGED), name)
    data = json.loads(runner.invoke(app, ["check", name, "-f", "json"]).stdout)
    assert data["passed"] is False and data["findings"]
    assert {finding["file"] for finding in data["findings"]} == {name}
    sarif = json.loads(runner.invoke(app, ["check", name, "-f", "sarif"]).stdout)
    uris = {
        result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        for result in sarif["runs"][0]["results"]
    }
    assert uris == {name}
    github = runner.invoke(app, ["check", name, "-f", "github"]).stdout
    assert f"file={name}," in github and f"{name}/{name}" not in github


def test_single_file_layouts_are_the_formats_single_file_kinds() -> None:
    from pss_cli.checkpoint.formats.safetensors.format import SafetensorsKind
    from pss_cli.checkpoint.formats.torch.format import TorchKind
    from pss_cli.gate_findings import SINGLE_FILE_LAYOUTS

    assert {SafetensorsKind.SINGLE_FILE, TorchKind.FILE} == SINGLE_FILE_LAYOUTS


def test_a_per_tensor_key_that_matches_nothing_is_warned_about(
    runner: CliRunner, tmp_path: Path
) -> None:
    # A typo in a CI policy's per-tensor key configured nothing, silently.
    policy = tmp_path / "pss.toml"
    policy.write_text(
        '[per-tensor-ignores]\n"transformer.h.3.mlp.c_fc.weight" = ["PSS003"]\n'
        '"transformer.h.3.mpl.*" = ["PSS003"]\n'
    )
    result = runner.invoke(app, ["check", str(DIVERGED), "--config", str(policy)])
    assert result.exit_code == 1  # the other collapsed matrices still fail
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == [
        "Warning: the policy's per-tensor key 'transformer.h.3.mpl.*' matches no analysed "
        "matrix (a typo, or a tensor pss skips?): it configures nothing"
    ]
