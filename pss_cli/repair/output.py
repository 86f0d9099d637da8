"""Refusals about OUT and --lr-scale, all made before any computation."""

from __future__ import annotations

import math
import os
from pathlib import Path

from pss_cli.checkpoint import out_checks
from pss_cli.checkpoint.formats.registry import format_of
from pss_cli.checkpoint.formats.safetensors.header import read_header
from pss_cli.checkpoint.lr_files import LrScalePlan
from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.names import provenance_sidecar
from pss_cli.config import OptimizerPolicy
from pss_cli.errors import PssError, UsageError
from pss_cli.repair.model import SmoothConfig


def check_output(layout: CheckpointLayout, out: Path, force: bool) -> None:
    """Every refusal about OUT before any work is done (not after minutes of SVDs)."""
    out_checks.check_output_path(layout, out, force=force)
    out_checks.probe_writable(out.parent, out)
    out_checks.refuse_file_in_checkpoint_folder(layout.root, out)
    folder = layout.folder
    format_of(layout.kind).check_output(layout, out)
    if not layout.one_file:
        nested = [f for f in layout.files if f.parent.resolve() != folder.resolve()]
        if nested:
            raise UsageError(
                f"shard '{nested[0]}' is not directly in '{folder}': pss smooth cannot mirror "
                "shards in sub-folders yet",
                "move the shards next to the index (and fix the weight_map), then retry",
            )
    if force and os.path.lexists(out) and not _is_pss_output(out):
        # --force replaces a previous repair, never an arbitrary folder (a typo in --out
        # must not delete someone's work).
        raise UsageError(
            f"refusing to replace '{out}': it is not empty and holds no pss output",
            "delete it yourself if you mean it, or choose another --out",
        )


def _is_pss_output(out: Path) -> bool:
    if provenance_sidecar(out).is_file():  # DCP and torch outputs carry a sidecar
        return True
    if out.is_dir() and not out.is_symlink():
        files = list(out.glob("*.safetensors"))
        if not any(out.iterdir()):
            return True
    elif out.is_file() and out.name.endswith(".safetensors"):
        files = [out]
    else:
        return False
    for file in files:
        try:
            _, metadata = read_header(file)
        except PssError:
            continue
        if "pss.version" in metadata:
            return True
    return False


def staging_notes(out: Path, clean: bool) -> list[str]:
    """Refuse a concurrent run into OUT; name (or, with clean, remove) stale staging entries."""
    entries = out_checks.staging_entries(out)
    out_checks.refuse_concurrent(out, entries)
    if clean and entries.stale:
        removed = out_checks.remove_stale(entries)
        return [f"removed {len(removed)} stale staging entr{'y' if len(removed) == 1 else 'ies'}"]
    note = out_checks.stale_note(entries)
    return [note] if note else []


def lr_scale_plan(layout: CheckpointLayout, config: SmoothConfig) -> LrScalePlan | None:
    """Find what --lr-scale will scale before any computation; refuse when there is nothing."""
    if config.lr_scale is None:
        return None
    factor = config.lr_scale
    if not (math.isfinite(factor) and factor > 0):
        raise UsageError(f"--lr-scale must be a positive number (got {factor})")
    plan = format_of(layout.kind).lr_plan(
        layout, factor, keep_optimizer=config.optimizer_state is not OptimizerPolicy.DROP
    )
    if plan is None:
        raise UsageError(
            f"--lr-scale has nothing to scale: '{layout.root}' holds no optimizer or LR "
            "scheduler state",
            "pass the training checkpoint (a Trainer checkpoint-N/ folder, an accelerate "
            "save_state folder, a Lightning .ckpt), or set the LR in your training script",
        )
    return plan
