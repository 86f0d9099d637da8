"""Frozen, torch-free result types and their JSON form (schema versioned).

JSON schema, version 1 (additions keep the version; renames or removals bump it):
top level: schema_version, pss_version, checkpoint, layout, device, seed, method, settings,
layers[], skipped[], summary, timings. `timings` is the only field that changes between two
runs on the same input and seed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any

SCHEMA_VERSION = 1


class Flag(StrEnum):
    """Why scan flags a matrix; a StrEnum, so the JSON keeps these exact strings."""

    LOW_STABLE_RANK = "low_stable_rank"
    NONFINITE = "nonfinite"
    ZERO_MATRIX = "zero_matrix"


def display_name(name: str, index: int | None) -> str:
    """`name`, or `name[i]` for matrix i of a stacked (E, m, n) tensor."""
    return name if index is None else f"{name}[{index}]"


_INDEXED = re.compile(r"(.*)\[(\d+)\]")


def name_matches(name: str, index: int | None, pattern: str) -> bool:
    """Whether a user's glob names this matrix: every matrix of a tensor by the tensor's name
    (fnmatch, case-sensitive), or one matrix of a stacked tensor by a glob on its name followed
    by `[i]` as the report prints it (`*.experts.down_proj[2]`; fnmatch alone would read `[2]`
    as a character class, so the exact printed name matched nothing but itself)."""
    if fnmatchcase(name, pattern):
        return True
    found = _INDEXED.fullmatch(pattern) if index is not None else None
    return found is not None and int(found[2]) == index and fnmatchcase(name, found[1])


@dataclass(frozen=True)
class LayerResult:
    """Metrics of one weight matrix (one expert of a stacked tensor is one matrix).

    Spectral fields are None when they are undefined: non-finite entries, or an all-zero matrix
    (sigma_max = 0 makes the stable rank 0/0).
    """

    name: str  # tensor name in the checkpoint
    index: int | None  # position in a stacked (E, m, n) tensor, else None
    file: str  # the file holding it, relative to the checkpoint root
    shape: tuple[int, ...]  # stored shape
    matrix_shape: tuple[int, int]  # (m, n) as analysed (conv kernels flattened)
    dtype: str  # stored safetensors dtype
    role: str
    block: int | None
    view: str  # matrix | conv | stacked
    scale_tensor: str | None  # quantized tensors: the scale used to dequantize (q * scale)
    sigma_max: float | None
    frobenius_norm: float | None
    stable_rank: float | None
    top_singular_values: tuple[float, ...]
    topk_energy_share: float | None
    sigma1_over_sigma2: float | None
    entropy_effective_rank: float | None  # only with --exact (needs the whole spectrum)
    nonfinite_count: int
    flags: tuple[str, ...]
    solver: str  # krylov | exact | exact-fallback | none
    iterations: int

    @property
    def display_name(self) -> str:
        return display_name(self.name, self.index)


@dataclass(frozen=True)
class SkippedResult:
    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    reason: str


# How a skipped entry says that a whole weights file beside the checkpoint was left out (the
# scan builds the reasons with these; `pss check` finds them with `weights_left_out`).
UNINDEXED_FILE = "file not named by the index"
SUBFOLDER_WEIGHTS = "weights in a sub-folder: not part of this checkpoint, not scanned"


def weights_left_out(skipped: SkippedResult) -> bool:
    """A weights file the checkpoint does not include (not a tensor, not a fact about one)."""
    return not skipped.name and skipped.reason.startswith((UNINDEXED_FILE, SUBFOLDER_WEIGHTS))


@dataclass(frozen=True)
class ScanSummary:
    matrices: int
    flagged: int
    skipped: int
    nonfinite_matrices: int
    min_stable_rank: float | None
    min_stable_rank_layer: str | None
    max_sigma_max: float | None
    max_sigma_max_layer: str | None
    flag_counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ScanSettings:
    """The settings a scan ran with: the report's `settings` object (its keys in field order).

    A fresh scan sets every field. The defaults (None, "", 1) stand for a key absent from a
    report loaded from a file (`pss_cli.report_io`), which is read as it is.
    """

    top_k: int = 16  # config.DEFAULT_TOP_K: the table's column count when a report lacks it
    min_stable_rank: float | None = None
    min_stable_rank_fraction_of_rank: float | None = None
    compute_dtype: str = ""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    block_size: int | None = None
    tol_sigma_max: float | None = None
    tol_top_k: float | None = None
    exact_max_dim: int | None = None
    world_size: int = 1
    # --precision as asked, the Krylov products used (fp32 | bf16 | fp64) and why (measured:
    # timings.bf16_time_ratio against bf16_min_speedup; requested; no-krylov).
    precision: str = ""
    products: str = ""
    precision_basis: str = ""
    bf16_min_speedup: float | None = None

    def to_json_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["include"] = list(self.include)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> ScanSettings:
        """The known keys of a saved report's `settings` (others are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        for key in ("include", "exclude"):
            if key in values:
                values[key] = tuple(str(v) for v in values[key])
        return cls(**values)


@dataclass(frozen=True)
class ScanReport:
    pss_version: str
    checkpoint: str
    layout: str
    device: str
    seed: int
    method: str  # "block-krylov" or "exact"
    settings: ScanSettings
    layers: tuple[LayerResult, ...]
    skipped: tuple[SkippedResult, ...]
    summary: ScanSummary
    timings: dict[str, float]
    schema_version: int = SCHEMA_VERSION


def report_to_json_dict(report: ScanReport) -> dict[str, Any]:
    """The JSON form: key order fixed, NaN/Inf replaced by null (JSON has neither)."""
    layers = []
    for layer in report.layers:
        row = asdict(layer)
        row["shape"] = list(layer.shape)
        row["matrix_shape"] = list(layer.matrix_shape)
        row["top_singular_values"] = list(layer.top_singular_values)
        row["flags"] = list(layer.flags)
        layers.append(row)
    data: dict[str, Any] = finite_json(
        {
            "schema_version": report.schema_version,
            "pss_version": report.pss_version,
            "checkpoint": report.checkpoint,
            "layout": report.layout,
            "device": report.device,
            "seed": report.seed,
            "method": report.method,
            "settings": report.settings.to_json_dict(),
            "layers": layers,
            "skipped": [{**asdict(s), "shape": list(s.shape)} for s in report.skipped],
            "summary": asdict(report.summary),
            "timings": report.timings,
        }
    )
    return data


def finite_json(value: Any) -> Any:
    """NaN/Inf -> null, recursively (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


@dataclass(frozen=True)
class SmoothedLayer:
    """One matrix changed (or planned to change) by `pss smooth`.

    `*_after` values are re-measured from the written checkpoint (None in a dry run, where
    `predicted_stable_rank` says what the new spectrum will give).
    """

    name: str
    index: int | None
    role: str
    matrix_shape: tuple[int, int]
    dtype: str
    k: int  # singular triplets used
    changed_values: int  # how many of them the method changed
    target_stable_rank: float | None  # cap only
    target_source: str | None  # where the target came from (option, or the median it used)
    sigma_max_before: float
    stable_rank_before: float
    predicted_stable_rank: float
    sigma_max_after: float | None
    stable_rank_after: float | None
    relative_change: float  # ||W' - W||_F / ||W||_F, measured on the stored (cast) tensor
    verified: bool | None  # None in a dry run

    @property
    def display_name(self) -> str:
        return display_name(self.name, self.index)


@dataclass(frozen=True)
class OptimizerSummary:
    """What `pss smooth` did to the optimizer state (JSON `optimizer`)."""

    policy: str  # an OptimizerPolicy value: reset, keep or drop
    file: str | None  # the optimizer file, when it is a file of its own
    mapping: str  # how parameters were matched to tensors: "exact", "all" or "none"
    reset_param_ids: tuple[int, ...] = ()
    reset_params: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()
    lr_scale: dict[str, Any] | None = None  # what --lr-scale scaled (LrScalePlan.summary)

    @property
    def resets_moments(self) -> bool:
        """Adam moments of some parameters were reset (first updates ~lr * sign(g))."""
        return self.policy == "reset" and self.mapping in ("exact", "all")

    def to_json_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "policy": self.policy,
            "file": self.file,
            "mapping": self.mapping,
            "reset_param_ids": list(self.reset_param_ids),
            "reset_params": list(self.reset_params),
            "messages": list(self.messages),
        }
        if self.lr_scale is not None:
            data["lr_scale"] = self.lr_scale
        return data

    def __getitem__(self, key: str) -> Any:
        """The JSON field `key`, for callers that read the summary as the JSON object."""
        return self.to_json_dict()[key]


@dataclass(frozen=True)
class SmoothReport:
    pss_version: str
    input: str
    output: str | None
    dry_run: bool
    method: str
    parameters: dict[str, Any]
    layers: tuple[SmoothedLayer, ...]
    not_smoothed: tuple[SkippedResult, ...]  # selected but left alone, with the reason
    untouched_tensors_verified: int  # tensors whose bytes were compared with the input
    optimizer: OptimizerSummary | None  # None for a plan (JSON {}): nothing was written
    messages: tuple[str, ...]
    timings: dict[str, float]
    schema_version: int = SCHEMA_VERSION


def smooth_report_to_json_dict(report: SmoothReport) -> dict[str, Any]:
    layers = []
    for layer in report.layers:
        row = asdict(layer)
        row["matrix_shape"] = list(layer.matrix_shape)
        layers.append(row)
    data: dict[str, Any] = finite_json(
        {
            "schema_version": report.schema_version,
            "pss_version": report.pss_version,
            "command": "smooth",
            "input": report.input,
            "output": report.output,
            "dry_run": report.dry_run,
            "method": report.method,
            "parameters": report.parameters,
            "layers": layers,
            "not_smoothed": [{**asdict(s), "shape": list(s.shape)} for s in report.not_smoothed],
            "untouched_tensors_verified": report.untouched_tensors_verified,
            "optimizer": report.optimizer.to_json_dict() if report.optimizer else {},
            "messages": list(report.messages),
            "timings": report.timings,
        }
    )
    return data
