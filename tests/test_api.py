"""The library API (pss_cli.scan/smooth/check/trend, docs/API.md) returns what the CLI renders:
each function's result, in its JSON form, equals `pss <command> --format json` on the same
input (timings aside, the one run-dependent field)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import pss_cli
from pss_cli.app import app
from pss_cli.errors import UsageError
from pss_cli.gate import CheckResult
from pss_cli.report.check_formats import result_to_json_dict
from pss_cli.results import (
    ScanReport,
    SmoothReport,
    report_to_json_dict,
    smooth_report_to_json_dict,
)
from pss_cli.trend.series import TrendReport, trend_to_json_dict

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
DIVERGED = SAMPLES / "diverged"
HEALTHY = SAMPLES / "healthy"


def _cli(*args: str) -> dict[str, Any]:
    done = CliRunner().invoke(app, [*args, "--format", "json"])
    assert done.exit_code in (0, 1), done.output  # 1: findings (check, trend)
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def _same(api: dict[str, Any], cli: dict[str, Any]) -> None:
    api.pop("timings", None)
    cli.pop("timings", None)
    assert json.dumps(api, indent=2) == json.dumps(cli, indent=2)


def test_import_pss_cli_does_not_import_torch() -> None:
    code = (
        "import sys, pss_cli\n"
        "assert callable(pss_cli.check) and pss_cli.__version__\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_api_names_are_the_library_functions() -> None:
    from pss_cli import api, guard

    assert pss_cli.scan is api.scan and pss_cli.smooth is api.smooth
    assert pss_cli.check is api.check and pss_cli.trend is api.trend
    assert pss_cli.Guard is guard.Guard and pss_cli.GuardConfig is guard.GuardConfig
    importlib.import_module("pss_cli.trend.analysis")  # the subpackage must not shadow it

    assert pss_cli.trend is api.trend
    for name in ("scan", "smooth", "check", "trend"):
        assert getattr(pss_cli, name).__doc__
    with pytest.raises(AttributeError):
        _ = pss_cli.no_such_name  # type: ignore[attr-defined]


def test_scan_equals_the_cli_json() -> None:
    report = pss_cli.scan(DIVERGED, top_k=8, precision="fp32")
    assert isinstance(report, ScanReport)
    cli = _cli("scan", str(DIVERGED), "--top-k", "8", "--precision", "fp32")
    _same(report_to_json_dict(report), cli)
    assert report.summary.flagged > 0


def test_smooth_equals_the_cli_json(tmp_path: Path) -> None:
    api_out, cli_out = tmp_path / "api", tmp_path / "cli"
    report = pss_cli.smooth(DIVERGED, api_out, precision="fp32")
    assert isinstance(report, SmoothReport) and report.layers
    assert (api_out / "model.safetensors").is_file()
    cli = _cli("smooth", str(DIVERGED), "--out", str(cli_out), "--precision", "fp32")
    api = json.loads(json.dumps(smooth_report_to_json_dict(report)).replace(str(api_out), "OUT"))
    _same(api, json.loads(json.dumps(cli).replace(str(cli_out), "OUT")))
    with pytest.raises(UsageError, match="--temperature"):
        pss_cli.smooth(DIVERGED, None, dry_run=True, temperature=0.0)


def test_check_equals_the_cli_json() -> None:
    result = pss_cli.check(DIVERGED, precision="fp32")
    assert isinstance(result, CheckResult) and not result.passed
    _same(result_to_json_dict(result), _cli("check", str(DIVERGED), "--precision", "fp32"))
    relaxed = pss_cli.check(HEALTHY, min_stable_rank=1.0, precision="fp32")
    cli = _cli("check", str(HEALTHY), "--min-stable-rank", "1", "--precision", "fp32")
    _same(result_to_json_dict(relaxed), cli)


def test_trend_equals_the_cli_json() -> None:
    paths = [HEALTHY, DIVERGED]
    report = pss_cli.trend(paths, use_cache=False)
    assert isinstance(report, TrendReport) and len(report.steps) == 2
    cli = _cli("trend", *map(str, paths), "--no-cache")
    _same(trend_to_json_dict(report), cli)
    with pytest.raises(UsageError, match="--window"):
        pss_cli.trend(paths, window=0)


@pytest.mark.parametrize(
    ("call", "parameter"),
    [
        (lambda: pss_cli.scan(DIVERGED, precision="fp16"), "precision"),
        (lambda: pss_cli.scan(DIVERGED, compute_dtype="float16"), "compute_dtype"),
        (lambda: pss_cli.scan(DIVERGED, top_k="16"), "top_k"),
        (lambda: pss_cli.scan(DIVERGED, include=[3]), "include"),
        (lambda: pss_cli.smooth(DIVERGED, None, dry_run=True, method="median"), "method"),
        (
            lambda: pss_cli.smooth(DIVERGED, None, dry_run=True, optimizer_state="zero"),
            "optimizer_state",
        ),
        (lambda: pss_cli.check(DIVERGED, fail_on="fatal"), "fail_on"),
        (lambda: pss_cli.trend([DIVERGED], window=2.5), "window"),
    ],
)
def test_a_bad_argument_is_a_usage_error_naming_the_parameter(call: Any, parameter: str) -> None:
    # They once raised a bare ValueError ('fp16' is not a valid ProductPrecision) or TypeError.
    with pytest.raises(UsageError, match=f"^{parameter}: "):
        call()


def test_a_single_string_is_one_glob_not_its_characters() -> None:
    # exclude="*wte*" was iterated into "*", "w", "t", "e", "*" and excluded every matrix.
    one = pss_cli.scan(DIVERGED / "model.safetensors", exclude="*wte*")
    listed = pss_cli.scan(DIVERGED / "model.safetensors", exclude=["*wte*"])
    assert [x.name for x in one.layers] == [x.name for x in listed.layers] != []
    ignored = pss_cli.check(DIVERGED / "model.safetensors", ignore="PSS006")
    assert all(f.rule_id != "PSS006" for f in ignored.findings)


def test_the_library_leaves_pythons_random_state_alone() -> None:
    # A fresh interpreter: importing rich (for a progress bar the library never draws) drew
    # from Python's global `random` on the first check().
    sample = DIVERGED / "model.safetensors"
    code = (
        "import random, pss_cli\n"
        "state = random.getstate()\n"
        f"pss_cli.check({str(sample)!r})\n"
        f"pss_cli.scan({str(sample)!r})\n"
        f"pss_cli.smooth({str(sample)!r}, None, dry_run=True)\n"
        "assert random.getstate() == state, 'random state moved'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
