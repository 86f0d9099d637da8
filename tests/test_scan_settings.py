"""ScanReport.settings is a frozen ScanSettings; its JSON form is the `settings` object of
schema version 1, key for key and in the same order as before it was typed."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.report_io import load_report
from pss_cli.results import ScanSettings, report_to_json_dict

SAMPLE = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "diverged"

# The settings keys of schema version 1, in their order (a reader that diffs reports relies on it).
KEYS = [
    "top_k",
    "min_stable_rank",
    "min_stable_rank_fraction_of_rank",
    "compute_dtype",
    "include",
    "exclude",
    "block_size",
    "tol_sigma_max",
    "tol_top_k",
    "exact_max_dim",
    "world_size",
    "precision",
    "products",
    "precision_basis",
    "bf16_min_speedup",
]


@pytest.fixture(scope="module")
def scan_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("settings") / "report.json"
    args = ["scan", str(SAMPLE), "--format", "json", "-o", str(out), "--top-k", "8"]
    done = CliRunner().invoke(app, [*args, "--include", "*.weight"])
    assert done.exit_code == 0, done.output
    return out


def test_settings_json_keys_and_values(scan_json: Path) -> None:
    settings = json.loads(scan_json.read_text())["settings"]
    assert list(settings) == KEYS
    assert settings["top_k"] == 8
    assert settings["include"] == ["*.weight"] and settings["exclude"] == []
    assert settings["world_size"] == 1


def test_a_saved_report_renders_its_settings_byte_for_byte(scan_json: Path) -> None:
    text = scan_json.read_text()
    report = load_report(scan_json)
    assert isinstance(report.settings, ScanSettings)
    assert report.settings.top_k == 8 and report.settings.include == ("*.weight",)
    again = json.dumps(report_to_json_dict(report)["settings"], indent=2)
    assert again == json.dumps(json.loads(text)["settings"], indent=2)


def test_settings_are_frozen_and_tolerate_missing_keys() -> None:
    partial = ScanSettings.from_json_dict({"min_stable_rank": 3.0, "unknown": 1})
    assert partial.min_stable_rank == 3.0 and partial.products == ""
    with pytest.raises(FrozenInstanceError):
        partial.top_k = 4  # type: ignore[misc]
