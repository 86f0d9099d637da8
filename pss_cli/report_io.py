"""Load a saved `pss scan --format json` report back into a ScanReport (torch-free).

So a CI job can scan once and gate many times (`pss check report.json`), and so `--baseline`
can name a report of the base model. The schema version must match: a renamed field would
otherwise read as a missing metric and pass a gate it should fail. Problems are UsageErrors
(exit 2) naming the file and the field: a wrong report is a pipeline mistake, not a finding
about the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pss_cli.errors import UsageError
from pss_cli.results import SCHEMA_VERSION, LayerResult, ScanReport, ScanSettings, ScanSummary

_RESCAN = "write it again with `pss scan CHECKPOINT --format json -o FILE` from this pss version"


def is_report_path(path: Path) -> bool:
    """A `.json` file that is not a sharded checkpoint's index is a saved report."""
    return path.suffix == ".json" and not path.name.endswith(".index.json")


def load_report(path: Path) -> ScanReport:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"report '{path}' does not exist", "check the path") from None
    except UnicodeDecodeError:
        raise UsageError(
            f"'{path}' is not a JSON scan report (it is binary: a checkpoint?)",
            "pass a checkpoint as MODEL, and a report written by `pss scan CKPT -f json -o FILE` "
            "as --baseline",
        ) from None
    except IsADirectoryError:
        raise UsageError(
            f"'{path}' is a folder, not a scan report",
            "save one with `pss scan CKPT -f json -o FILE` and pass FILE",
        ) from None
    except OSError as exc:
        raise UsageError(
            f"cannot read report '{path}': {exc.strerror or exc}",
            "check the path and its permissions",
        ) from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"'{path}' is not valid JSON: {exc}", _RESCAN) from exc
    try:
        return report_from_json_dict(data, str(path))
    except (TypeError, ValueError, OverflowError, AttributeError) as exc:
        # Hand-edited reports: a wrong type anywhere is the file's fault, not a pss bug.
        raise UsageError(f"'{path}' is not a valid scan report: {exc}", _RESCAN) from exc


def report_from_json_dict(data: Any, where: str) -> ScanReport:
    if not isinstance(data, dict) or "schema_version" not in data:
        raise UsageError(f"'{where}' is not a pss scan report (no schema_version)", _RESCAN)
    if data["schema_version"] != SCHEMA_VERSION:
        raise UsageError(
            f"'{where}' has schema_version {data['schema_version']!r}; "
            f"this pss reads version {SCHEMA_VERSION}",
            _RESCAN,
        )
    if data.get("command", "scan") != "scan":
        raise UsageError(f"'{where}' is a `pss {data['command']}` report, not a scan report")
    layers = _field(data, "layers", list, where)
    return ScanReport(
        pss_version=str(data.get("pss_version", "")),
        checkpoint=_field(data, "checkpoint", str, where),
        layout=str(data.get("layout", "")),
        device=str(data.get("device", "")),
        seed=int(data.get("seed", 0)),
        method=str(data.get("method", "")),
        settings=ScanSettings.from_json_dict(dict(data.get("settings") or {})),
        layers=tuple(_layer(row, f"{where}: layers[{i}]") for i, row in enumerate(layers)),
        skipped=(),  # the gate does not look at skipped tensors
        summary=ScanSummary(len(layers), 0, 0, 0, None, None, None, None),
        timings=dict(data.get("timings") or {}),
    )


def _layer(row: Any, where: str) -> LayerResult:
    if not isinstance(row, dict):
        raise UsageError(f"{where} is not an object", _RESCAN)
    shape = _field(row, "matrix_shape", list, where)
    if len(shape) != 2 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise UsageError(f"{where}.matrix_shape must be two positive integers, got {shape!r}")
    index = row.get("index")
    if index is not None and not isinstance(index, int):
        raise UsageError(f"{where}.index must be an integer or null, got {index!r}")
    return LayerResult(
        name=_field(row, "name", str, where),
        index=index,
        file=_field(row, "file", str, where),
        shape=tuple(row.get("shape") or shape),
        matrix_shape=(shape[0], shape[1]),
        dtype=str(row.get("dtype", "")),
        role=_field(row, "role", str, where),
        block=row.get("block"),
        view=str(row.get("view", "matrix")),
        scale_tensor=_optional_str(row, "scale_tensor", where),
        sigma_max=_metric(row, "sigma_max", where),
        frobenius_norm=_metric(row, "frobenius_norm", where, required=False),
        stable_rank=_metric(row, "stable_rank", where),
        top_singular_values=tuple(_numbers(row, "top_singular_values", where)),
        topk_energy_share=_metric(row, "topk_energy_share", where),
        sigma1_over_sigma2=_metric(row, "sigma1_over_sigma2", where),
        entropy_effective_rank=_metric(row, "entropy_effective_rank", where, required=False),
        nonfinite_count=_field(row, "nonfinite_count", int, where),
        flags=tuple(str(f) for f in row.get("flags") or ()),
        solver=str(row.get("solver", "")),
        iterations=int(row.get("iterations") or 0),
    )


def _field(data: dict[str, Any], key: str, kind: type[Any], where: str) -> Any:
    if key not in data:
        raise UsageError(f"{where} has no '{key}' field", _RESCAN)
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UsageError(f"{where}.{key} must be a {kind.__name__}, got {value!r}", _RESCAN)
    return value


def _metric(row: dict[str, Any], key: str, where: str, required: bool = True) -> float | None:
    """A number, or null where scan found it undefined (NaN/Inf are written as null)."""
    if key not in row:
        if required:
            raise UsageError(f"{where} has no '{key}' field", _RESCAN)
        return None
    value = row[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"{where}.{key} must be a number or null, got {value!r}", _RESCAN)
    return float(value)


def _numbers(row: dict[str, Any], key: str, where: str) -> list[float]:
    values = _field(row, key, list, where)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise UsageError(f"{where}.{key} must be a list of numbers", _RESCAN)
    return [float(v) for v in values]


def _optional_str(row: dict[str, Any], key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{where}.{key} must be a string or null, got {value!r}", _RESCAN)
    return value
