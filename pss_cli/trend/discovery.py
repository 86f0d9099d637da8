"""Find a training run's checkpoints and their step numbers (torch-free: names and JSON only).

Recognised names (a folder or a single checkpoint file): Hugging Face Trainer `checkpoint-N`,
`step-N`, `step_N`, `stepN`, DeepSpeed `global_stepN`, Megatron `iter_NNNNNNN`, Lightning
`epoch=E-step=S.ckpt` / `step=S.ckpt`. The step comes from the name, or else from the
checkpoint's `trainer_state.json` or a Lightning file's own `global_step`; explicit paths
without either are numbered by their position (and the report says so).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pss_cli.errors import CheckpointNotFoundError, UsageError

# One pattern per naming scheme; the step is the first group. Anchored on the whole name (minus
# a checkpoint file suffix), so that `checkpoint-100-smoothed` is not taken for step 100.
_STEP_NAMES = (
    # HF Trainer's checkpoint-N; accelerate's automatic naming checkpoints/checkpoint_N.
    re.compile(r"checkpoint[-_](\d+)"),
    re.compile(r"step[-_]?(\d+)"),
    re.compile(r"global_step(\d+)"),
    re.compile(r"iter_(\d+)"),
    # PyTorch Lightning's ModelCheckpoint: `epoch=E-step=S.ckpt`, `step=S.ckpt`, with more
    # metrics after it (`epoch=0-step=10-val_loss=1.08`), and the `-vN` it appends when a
    # name is taken.
    re.compile(r"(?:epoch=\d+-)?step=(\d+)(?:-.+)?"),
)
_FILE_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth", ".ckpt")
TRAINER_STATE = "trainer_state.json"
# HF's trainer_state.json of a long run with per-step logging is a few MB; far above that it is
# not a trainer state worth loading whole.
_MAX_STATE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class RunCheckpoint:
    path: Path
    step: int
    step_source: str  # "name" | "trainer_state" | "global_step" (in a .ckpt) | "order"


@dataclass(frozen=True)
class LogPoint:
    step: int
    loss: float | None
    grad_norm: float | None


@dataclass(frozen=True)
class RunLayout:
    root: Path | None  # the run folder, when one was named
    checkpoints: tuple[RunCheckpoint, ...]  # ascending step
    log: tuple[LogPoint, ...]  # training log (trainer_state.json log_history), ascending step
    log_source: Path | None


def step_from_name(name: str) -> int | None:
    stem = name
    for suffix in _FILE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    for pattern in _STEP_NAMES:
        match = pattern.fullmatch(stem)
        if match:
            return int(match.group(1))
    return None


def discover_run(paths: list[Path]) -> RunLayout:
    """One run folder (its step-named children), or explicit checkpoint paths in order."""
    if not paths:
        raise UsageError("no run folder or checkpoint given", "pss trend RUN_DIR")
    for path in paths:
        if not path.exists():
            raise CheckpointNotFoundError(
                f"'{path}' does not exist", "give a run folder or checkpoint paths"
            )
    if len(paths) == 1 and paths[0].is_dir() and step_from_name(paths[0].name) is None:
        return _run_folder(paths[0])
    return _explicit(paths)


def _run_folder(root: Path) -> RunLayout:
    found: list[RunCheckpoint] = []
    try:
        children = sorted(root.iterdir())
    except OSError as exc:
        raise CheckpointNotFoundError(
            f"cannot list '{root}': {exc.strerror or exc}", "check the permissions"
        ) from exc
    for child in children:
        step = step_from_name(child.name)
        if step is None or child.name.startswith("."):
            continue
        if child.is_dir() or child.name.endswith(_FILE_SUFFIXES):
            found.append(RunCheckpoint(_weights_of(child), step, "name"))
    if not found:
        deeper = _folder_with_checkpoints(root)
        raise CheckpointNotFoundError(
            f"no checkpoints found in '{root}'",
            f"its checkpoints are in '{deeper}': pss trend {deeper}"
            if deeper is not None
            else "pss trend looks for checkpoint-N/, step-N, step_N, global_stepN, iter_N or "
            "Lightning's epoch=E-step=N.ckpt entries; or name the checkpoints explicitly, in "
            "order: pss trend CKPT_A CKPT_B ...",
        )
    checkpoints = _sorted_unique(found)
    log, source = _training_log(root, checkpoints)
    return RunLayout(root, checkpoints, log, source)


def _folder_with_checkpoints(root: Path, depth: int = 3, budget: int = 200) -> Path | None:
    """The first folder below `root` (breadth first, at most `depth` levels and `budget`
    folders) holding step-named checkpoints: Lightning keeps them in checkpoints/ or
    lightning_logs/version_N/checkpoints/, where a run folder's top level has none."""
    level = [root]
    for _ in range(depth):
        below: list[Path] = []
        for folder in level:
            try:
                below.extend(
                    sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
                )
            except OSError:
                continue
        for folder in below[:budget]:
            try:
                names = [child.name for child in folder.iterdir()]
            except OSError:
                continue
            if any(step_from_name(name) is not None for name in names):
                return folder
        level = below[:budget]
    return None


# OLMo-core saves each step as stepN/model_and_optim/ (a DCP folder) beside other state.
_DCP_SUBFOLDER = "model_and_optim"


def _weights_of(path: Path) -> Path:
    """The checkpoint inside a step folder: OLMo-core's `stepN/model_and_optim/`, else itself."""
    inner = path / _DCP_SUBFOLDER
    return inner if path.is_dir() and (inner / ".metadata").is_file() else path


def _explicit(paths: list[Path]) -> RunLayout:
    found: list[RunCheckpoint] = []
    seen: set[Path] = set()
    unique = []
    for path in paths:
        resolved = _weights_of(path).resolve()
        if resolved not in seen:  # the same checkpoint named twice counts once
            seen.add(resolved)
            unique.append(_weights_of(path))
    for position, path in enumerate(unique):
        named = path.parent if path.name == _DCP_SUBFOLDER else path
        step = step_from_name(named.name)
        if step is not None:
            found.append(RunCheckpoint(path, step, "name"))
            continue
        state_step = _global_step(path / TRAINER_STATE) if path.is_dir() else None
        if state_step is not None:
            found.append(RunCheckpoint(path, state_step, "trainer_state"))
        elif (file_step := _lightning_global_step(path)) is not None:
            found.append(RunCheckpoint(path, file_step, "global_step"))
        else:
            found.append(RunCheckpoint(path, position, "order"))
    if any(c.step_source == "order" for c in found) and not all(
        c.step_source == "order" for c in found
    ):
        raise UsageError(
            "some checkpoints have a step number (from their name or trainer_state.json) and "
            "some do not",
            "name them all checkpoint-N/step-N/..., or none (then their order is the step)",
        )
    if all(c.step_source == "order" for c in found):
        checkpoints = tuple(found)  # the user's order is the order
    else:
        checkpoints = _sorted_unique(found)
    log, source = _training_log(None, checkpoints)
    return RunLayout(None, checkpoints, log, source)


_LIGHTNING_VERSION = re.compile(r"-v(\d+)(?=\.ckpt$)")


def _lightning_version(path: Path) -> tuple[str, int] | None:
    """(name without `-vN`, N) of a Lightning .ckpt (N = 0 without the suffix)."""
    if not path.name.endswith(".ckpt"):
        return None
    match = _LIGHTNING_VERSION.search(path.name)
    base = _LIGHTNING_VERSION.sub("", path.name)
    return base, int(match.group(1)) if match else 0


def _sorted_unique(found: list[RunCheckpoint]) -> tuple[RunCheckpoint, ...]:
    by_step: dict[int, RunCheckpoint] = {}
    for checkpoint in found:
        other = by_step.get(checkpoint.step)
        mine, theirs = (
            _lightning_version(checkpoint.path),
            (_lightning_version(other.path) if other is not None else None),
        )
        if other is not None and mine and theirs and mine[0] == theirs[0]:
            # Lightning appends -vN when a resumed run saves a step under a name already
            # taken: the highest N is the newest save of that step.
            if mine[1] > theirs[1]:
                by_step[checkpoint.step] = checkpoint
            continue
        if other is not None:
            raise UsageError(
                f"two checkpoints claim step {checkpoint.step}: '{other.path}' and "
                f"'{checkpoint.path}'",
                "name the ones to compare explicitly: pss trend CKPT_A CKPT_B ...",
            )
        by_step[checkpoint.step] = checkpoint
    return tuple(by_step[step] for step in sorted(by_step))


def _global_step(path: Path) -> int | None:
    state = _read_state(path)
    step = state.get("global_step") if state is not None else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def _lightning_global_step(path: Path) -> int | None:
    """The ``global_step`` a Lightning .ckpt (or any torch file) keeps at its top level, read
    with the same safe loader as the weights; None when absent or unreadable (the file's own
    error comes later, from the scan)."""
    if not path.is_file() or not path.name.endswith((".ckpt", ".pt", ".pth")):
        return None
    from pss_cli.checkpoint.formats.torch.torch_file import (
        load,  # imports torch: only for such files
    )
    from pss_cli.errors import PssError

    try:
        obj = load(path)
    except PssError:
        return None
    step = obj.get("global_step") if isinstance(obj, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def _read_state(path: Path) -> dict[str, Any] | None:
    """A trainer_state.json, or None when absent, unreadable, absurdly large or malformed (the
    log is optional: a bad one must not stop the trend). Only regular files are opened (a FIFO
    would block)."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_STATE_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None  # RecursionError: JSON nested thousands deep
    return data if isinstance(data, dict) else None


def _training_log(
    root: Path | None, checkpoints: tuple[RunCheckpoint, ...]
) -> tuple[tuple[LogPoint, ...], Path | None]:
    """The longest `log_history` among the run folder's and the checkpoints' trainer_state.json
    (HF writes the whole history so far into every checkpoint; the latest one has the most)."""
    candidates = [c.path / TRAINER_STATE for c in checkpoints if c.path.is_dir()]
    if root is not None:
        candidates.append(root / TRAINER_STATE)
    best: tuple[tuple[LogPoint, ...], Path | None] = ((), None)
    for path in candidates:
        state = _read_state(path)
        if state is None:
            continue
        log = _log_points(state.get("log_history"))
        if len(log) > len(best[0]) or (
            len(log) == len(best[0]) and log and best[0] and log[-1].step > best[0][-1].step
        ):
            best = (log, path)
    return best


def _log_points(history: Any) -> tuple[LogPoint, ...]:
    if not isinstance(history, list):
        return ()
    points: dict[int, LogPoint] = {}
    for entry in history:
        if not isinstance(entry, dict):
            continue
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        loss, grad = _number(entry.get("loss")), _number(entry.get("grad_norm"))
        if loss is None and grad is None:
            continue  # eval / summary entries
        old = points.get(step)
        if old is not None:
            loss = loss if loss is not None else old.loss
            grad = grad if grad is not None else old.grad_norm
        points[step] = LogPoint(step, loss, grad)
    return tuple(points[s] for s in sorted(points))


def _number(value: Any) -> float | None:
    """Finite or not, a number is kept (a NaN loss is the explosion); anything else is None.
    JSON written by Python may spell non-finite values NaN/Infinity; json.loads reads them."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if not math.isnan(value) else math.nan
