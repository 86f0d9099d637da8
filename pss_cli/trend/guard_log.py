"""The guard's JSONL event log (`pss_cli.guard`, docs/GUARD.md) as an overlay on `pss trend`.

Torch-free. The log is one JSON object per line: a header {"schema": "pss-guard-events",
"version": 1, ...}, then records with "step" (the guard's 0-based step count) and "kind". A resumed
run may append a second header and repeat steps; a record repeated exactly is counted once.

Steps: guard step k decided the (k+1)-th optimizer step, which is the trainer's `global_step`
once that step is done (Hugging Face Trainer and Lightning count skipped steps too), and the
step number of the checkpoint saved right after it. The overlay reports both and plots at
`train_step` = k + 1, on the same axis as the checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pss_cli.errors import CheckpointError, UsageError

GUARD_LOG_NAME = "pss-guard-events.jsonl"  # the name `pss trend RUN_DIR` looks for
GUARD_LOG_SCHEMA = "pss-guard-events"
GUARD_LOG_VERSIONS = (1,)
# Records the overlay marks; "decision" and "metrics" records are per-step numbers, not events.
MARK_KINDS = ("trigger", "skip", "smooth", "nonfinite", "raise")


@dataclass(frozen=True)
class GuardMark:
    step: int  # guard step (0-based)
    kind: str  # trigger | skip | smooth | nonfinite | raise
    reason: str | None

    @property
    def train_step(self) -> int:
        """The optimizer step this decision was about, counted from 1 (see the module doc)."""
        return self.step + 1


@dataclass(frozen=True)
class GuardOverlay:
    source: str
    marks: tuple[GuardMark, ...]  # in step order
    last_step: int | None  # the largest guard step the log mentions
    bad_lines: int  # lines that were not JSON objects with an integer step and a kind

    def count(self, kind: str) -> int:
        return sum(1 for mark in self.marks if mark.kind == kind)

    def steps_of(self, *kinds: str) -> tuple[int, ...]:
        """Distinct train steps with a mark of these kinds, ascending."""
        return tuple(sorted({m.train_step for m in self.marks if m.kind in kinds}))


def find_guard_log(paths: list[Path]) -> Path | None:
    """`RUN_DIR/pss-guard-events.jsonl` when `pss trend` was given one run folder that has it."""
    if len(paths) != 1 or not paths[0].is_dir():
        return None
    candidate = paths[0] / GUARD_LOG_NAME
    return candidate if candidate.is_file() else None


def read_guard_log(path: Path) -> GuardOverlay:
    """Read a guard event log; a file that is not one is a clear error naming it."""
    if not path.is_file():
        raise UsageError(
            f"--guard-log '{path}': no such file",
            f"the guard writes it where Guard(..., event_log=...) says ({GUARD_LOG_NAME} "
            "in the run folder by convention)",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the guard event log '{path}': {exc}") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not _is_header(_parse(lines[0])):
        raise CheckpointError(
            f"'{path}' is not a pss guard event log (its first line is not a "
            f'{{"schema": "{GUARD_LOG_SCHEMA}", "version": 1}} header)',
            "pass the JSONL file that Guard(..., event_log=...) wrote",
        )
    marks: dict[tuple[int, str, str | None], GuardMark] = {}
    last_step: int | None = None
    bad = 0
    for line in lines[1:]:
        record = _parse(line)
        if _is_header(record):
            continue  # a resumed run appends its own header
        step = record.get("step") if record is not None else None
        kind = record.get("kind") if record is not None else None
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(kind, str):
            bad += 1
            continue
        last_step = step if last_step is None else max(last_step, step)
        if kind in MARK_KINDS:
            assert record is not None
            reason = record.get("reason")
            mark = GuardMark(step, kind, reason if isinstance(reason, str) else None)
            marks.setdefault((step, kind, mark.reason), mark)
    ordered = tuple(sorted(marks.values(), key=lambda m: (m.step, MARK_KINDS.index(m.kind))))
    return GuardOverlay(str(path), ordered, last_step, bad)


def overlay_to_json_dict(overlay: GuardOverlay) -> dict[str, Any]:
    return {
        "source": overlay.source,
        "last_step": overlay.last_step,
        "counts": {kind: overlay.count(kind) for kind in MARK_KINDS},
        "skipped_train_steps": list(overlay.steps_of("skip")),
        "events": [
            {"step": m.step, "train_step": m.train_step, "kind": m.kind, "reason": m.reason}
            for m in overlay.marks
        ],
        "bad_lines": overlay.bad_lines,
    }


def overlay_lines(overlay: GuardOverlay) -> list[str]:
    """The overlay in plain sentences, for the table output."""
    skips = overlay.steps_of("skip")
    triggers = overlay.count("trigger")
    parts = [
        f"{triggers} trigger{'s' if triggers != 1 else ''}",
        f"{len(skips)} skipped step{'s' if len(skips) != 1 else ''}",
        f"{overlay.count('smooth')} smoothing{'s' if overlay.count('smooth') != 1 else ''}",
    ]
    if overlay.count("nonfinite"):
        parts.append(f"{overlay.count('nonfinite')} non-finite")
    lines = [f"guard log: {', '.join(parts)} ({overlay.source})"]
    if skips:
        shown = ", ".join(str(s) for s in skips[:12]) + (" ..." if len(skips) > 12 else "")
        lines.append(f"  skipped optimizer steps: {shown}")
    first = next((m for m in overlay.marks if m.kind in ("trigger", "nonfinite")), None)
    if first is not None and first.reason:
        lines.append(f"  first trigger at step {first.train_step}: {first.reason}")
    if overlay.bad_lines:
        lines.append(f"  {overlay.bad_lines} unreadable line(s) ignored")
    return lines


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line, parse_constant=lambda _c: math.nan)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _is_header(record: dict[str, Any] | None) -> bool:
    return (
        record is not None
        and record.get("schema") == GUARD_LOG_SCHEMA
        and record.get("version") in GUARD_LOG_VERSIONS
    )
