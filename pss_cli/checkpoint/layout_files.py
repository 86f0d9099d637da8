"""Helpers that several formats' discovery shares: listing a folder, reading an HF index's
weight_map, refusing one tensor name in two files (torch-free)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from pss_cli.checkpoint.formats.safetensors.header import require_regular_file
from pss_cli.checkpoint.model import TensorEntry
from pss_cli.checkpoint.names import is_model_file
from pss_cli.errors import CheckpointNotFoundError, CorruptCheckpointError


def read_weight_map(index: Path) -> dict[str, str]:
    require_regular_file(index)
    hint = "the index is damaged; re-download model.safetensors.index.json"
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CorruptCheckpointError(f"index '{index}' is not UTF-8 text", hint=hint) from None
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(
            f"index '{index}' is not valid JSON ({exc.msg} at line {exc.lineno})", hint=hint
        ) from None
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read index '{index}': {exc.strerror}") from None
    except (ValueError, RecursionError):
        # an integer of > 4300 digits, or arrays nested thousands deep: not an index
        raise CorruptCheckpointError(
            f"index '{index}' is not a usable JSON file", hint=hint
        ) from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(
            f"'{index}' is not a safetensors index: it has no 'weight_map' object",
            hint="pass the checkpoint folder or a .safetensors file instead",
        )
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CorruptCheckpointError(
                f"index '{index}' maps tensor '{tensor}' to {shard!r}, expected a shard file name",
                hint=hint,
            )
        parts = Path(shard).parts
        if Path(shard).is_absolute() or ".." in parts or "\\" in shard:
            # A shard path must stay inside the checkpoint folder: a hostile index must not make
            # pss open files elsewhere on the machine.
            raise CorruptCheckpointError(
                f"index '{index}' maps tensor '{tensor}' to '{shard}', outside the index's folder",
                hint="shard names must be relative paths inside the checkpoint folder",
            )
    return weight_map


def reject_duplicates(entries: Iterable[TensorEntry]) -> None:
    # Two files holding one name would make "which one is the model?" a guess: refuse.
    seen: dict[str, Path] = {}
    for entry in entries:
        if entry.name in seen:
            raise CorruptCheckpointError(
                f"tensor '{entry.name}' appears in both '{seen[entry.name]}' and '{entry.file}'",
                hint="the folder mixes two checkpoints (e.g. consolidated.safetensors next to "
                "shards); pass one file or index",
            )
        seen[entry.name] = entry.file


def list_files(folder: Path) -> list[Path]:
    """Regular files (symlinks followed, as in the HF cache) directly in ``folder``, by name."""
    try:
        with os.scandir(folder) as it:
            found = [Path(e.path) for e in it if _is_file(e)]
    except PermissionError:
        raise CheckpointNotFoundError(
            f"cannot list folder '{folder}': permission denied",
            hint="check the folder's permissions (ls -ld)",
        ) from None
    return sorted(found)


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()  # follows symlinks; a dangling or looping link is not a file
    except OSError:
        return False


def torch_weight_files(children: list[Path]) -> tuple[Path, ...]:
    return tuple(sorted(p for p in children if is_model_file(p)))
