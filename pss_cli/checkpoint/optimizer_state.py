"""Reading an optimizer state dict and finding the repaired parameters in it: shared by the
optimizer files (optimizer.py) and the optimizer state inside one torch checkpoint file
(optimizer_in_file.py). Loads only with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pss_cli.checkpoint.model import TensorEntry
from pss_cli.errors import CheckpointError
from pss_cli.quiet import quiet_warnings

# Float dtypes a trainable parameter can have: integer/bool tensors are buffers, never params.
_FLOAT_DTYPES = frozenset(
    {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def load_state_dict(src: Path) -> dict[str, Any]:
    hint = (
        "use --optimizer-state keep (copy it unchanged) or --optimizer-state drop "
        "(restart the optimizer)"
    )
    try:
        # Raw (non-zip) pickles make torch warn about the protocol before refusing them; the
        # refusal below says all the user needs.
        with quiet_warnings("Detected pickle protocol"):
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


def moment_shapes(src: Path, state: dict[Any, Any]) -> dict[int, tuple[int, ...]]:
    """param id -> exp_avg shape; refuse optimizers without Adam moments (SGD, Adafactor)."""
    shapes: dict[int, tuple[int, ...]] = {}
    for param_id, param_state in state.items():
        if not (
            isinstance(param_state, dict)
            and all(isinstance(param_state.get(k), torch.Tensor) for k in MOMENT_KEYS)
        ):
            raise CheckpointError(
                f"optimizer state '{src}' has no exp_avg/exp_avg_sq for parameter {param_id}: "
                "not an Adam-style optimizer, so pss cannot reset its moments",
                hint="use --optimizer-state keep or --optimizer-state drop",
            )
        shapes[param_id] = tuple(param_state["exp_avg"].shape)
    return shapes


def map_by_shape(
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


def ids_by_param_names(state_dict: dict[str, Any], modified: Sequence[str]) -> list[int] | None:
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
