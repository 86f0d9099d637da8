"""Where a repaired checkpoint goes by default, and which ``--out`` a trainer would delete
(torch-free: names only).

Trainers rotate their checkpoints: HF Trainer with ``save_total_limit`` deletes the oldest
``checkpoint-*`` folders of its ``output_dir`` (``Trainer._sorted_checkpoints`` globs
``checkpoint-*``), accelerate's ``ProjectConfiguration(total_limit=...)`` deletes the oldest
folders of ``checkpoints/`` (every entry there, ordered by the number in its name). A repaired
folder named ``checkpoint-20-pss-smoothed`` beside the originals is deleted at the first save
after resuming with the same ``output_dir``. So the default output leaves the run folder: it
is ``<run>-pss-<checkpoint name>`` beside the run folder (an existing folder, where no rotation
of that run looks); so does a weights file inside a checkpoint folder (``model.safetensors`` of
``checkpoint-N/``); any other checkpoint gets ``<name>-pss-smoothed`` beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

# Names that a trainer's rotation manages (HF Trainer, accelerate, Lightning step names, ...).
_ROTATED = re.compile(r"^(checkpoint[-_]\d+|step[-_=]?\d+|global_step\d+|iter_\d+|epoch=\d+.*)")
_SUFFIXES = (".safetensors", ".pth.tar", ".pt.tar", ".ckpt", ".pt", ".pth", ".bin")
OUT_SUFFIX = "-pss-smoothed"
RUN_SUFFIX = "-pss"


def _stem_suffix(name: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def default_output(source: Path) -> Path:
    """The suggested ``--out`` for repairing ``source`` (see the module docstring)."""
    from pss_cli.checkpoint.out_checks import in_checkpoint_folder

    parent = source.parent
    if parent.name not in ("", ".", "..") and (
        _ROTATED.match(source.name) or in_checkpoint_folder(source)
    ):
        # beside the run (or checkpoint) folder, not inside it: out of the rotation's reach,
        # and not a second weights file in a folder that loaders read as a whole
        return parent.with_name(f"{parent.name}{RUN_SUFFIX}-{source.name}")
    stem, suffix = _stem_suffix(source.name)
    return source.with_name(stem + OUT_SUFFIX + suffix)


def rotation_risk(out: Path) -> str | None:
    """Why a trainer may delete ``out``, or None. ``out`` is at risk when its name is one the
    rotation globs (``checkpoint-*``, ``checkpoint_N``) and it sits beside checkpoints of a run."""
    name = out.name
    parent = out.parent
    if name.startswith("checkpoint-") and _has_sibling(parent, "checkpoint-", out):
        return (
            f"'{out}' is named checkpoint-* inside a folder of Trainer checkpoints: Trainer's "
            "save_total_limit rotation deletes checkpoint-* folders of its output_dir, so "
            "resuming with that output_dir can delete the repaired checkpoint"
        )
    if parent.name == "checkpoints" and _has_sibling(parent, "checkpoint_", out):
        return (
            f"'{out}' is inside an accelerate checkpoints/ folder: accelerate's total_limit "
            "rotation deletes the oldest entries of that folder"
        )
    return None


def _has_sibling(folder: Path, prefix: str, out: Path) -> bool:
    try:
        return any(p.name.startswith(prefix) and p != out for p in folder.iterdir())
    except OSError:
        return False
