"""What to do with a training checkpoint's optimizer state after its weights were repaired.

Adam's moments (exp_avg ~ smoothed gradient, exp_avg_sq ~ its smoothed square) were accumulated
for the old weights; after a large edit they describe a point the model is no longer at. Three
policies: RESET zeroes the moments of the modified parameters (precedent: SPAM, arXiv
2501.06842), KEEP leaves them (precedent: Kimi K2's QK-Clip after small targeted edits), DROP
removes the file so the trainer starts a fresh optimizer. See docs/DESIGN.md "Optimizer state and
master weights".

Security: optimizer files are pickles. They are only ever loaded with
``torch.load(weights_only=True)``, which refuses any global outside a short allow-list of
tensors and primitives, so a crafted file cannot run code here.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pss_cli.checkpoint import param_order
from pss_cli.checkpoint.model import TensorEntry
from pss_cli.checkpoint.optimizer_state import (
    MOMENT_KEYS,
    ids_by_param_names,
    load_state_dict,
    map_by_shape,
    moment_shapes,
)
from pss_cli.config import OptimizerPolicy

OPTIMIZER_FILE_NAMES = ("optimizer.pt", "optimizer.bin")  # HF Trainer / Accelerate
_GLOBAL_STEP_DIR = re.compile(r"global_step\d+")
_ZERO_FILE = re.compile(r".*(optim_states\.pt|model_states\.pt)$|^bf16_zero_.*")
_DEFAULT_BETAS = (0.9, 0.999)  # torch.optim.AdamW and HF TrainingArguments defaults


@dataclass(frozen=True)
class OptimizerOutcome:
    policy: OptimizerPolicy
    file: Path | None  # the optimizer file found (None when the folder has none)
    reset_param_ids: tuple[int, ...]  # ids whose exp_avg/exp_avg_sq were zeroed
    # "exact": modified params identified without doubt; "all": could not map, every param
    # reset; "none": nothing was mapped (keep, drop, or nothing modified)
    mapping: str
    messages: tuple[str, ...]  # notes/warnings for stderr
    # FQN-keyed optimizer state (DCP): the parameter names whose moments were zeroed
    reset_names: tuple[str, ...] = ()


def find_optimizer_file(folder: Path) -> Path | None:
    """``optimizer.pt`` (HF Trainer) or ``optimizer.bin`` (Accelerate) directly in ``folder``."""
    if not folder.is_dir():
        return None
    for name in OPTIMIZER_FILE_NAMES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def detect_master_weights(folder: Path) -> list[Path]:
    """DeepSpeed ZeRO files in ``global_step*/`` sub-folders (``*optim_states.pt``,
    ``*model_states.pt``, ``bf16_zero_*``) and ``zero_to_fp32.py``: they hold fp32 master
    weights that overwrite the repaired weights on resume (DeepSpeed's
    ``load_from_fp32_weights`` defaults to true), so repairing model.safetensors alone is
    silently undone. Returns the paths found, sorted; empty when none."""
    if not folder.is_dir():
        return []
    found: list[Path] = []
    script = folder / "zero_to_fp32.py"
    if script.is_file():
        found.append(script)
    with os.scandir(folder) as it:
        step_dirs = [Path(e.path) for e in it if e.is_dir() and _GLOBAL_STEP_DIR.fullmatch(e.name)]
    for step_dir in step_dirs:
        with os.scandir(step_dir) as it:
            found.extend(Path(e.path) for e in it if e.is_file() and _ZERO_FILE.match(e.name))
    return sorted(found)


def rewrite_optimizer_state(
    src: Path,
    dst: Path,
    policy: OptimizerPolicy,
    model_entries: Sequence[TensorEntry],
    modified: Sequence[str],
) -> OptimizerOutcome:
    """Apply ``policy`` to the optimizer file ``src``, writing the result to ``dst`` (never
    for DROP). ``model_entries`` are the checkpoint's tensors, ``modified`` the names whose
    weights changed. Raises CheckpointError when RESET needs a file that only unpickling could
    read, or that is not an Adam-style state dict."""
    if src.resolve() == dst.resolve():
        raise ValueError(f"optimizer source and destination are the same file '{src}'")
    if policy is OptimizerPolicy.KEEP:
        return _keep(src, dst, modified)
    if policy is OptimizerPolicy.DROP:
        return _drop(src)
    return _reset(src, dst, model_entries, modified)


def _keep(src: Path, dst: Path, modified: Sequence[str]) -> OptimizerOutcome:
    _atomic_write(src, dst, lambda tmp: shutil.copyfile(src, tmp))
    messages = []
    if modified:
        messages.append(
            f"{src.name} kept unchanged: its Adam moments were accumulated for the old values "
            f"of the {len(modified)} repaired tensor(s), so the first updates after resuming "
            "follow the old gradient statistics (the default: zeroing them made resumes worse in "
            "docs/EXPERIMENTS.md); resume at a lower learning rate"
        )
    return OptimizerOutcome(OptimizerPolicy.KEEP, src, (), "none", tuple(messages))


def _drop(src: Path) -> OptimizerOutcome:
    message = (
        f"{src.name} dropped: Hugging Face Trainer restores the optimizer and the LR scheduler "
        "only when both optimizer.pt and scheduler.pt exist, so it will start a fresh optimizer "
        "and restart the LR schedule (warm-up included) from step 0; scheduler.pt is kept for "
        "training loops that load it themselves"
    )
    return OptimizerOutcome(OptimizerPolicy.DROP, src, (), "none", (message,))


def _reset(
    src: Path, dst: Path, model_entries: Sequence[TensorEntry], modified: Sequence[str]
) -> OptimizerOutcome:
    state_dict = load_state_dict(src)
    state: dict[Any, Any] = state_dict["state"]
    moments = moment_shapes(src, state)
    if not modified:
        _atomic_write(src, dst, lambda tmp: shutil.copyfile(src, tmp))
        return OptimizerOutcome(OptimizerPolicy.RESET, src, (), "none", ())
    # torch saves `param_names` for optimizers built from named_parameters(): an exact map even
    # when every shape repeats (any model with repeated blocks); else unique shapes; else all.
    ids: list[int] | None = ids_by_param_names(state_dict, modified)
    doubts: list[str] = []
    matched_by = "by the optimizer's saved param_names"
    if ids is None:
        # HF Trainer / accelerate: the model's own parameter order, rebuilt from config.json
        by_order = param_order.trainer_mapping(src.parent, state_dict, model_entries)
        if by_order is not None and all(name in by_order for name in modified):
            ids = sorted({by_order[name] for name in modified})
            matched_by = "by the model's parameter order and Trainer's decay grouping"
    if ids is None:
        ids, doubts = map_by_shape(model_entries, modified, moments)
        matched_by = "by unique shape"
    mapping = "exact" if ids is not None else "all"
    reset_ids = sorted(ids if ids is not None else moments)
    # Zero only the two moments. `step` is kept so the bias corrections stay ~1 (resetting it
    # too would re-run Adam's own warm-up but lose the schedule's position); max_exp_avg_sq
    # (AMSGrad) is kept because a large denominator only damps the first updates.
    for param_id in reset_ids:
        for key in MOMENT_KEYS:
            state[param_id][key].zero_()
    _atomic_write(src, dst, lambda tmp: torch.save(state_dict, tmp))

    messages = list(doubts)
    what = (
        f"the {len(reset_ids)} repaired parameter(s) (ids {', '.join(map(str, reset_ids))}, "
        f"matched {matched_by})"
        if mapping == "exact"
        else f"ALL {len(reset_ids)} parameters"
    )
    messages.append(
        f"{src.name}: zeroed Adam moments (exp_avg, exp_avg_sq) of {what}; step counters kept, "
        f"so the first update of each is about {_first_update_factor(state_dict):.1f} x lr "
        "per element, whatever the gradient's size: resume at a lower learning rate (in "
        "docs/EXPERIMENTS.md every reset resume at the same LR exploded within 2 steps, and a "
        "50-step re-warm-up only delayed it)"
    )
    return OptimizerOutcome(OptimizerPolicy.RESET, src, tuple(reset_ids), mapping, tuple(messages))


def _first_update_factor(state_dict: dict[str, Any]) -> float:
    """Adam's first update after zeroing both moments with `step` kept, in units of lr.

    At the resumed step t = s + 1 (s the stored step): m = (1 - b1) g, v = (1 - b2) g^2, and
    the bias corrections divide them by 1 - b1^t and 1 - b2^t, so
    |update| = lr (1 - b1) / sqrt(1 - b2) * sqrt(1 - b2^t) / (1 - b1^t).
    Late in a run that is ~3.2 lr for b1 = 0.9, b2 = 0.999; at step 50 it is ~0.7 lr (measured
    on a resumed HF Trainer run: median |dW| 0.71 lr). Without a stored step, the late value.
    (docs/DESIGN.md "Optimizer state and master weights")."""
    groups = state_dict["param_groups"]
    betas = groups[0].get("betas", _DEFAULT_BETAS) if groups else _DEFAULT_BETAS
    try:
        beta1, beta2 = float(betas[0]), float(betas[1])
    except (TypeError, ValueError, IndexError):
        beta1, beta2 = _DEFAULT_BETAS
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        beta1, beta2 = _DEFAULT_BETAS
    factor = (1.0 - beta1) / math.sqrt(1.0 - beta2)
    step = _stored_step(state_dict)
    if step is None:
        return factor
    t = step + 1
    return float(factor * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))


def _stored_step(state_dict: dict[str, Any]) -> float | None:
    """The largest `step` of the optimizer's per-parameter state (a number or a 0-d tensor)."""
    state = state_dict.get("state")
    steps: list[float] = []
    if isinstance(state, dict):
        for entry in state.values():
            value = entry.get("step") if isinstance(entry, dict) else None
            if (isinstance(value, torch.Tensor) and value.numel() == 1) or (
                isinstance(value, int | float) and not isinstance(value, bool)
            ):
                steps.append(float(value))
    finite = [s for s in steps if math.isfinite(s) and s >= 0]
    return max(finite) if finite else None


def _atomic_write(src: Path, dst: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a temp file beside ``dst``, fsync, then rename: a failure leaves no
    partial optimizer file that a trainer would later choke on."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.pss-tmp-", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        shutil.copymode(src, tmp)  # mkstemp makes it 0600; keep the input's permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
