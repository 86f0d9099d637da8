"""Helpers that several formats' discovery shares: listing a folder, reading an HF index's
weight_map, refusing one tensor name in two files (torch-free)."""

from __future__ import annotations

import json
import os
import re
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
        if exc.doc.startswith("version https://git-lfs"):
            hint = "it is a Git LFS pointer, not the index: fetch the files (git lfs pull)"
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


# Names that hold weights: a link to one of these that leads nowhere is a missing part of the
# checkpoint, not an entry to pass over. (.pt/.bin/.pth/.ckpt only when `is_model_file`: a
# dangling optimizer.pt or training_args.bin says nothing about the weights.)
_WEIGHT_SUFFIXES = (".safetensors", ".distcp", ".index.json")


def _names_weights(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or is_model_file(Path(name))


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        if entry.is_file():  # follows symlinks, as in the HF cache
            return True
    except OSError:
        # A looping link: the reader of that file names it ("symbolic link loop") when the
        # checkpoint needs it (a shard an index names); passed over here as before.
        return False
    if entry.is_symlink() and _names_weights(entry.name) and _dangles(entry.path):
        # A dangling link to weights (an HF cache snapshot whose blob is missing) was dropped
        # without a word: `check` passed on the other files alone.
        try:
            target = os.readlink(entry.path)
        except OSError:
            target = "?"
        raise CorruptCheckpointError(
            f"'{entry.path}' is a symbolic link to '{target}', which does not lead to a file",
            hint="the download is incomplete (a Hugging Face cache blob is missing?): fetch it "
            "again, or remove the link",
        )
    return False


def _dangles(path: str) -> bool:
    """A link whose target does not exist (not a loop: the reader names a loop as one)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def torch_weight_files(children: list[Path]) -> tuple[Path, ...]:
    return tuple(sorted(p for p in children if is_model_file(p)))


# A run's own checkpoints beside a final model (Trainer's output_dir: model.safetensors and
# checkpoint-N/): separate checkpoints by convention, not parts of this one left unscanned.
_RUN_ENTRY = re.compile(r"(checkpoint|global_step|step|iter|epoch)[-_=]?\d+", re.IGNORECASE)


def weight_subfolders(folder: Path, limit: int = 20) -> list[Path]:
    """One weight file per direct sub-folder of ``folder`` that holds weights of its own (a
    sentence-transformers `2_Dense/`, a diffusers `unet/`): not part of the checkpoint read
    from ``folder``'s own files, so a report must say that it was not scanned. Hidden folders
    (pss's cache, staging) and unreadable ones are passed over."""
    found: list[Path] = []
    try:
        with os.scandir(folder) as it:
            subfolders = sorted(
                Path(e.path)
                for e in it
                if not e.name.startswith(".") and not _RUN_ENTRY.match(e.name) and e.is_dir()
            )
    except OSError:
        return found
    for sub in subfolders:
        try:
            with os.scandir(sub) as it:
                names = sorted(e.name for e in it if e.is_file())
        except OSError:
            continue
        weights = [n for n in names if n.endswith(".safetensors") or is_model_file(sub / n)]
        if weights:
            found.append(sub / weights[0])
        if len(found) >= limit:
            break
    return found
