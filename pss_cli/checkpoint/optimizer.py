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
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pss_cli.checkpoint import param_order
from pss_cli.checkpoint.model import TensorEntry
from pss_cli.config import OptimizerPolicy
from pss_cli.errors import CheckpointError

OPTIMIZER_FILE_NAMES = ("optimizer.pt", "optimizer.bin")  # HF Trainer / Accelerate
_GLOBAL_STEP_DIR = re.compile(r"global_step\d+")
_ZERO_FILE = re.compile(r".*(optim_states\.pt|model_states\.pt)$|^bf16_zero_.*")
# Float dtypes a trainable parameter can have: integer/bool tensors are buffers, never params.
_FLOAT_DTYPES = frozenset(
    {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
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
    state_dict = _load_state_dict(src)
    state: dict[Any, Any] = state_dict["state"]
    moments = _moment_shapes(src, state)
    if not modified:
        _atomic_write(src, dst, lambda tmp: shutil.copyfile(src, tmp))
        return OptimizerOutcome(OptimizerPolicy.RESET, src, (), "none", ())
    # torch saves `param_names` for optimizers built from named_parameters(): an exact map even
    # when every shape repeats (any model with repeated blocks); else unique shapes; else all.
    ids: list[int] | None = _ids_by_param_names(state_dict, modified)
    doubts: list[str] = []
    matched_by = "by the optimizer's saved param_names"
    if ids is None:
        # HF Trainer / accelerate: the model's own parameter order, rebuilt from config.json
        by_order = param_order.trainer_mapping(src.parent, state_dict, model_entries)
        if by_order is not None and all(name in by_order for name in modified):
            ids = sorted({by_order[name] for name in modified})
            matched_by = "by the model's parameter order and Trainer's decay grouping"
    if ids is None:
        ids, doubts = _map_modified(model_entries, modified, moments)
        matched_by = "by unique shape"
    mapping = "exact" if ids is not None else "all"
    reset_ids = sorted(ids if ids is not None else moments)
    # Zero only the two moments. `step` is kept so the bias corrections stay ~1 (resetting it
    # too would re-run Adam's own warm-up but lose the schedule's position); max_exp_avg_sq
    # (AMSGrad) is kept because a large denominator only damps the first updates.
    for param_id in reset_ids:
        for key in _MOMENT_KEYS:
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


def _load_state_dict(src: Path) -> dict[str, Any]:
    hint = (
        "use --optimizer-state keep (copy it unchanged) or --optimizer-state drop "
        "(restart the optimizer)"
    )
    try:
        with warnings.catch_warnings():
            # Raw (non-zip) pickles make torch warn about the protocol before refusing them; the
            # refusal below says all the user needs.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded: Any = torch.load(src, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read optimizer state '{src}': {exc.strerror or exc}", hint=hint
        ) from None
    except Exception as exc:
        # weights_only=True raises UnpicklingError for any global outside torch's allow-list:
        # the file needs full pickle, which can run arbitrary code, so refuse instead.
        raise CheckpointError(
            f"optimizer state '{src}' cannot be loaded safely: it needs pickle, and pss "
            "refuses to unpickle (that can run arbitrary code), or it is damaged "
            f"({_torch_reason(exc)})",
            hint=hint,
        ) from None
    if not (
        isinstance(loaded, dict)
        and isinstance(loaded.get("state"), dict)
        and isinstance(loaded.get("param_groups"), list)
    ):
        raise CheckpointError(
            f"'{src}' is not a torch optimizer state_dict (no 'state' and 'param_groups')",
            hint=hint,
        )
    return loaded


def _torch_reason(exc: Exception) -> str:
    """The informative part of torch's multi-paragraph weights_only error, on one line (e.g.
    "Unsupported global: GLOBAL io.open was not an allowed global by default")."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch embeds ANSI bold codes
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
        text = text.split(". Please", 1)[0].split("\n\nCheck the documentation", 1)[0]
    text = " ".join(text.split()).rstrip(".")
    return text[:200] or type(exc).__name__


def _moment_shapes(src: Path, state: dict[Any, Any]) -> dict[int, tuple[int, ...]]:
    """param id -> exp_avg shape; refuse optimizers without Adam moments (SGD, Adafactor)."""
    shapes: dict[int, tuple[int, ...]] = {}
    for param_id, param_state in state.items():
        if not (
            isinstance(param_state, dict)
            and all(isinstance(param_state.get(k), torch.Tensor) for k in _MOMENT_KEYS)
        ):
            raise CheckpointError(
                f"optimizer state '{src}' has no exp_avg/exp_avg_sq for parameter {param_id}: "
                "not an Adam-style optimizer, so pss cannot reset its moments",
                hint="use --optimizer-state keep or --optimizer-state drop",
            )
        shapes[param_id] = tuple(param_state["exp_avg"].shape)
    return shapes


def _map_modified(
    model_entries: Sequence[TensorEntry],
    modified: Sequence[str],
    moments: dict[int, tuple[int, ...]],
) -> tuple[list[int] | None, list[str]]:
    """Ids of the modified parameters, or None (and the reasons) when any is in doubt.

    Optimizer ids follow ``model.named_parameters()`` order (trainable only, tied weights once),
    which the safetensors file does not keep (it sorts names), so names cannot be matched to
    ids. A shape can: when exactly one float model tensor and exactly one optimizer state have
    it, they are the same parameter. Anything less certain falls back to resetting everything,
    because zeroing a wrong parameter's moments while leaving the edited one's would be worse.
    """
    shapes = {e.name: e.shape for e in model_entries}
    model_counts = Counter(
        e.shape for e in model_entries if e.dtype in _FLOAT_DTYPES and len(e.shape) >= 1
    )
    opt_counts = Counter(moments.values())
    ids: list[int] = []
    doubts: list[str] = []
    for name in modified:
        if name not in shapes:
            raise ValueError(f"modified tensor '{name}' is not among the model entries")
        shape = shapes[name]
        if model_counts[shape] == 1 and opt_counts[shape] == 1:
            ids.extend(pid for pid, s in moments.items() if s == shape)
            continue
        doubts.append(
            f"'{name}' (shape {list(shape)}: {model_counts[shape]} model tensor(s), "
            f"{opt_counts[shape]} optimizer state(s))"
        )
    if not doubts:
        return sorted(set(ids)), []
    more = f" and {len(doubts) - 1} more" if len(doubts) > 1 else ""
    note = (
        f"cannot tell which optimizer parameters are the {len(modified)} repaired tensor(s): "
        f"no saved param_names, no model order to rebuild, and shapes repeat, e.g. {doubts[0]}"
        f"{more}; resetting the moments of every parameter instead"
    )
    return None, [note]


def _first_update_factor(state_dict: dict[str, Any]) -> float:
    """Adam's first update after zeroing both moments with `step` kept (bias corrections ~1):
    m = (1 - b1) g, v = (1 - b2) g^2, so |update| = lr (1 - b1) / sqrt(1 - b2): ~3.2 lr for
    b1 = 0.9, b2 = 0.999 (docs/DESIGN.md "Optimizer state and master weights")."""
    groups = state_dict["param_groups"]
    betas = groups[0].get("betas", _DEFAULT_BETAS) if groups else _DEFAULT_BETAS
    try:
        beta1, beta2 = float(betas[0]), float(betas[1])
    except (TypeError, ValueError, IndexError):
        beta1, beta2 = _DEFAULT_BETAS
    if not 0.0 <= beta2 < 1.0:
        beta1, beta2 = _DEFAULT_BETAS
    return (1.0 - beta1) / math.sqrt(1.0 - beta2)


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


# Keys under which a single-file training checkpoint (.pt) keeps its optimizer state dict(s):
# plain training loops, torch tutorials, Lightning (a list, one per optimizer).
IN_FILE_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "optimizer_states")


def apply_in_file(
    obj: Any,
    where: Path,
    policy: OptimizerPolicy,
    model_entries: Sequence[TensorEntry],
    modified: Sequence[str],
) -> OptimizerOutcome | None:
    """Apply ``policy`` to optimizer state kept inside a loaded torch checkpoint ``obj`` (a
    dict with e.g. "model" and "optimizer"), in place. None when ``obj`` holds none.

    Same semantics as for optimizer.pt: RESET zeroes the modified parameters' exp_avg and
    exp_avg_sq (matched by the optimizer's own ``param_names`` when it saved them, else by
    unique shape, else every parameter), KEEP leaves them, DROP deletes the optimizer key.
    """
    if not isinstance(obj, dict):
        return None
    keys = [k for k in IN_FILE_OPTIMIZER_KEYS if k in obj]
    if not keys:
        return None
    if policy is OptimizerPolicy.KEEP:
        return _keep_outcome(where, modified)
    if policy is OptimizerPolicy.DROP:
        for key in keys:
            del obj[key]
        message = (
            f"{where.name}: optimizer state ('{keys[0]}') dropped; the training loop must "
            "start a fresh optimizer (a loader that expects the key will fail)"
        )
        return OptimizerOutcome(OptimizerPolicy.DROP, where, (), "none", (message,))
    if not modified:
        return OptimizerOutcome(OptimizerPolicy.RESET, where, (), "none", ())
    state_dicts: list[Any] = []
    for key in keys:
        value = obj[key]
        state_dicts.extend(value if isinstance(value, list) else [value])
    reset_ids: list[int] = []
    reset_names: list[str] = []
    messages: list[str] = []
    mapping = "exact"
    for state_dict in state_dicts:
        if not (
            isinstance(state_dict, dict)
            and isinstance(state_dict.get("state"), dict)
            and isinstance(state_dict.get("param_groups"), list)
        ):
            raise CheckpointError(
                f"'{where}' holds optimizer state under '{keys[0]}' that is not a torch "
                "optimizer state_dict (no 'state' and 'param_groups')",
                hint="use --optimizer-state keep or --optimizer-state drop",
            )
        state: dict[Any, Any] = state_dict["state"]
        moments = _moment_shapes(where, state)
        # FQN-keyed state (torch.distributed.checkpoint.state_dict's get_optimizer_state_dict,
        # saved with torch.save) names the parameters itself.
        ids: list[Any] | None = list(modified) if all(name in state for name in modified) else None
        if ids is None:
            ids = _ids_by_param_names(state_dict, modified)
        if ids is None:
            # Lightning: configure_optimizers(self.parameters()) = the state_dict's order
            by_order = param_order.module_order_mapping(state_dict, model_entries)
            if by_order is not None and all(name in by_order for name in modified):
                ids = sorted({by_order[name] for name in modified})
        doubts: list[str] = []
        if ids is None:
            found, doubts = _map_modified(model_entries, modified, moments)
            ids = list(found) if found is not None else None
        if ids is None:
            mapping = "all"
            ids = sorted(moments)
        ids = [i for i in ids if i in state]  # a parameter never stepped has no state yet
        for param_id in ids:
            for key in _MOMENT_KEYS:
                state[param_id][key].zero_()
        reset_ids.extend(int(i) for i in ids if isinstance(i, int))
        reset_names.extend(str(i) for i in ids if isinstance(i, str))
        messages.extend(doubts)
    messages.append(
        f"{where.name}: zeroed Adam moments (exp_avg, exp_avg_sq) of "
        f"{'ALL' if mapping == 'all' else 'the'} {len(reset_ids) + len(reset_names)} "
        f"{'parameters' if mapping == 'all' else 'repaired parameter(s)'} in '{keys[0]}'; step "
        "counters kept: resume at a lower learning rate (docs/EXPERIMENTS.md)"
    )
    return OptimizerOutcome(
        OptimizerPolicy.RESET,
        where,
        tuple(sorted(reset_ids)),
        mapping,
        tuple(messages),
        reset_names=tuple(reset_names),
    )


def _keep_outcome(where: Path, modified: Sequence[str]) -> OptimizerOutcome:
    messages: tuple[str, ...] = ()
    if modified:
        messages = (
            f"{where.name}: optimizer state kept unchanged: its Adam moments were accumulated "
            f"for the old values of the {len(modified)} repaired tensor(s); use "
            "--optimizer-state reset to zero them; either way, resume at a lower learning rate",
        )
    return OptimizerOutcome(OptimizerPolicy.KEEP, where, (), "none", messages)


def _ids_by_param_names(state_dict: dict[str, Any], modified: Sequence[str]) -> list[int] | None:
    """Ids from the ``param_names`` torch saves for optimizers built from named_parameters();
    None when absent or when a modified name is not among them."""
    names: dict[str, int] = {}
    for group in state_dict["param_groups"]:
        params, param_names = group.get("params"), group.get("param_names")
        if not isinstance(params, list) or not isinstance(param_names, list):
            return None
        names.update(zip((str(n) for n in param_names), params, strict=False))
    if not all(name in names for name in modified):
        return None
    return sorted({names[name] for name in modified})
