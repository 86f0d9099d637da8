"""Optimizer state kept inside one torch checkpoint file (a training loop's ``.pt``, a
Lightning ``.ckpt``): the same policies as for an optimizer.pt file (optimizer.py), applied to
the loaded object in place."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pss_cli.checkpoint import param_order
from pss_cli.checkpoint.model import TensorEntry
from pss_cli.checkpoint.optimizer import OptimizerOutcome
from pss_cli.checkpoint.optimizer_state import (
    MOMENT_KEYS,
    ids_by_param_names,
    map_by_shape,
    moment_shapes,
)
from pss_cli.config import OptimizerPolicy
from pss_cli.errors import CheckpointError

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
        moments = moment_shapes(where, state)
        # FQN-keyed state (torch.distributed.checkpoint.state_dict's get_optimizer_state_dict,
        # saved with torch.save) names the parameters itself.
        ids: list[Any] | None = list(modified) if all(name in state for name in modified) else None
        if ids is None:
            ids = ids_by_param_names(state_dict, modified)
        if ids is None:
            # Lightning: configure_optimizers(self.parameters()) = the state_dict's order
            by_order = param_order.module_order_mapping(state_dict, model_entries)
            if by_order is not None and all(name in by_order for name in modified):
                ids = sorted({by_order[name] for name in modified})
        doubts: list[str] = []
        if ids is None:
            found, doubts = map_by_shape(model_entries, modified, moments)
            ids = list(found) if found is not None else None
        if ids is None:
            mapping = "all"
            ids = sorted(moments)
        ids = [i for i in ids if i in state]  # a parameter never stepped has no state yet
        for param_id in ids:
            for key in MOMENT_KEYS:
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
