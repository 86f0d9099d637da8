"""Turn a user-given path into a validated CheckpointLayout (headers only, no tensor data).

Accepted: a ``.safetensors`` file; a ``*.safetensors.index.json`` (HF sharded format) or a folder
holding one; a folder of ``.safetensors`` files without an index (e.g. an HF Trainer
``checkpoint-N/``, whose optimizer.pt, trainer_state.json, ... are ignored here); a PyTorch
Distributed Checkpoint folder (``.metadata`` + ``*.distcp``, see dcp.py); a ``.pt``/``.bin``/
``.pth`` file, a ``pytorch_model.bin.index.json`` with its shards, or a folder of such files
(see torch_file.py). A folder with both safetensors and .bin/.pt weights is read as safetensors
(as transformers does); the others are reported as not scanned.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from pss_cli.checkpoint.formats import (
    DCP_METADATA_NAME as METADATA_NAME,
)
from pss_cli.checkpoint.formats import (
    DISTCP_SUFFIX,
    TORCH_DEFAULT_INDEX_NAME,
    TORCH_INDEX_SUFFIX,
    TORCH_SUFFIXES,
    is_model_file,
)
from pss_cli.checkpoint.header import read_header, require_regular_file, stat_path
from pss_cli.checkpoint.model import CheckpointLayout, LayoutKind, TensorEntry
from pss_cli.errors import CheckpointNotFoundError, CorruptCheckpointError, UsageError

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_INDEX_NAME = "model.safetensors.index.json"
# Formats we recognise only to say so clearly.
_UNSUPPORTED_SUFFIXES = {
    ".gguf": "GGUF",
}
_CONVERT_HINT = "convert the weights to safetensors (e.g. safetensors.torch.save_file) first"
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")


def open_checkpoint(path: Path) -> CheckpointLayout:
    """Discover and validate the checkpoint at ``path``; raise a CheckpointError subclass with a
    one-line message naming the file (and tensor) when it is missing or inconsistent."""
    st = stat_path(path)
    if stat.S_ISDIR(st.st_mode):
        return _open_directory(path)
    name = path.name
    if name.endswith(TORCH_INDEX_SUFFIX):
        return _open_torch_sharded(path, index=path)
    if name.endswith(".json"):
        return _open_sharded(path, index=path)
    if name == METADATA_NAME or name.endswith(DISTCP_SUFFIX):
        if name.endswith(DISTCP_SUFFIX) and not (path.parent / METADATA_NAME).is_file():
            raise CorruptCheckpointError(
                f"'{path}' is one file of a PyTorch Distributed Checkpoint, and its folder "
                f"has no '{METADATA_NAME}'",
                hint="pass the whole DCP folder, with its .metadata and every .distcp file",
            )
        return _open_dcp(path.parent)
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        require_regular_file(path)
        return _open_torch_files(path, [path], LayoutKind.TORCH_FILE)
    if suffix in _UNSUPPORTED_SUFFIXES:
        raise CheckpointNotFoundError(
            f"'{path}' is a {_UNSUPPORTED_SUFFIXES[suffix]} file, which pss does not read",
            hint=_CONVERT_HINT,
        )
    # Any other regular file is tried as safetensors: the header checks reject non-safetensors
    # input with a clear message, and extension-less downloads still work.
    entries, metadata = read_header(path)
    return CheckpointLayout(
        root=path,
        kind=LayoutKind.SINGLE_FILE,
        files=(path,),
        entries=tuple(entries),
        metadata={path: metadata},
    )


def _open_directory(folder: Path) -> CheckpointLayout:
    children = _list_files(folder)
    index = _find_index(folder, children)
    if index is not None:
        return _open_sharded(folder, index=index)
    shards = sorted(p for p in children if p.name.endswith(SAFETENSORS_SUFFIX))
    if not shards:
        return _open_other_directory(folder, children)
    entries, metadata = _read_all(shards)
    _reject_duplicates(entries)
    return CheckpointLayout(
        root=folder,
        kind=LayoutKind.DIRECTORY,
        files=tuple(shards),
        entries=tuple(entries),
        metadata=metadata,
        unindexed_files=_torch_weight_files(children),
    )


def _open_other_directory(folder: Path, children: list[Path]) -> CheckpointLayout:
    """A folder without safetensors: DCP, an HF .bin index, or .pt/.bin/.pth weight files."""
    if any(p.name == METADATA_NAME or p.name.endswith(DISTCP_SUFFIX) for p in children):
        return _open_dcp(folder)
    torch_indexes = sorted(p for p in children if p.name.endswith(TORCH_INDEX_SUFFIX))
    if torch_indexes:
        by_name = {p.name: p for p in torch_indexes}
        if TORCH_DEFAULT_INDEX_NAME not in by_name and len(torch_indexes) > 1:
            raise UsageError(
                f"folder '{folder}' holds several .bin indexes "
                f"({', '.join(p.name for p in torch_indexes)})",
                hint="pass the index file you mean instead of the folder",
            )
        index = by_name.get(TORCH_DEFAULT_INDEX_NAME, torch_indexes[0])
        return _open_torch_sharded(folder, index=index)
    weights = list(_torch_weight_files(children))
    if weights:
        return _open_torch_files(folder, weights, LayoutKind.TORCH_DIRECTORY)
    raise _no_safetensors_error(folder, children)


def _open_dcp(folder: Path) -> CheckpointLayout:
    from pss_cli.checkpoint.dcp import open_dcp  # imports torch.distributed: only when needed

    return open_dcp(folder)


def _torch_weight_files(children: list[Path]) -> tuple[Path, ...]:
    return tuple(sorted(p for p in children if is_model_file(p)))


def _open_torch_files(root: Path, files: list[Path], kind: LayoutKind) -> CheckpointLayout:
    from pss_cli.checkpoint.torch_file import entries_of  # imports torch: only when needed
    from pss_cli.checkpoint.torch_file import load as load_torch

    entries: list[TensorEntry] = []
    for file in files:
        entries.extend(entries_of(file, load_torch(file)))
    _reject_duplicates(entries)
    return CheckpointLayout(root=root, kind=kind, files=tuple(files), entries=tuple(entries))


def _open_torch_sharded(root: Path, index: Path) -> CheckpointLayout:
    weight_map = _read_weight_map(index)
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not os.path.lexists(shard):
            raise CorruptCheckpointError(
                f"shard '{shard}' named in index '{index}' does not exist",
                hint="the download is incomplete: fetch the missing shard (e.g. git lfs pull)",
            )
        require_regular_file(shard)
    layout = _open_torch_files(root, shards, LayoutKind.TORCH_SHARDED)
    location = {e.name: e.file for e in layout.entries}
    for tensor, shard_name in weight_map.items():
        expected = index.parent / shard_name
        actual = location.get(tensor)
        if actual is not None and actual != expected:
            raise CorruptCheckpointError(
                f"tensor '{tensor}' is mapped to shard '{expected}' by index '{index}' "
                f"but it is in '{actual}'",
                hint="the index and the shards come from different saves; re-download them",
            )
        # A name absent from every shard may be a tied alias listed once (entries_of keeps
        # one name per shared tensor) or a non-float tensor; the shards are what is written.
    return replace(layout, index_file=index)


def _find_index(folder: Path, children: list[Path]) -> Path | None:
    indexes = sorted(p for p in children if p.name.endswith(INDEX_SUFFIX))
    by_name = {p.name: p for p in indexes}
    if DEFAULT_INDEX_NAME in by_name:
        return by_name[DEFAULT_INDEX_NAME]
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise UsageError(
            f"folder '{folder}' holds several safetensors indexes ({names})",
            hint="pass the index file you mean instead of the folder",
        )
    return indexes[0] if indexes else None


def _open_sharded(root: Path, index: Path) -> CheckpointLayout:
    weight_map = _read_weight_map(index)
    shard_names = sorted(set(weight_map.values()))
    shards = [index.parent / name for name in shard_names]
    for shard in shards:
        if not os.path.lexists(shard):  # a link loop or dangling link fails below, by name
            raise CorruptCheckpointError(
                f"shard '{shard}' named in index '{index}' does not exist",
                hint="the download is incomplete: fetch the missing shard (e.g. git lfs pull)",
            )
    entries, metadata = _read_all(shards)
    _reject_duplicates(entries)
    location = {e.name: e.file for e in entries}
    for tensor, shard_name in weight_map.items():
        expected = index.parent / shard_name
        actual = location.get(tensor)
        if actual != expected:
            found = f" (it is in '{actual}')" if actual is not None else ""
            raise CorruptCheckpointError(
                f"tensor '{tensor}' is mapped to shard '{expected}' by index '{index}' "
                f"but that shard does not hold it{found}",
                hint="the index and the shards come from different saves; re-download them",
            )
    # Tensors present in a shard but missing from the weight_map stay in: they are in the files,
    # and a repair must write them back unchanged.
    named = {shard.resolve() for shard in shards}
    unindexed = tuple(
        sorted(
            p
            for p in index.parent.glob(f"*{SAFETENSORS_SUFFIX}")
            if p.is_file() and p.resolve() not in named
        )
        + [p for p in _list_files(index.parent) if is_model_file(p)]
    )
    return CheckpointLayout(
        root=root,
        kind=LayoutKind.SHARDED,
        files=tuple(shards),
        entries=tuple(entries),
        index_file=index,
        metadata=metadata,
        unindexed_files=unindexed,
    )


def _read_weight_map(index: Path) -> dict[str, str]:
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


def _read_all(files: Iterable[Path]) -> tuple[list[TensorEntry], dict[Path, dict[str, str]]]:
    entries: list[TensorEntry] = []
    metadata: dict[Path, dict[str, str]] = {}
    for file in files:
        file_entries, metadata[file] = read_header(file)
        entries.extend(file_entries)
    return entries, metadata


def _reject_duplicates(entries: Iterable[TensorEntry]) -> None:
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


def _list_files(folder: Path) -> list[Path]:
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


def _no_safetensors_error(folder: Path, children: list[Path]) -> CheckpointNotFoundError:
    found = ", ".join(p.name for p in children[:8]) or "nothing"
    if len(children) > 8:
        found += f", ... ({len(children)} files)"
    unsupported = sorted({p.suffix for p in children if p.suffix.lower() in _UNSUPPORTED_SUFFIXES})
    note = f"; {'/'.join(unsupported)} files are not supported yet" if unsupported else ""
    message = f"folder '{folder}' holds no .safetensors files (found: {found}){note}"
    latest = _latest_checkpoint_dir(folder)
    if latest is not None:
        hint = f"it holds trainer checkpoints: pass one of them, e.g. '{latest}'"
    elif unsupported:
        hint = _CONVERT_HINT
    else:
        hint = "pass a folder or file that holds .safetensors weights"
    return CheckpointNotFoundError(message, hint=hint)


def _latest_checkpoint_dir(folder: Path) -> Path | None:
    try:
        subdirs = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT_DIR.fullmatch(p.name)]
    except OSError:
        return None
    if not subdirs:
        return None
    return max(subdirs, key=lambda p: int(p.name.split("-")[1]))
