"""safetensors: one file, an HF ``*.safetensors.index.json`` with its shards, or a folder of
``.safetensors`` files (e.g. an HF Trainer ``checkpoint-N/``, whose optimizer.pt and
scheduler.pt are the training state). Torch-free at import."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pss_cli.checkpoint.formats.protocol import TensorBackend, WriteRequest, WriteResult
from pss_cli.checkpoint.formats.safetensors.header import read_header
from pss_cli.checkpoint.layout_files import (
    list_files,
    read_weight_map,
    reject_duplicates,
    torch_weight_files,
)
from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.checkpoint.names import is_model_file
from pss_cli.errors import CorruptCheckpointError, UsageError

if TYPE_CHECKING:
    from pss_cli.checkpoint.lr_files import LrScalePlan

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_INDEX_NAME = "model.safetensors.index.json"
_CHUNK = 16 * 2**20


class SafetensorsKind(StrEnum):
    SINGLE_FILE = "single-file"  # one .safetensors file
    SHARDED = "sharded"  # model.safetensors.index.json + shards
    DIRECTORY = "directory"  # a folder (e.g. HF Trainer checkpoint-N/) of .safetensors files


class SafetensorsFormat:
    name = "safetensors"
    title = "safetensors"
    kinds: frozenset[str] = frozenset(SafetensorsKind)
    file_suffixes: tuple[str, ...] = (SAFETENSORS_SUFFIX,)

    def open_file(self, path: Path) -> CheckpointLayout | None:
        if path.name.endswith((SAFETENSORS_SUFFIX, INDEX_SUFFIX)):
            return self.open_any_file(path)
        return None

    def open_any_file(self, path: Path) -> CheckpointLayout:
        """Any .json as an index, any other file as one safetensors file: discovery's fallback
        for a file no format claims (the header checks reject non-safetensors input with a clear
        message, and extension-less downloads still work)."""
        if path.name.endswith(".json"):
            return _open_sharded(path, index=path)
        entries, metadata = read_header(path)
        return CheckpointLayout(
            root=path,
            kind=SafetensorsKind.SINGLE_FILE,
            one_file=True,
            files=(path,),
            entries=tuple(entries),
            metadata={path: metadata},
        )

    def open_folder(self, folder: Path, children: list[Path]) -> CheckpointLayout | None:
        index = _find_index(folder, children)
        if index is not None:
            _refuse_single_beside_index(folder, index, children)
            return _open_sharded(folder, index=index)
        shards = sorted(p for p in children if p.name.endswith(SAFETENSORS_SUFFIX))
        if not shards:
            return None
        entries, metadata = _read_all(shards)
        reject_duplicates(entries)
        return CheckpointLayout(
            root=folder,
            kind=SafetensorsKind.DIRECTORY,
            files=tuple(shards),
            entries=tuple(entries),
            metadata=metadata,
            unindexed_files=torch_weight_files(children),
        )

    def backend(self, layout: CheckpointLayout) -> TensorBackend | None:
        return None  # TensorReader's own path: memory-mapped or positional byte-range reads

    def digests(self, layout: CheckpointLayout, names: set[str] | None) -> dict[str, str]:
        """Of each tensor's byte range, streamed from the file."""
        digests: dict[str, str] = {}
        by_file: dict[Path, list[TensorEntry]] = {}
        for entry in layout.entries:
            if names is None or entry.name in names:
                by_file.setdefault(entry.file, []).append(entry)
        for file, entries in by_file.items():
            with open(file, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                data_start = 8 + header_len
                for entry in sorted(entries, key=lambda e: e.data_offsets):
                    begin, end = entry.data_offsets
                    handle.seek(data_start + begin)
                    digest = hashlib.sha256()
                    remaining = end - begin
                    while remaining:
                        chunk = handle.read(min(_CHUNK, remaining))
                        if not chunk:
                            break
                        digest.update(chunk)
                        remaining -= len(chunk)
                    digests[entry.name] = digest.hexdigest()
        return digests

    def check_output(self, layout: CheckpointLayout, out: Path) -> None:
        return None  # the common checks (out_checks.check_output_path) cover it

    def optimizer_file(self, layout: CheckpointLayout) -> Path | None:
        if layout.one_file:
            return None
        from pss_cli.checkpoint.optimizer import find_optimizer_file

        return find_optimizer_file(layout.folder)

    def lr_plan(
        self, layout: CheckpointLayout, factor: float, keep_optimizer: bool
    ) -> LrScalePlan | None:
        if layout.one_file:
            return None
        from pss_cli.checkpoint.lr_files import LrScalePlan

        return LrScalePlan.for_folder(factor, layout.folder)

    def write(self, request: WriteRequest) -> WriteResult:
        from pss_cli.checkpoint.formats.safetensors.writer import write_repaired_checkpoint

        out = request.out
        written = write_repaired_checkpoint(
            request.layout,
            out,
            request.replacements,
            request.provenance,
            force=request.force,
            extra_files=None if out.name.endswith(SAFETENSORS_SUFFIX) else request.extra_files,
            skip_copy=request.skip_copy,
            before_commit=request.before_commit,
        )
        return WriteResult(written.out)


def _refuse_single_beside_index(folder: Path, index: Path, children: list[Path]) -> None:
    """A `model.safetensors` the default index does not name, beside it: two checkpoints.

    transformers' `from_pretrained` loads `model.safetensors` whenever it exists and ignores the
    index, while the index names other shards (a stale sharded save, or a later merged one).
    pss read the index: `check` passed weights the model never loads, and `smooth` repaired
    shards `from_pretrained` then ignored.
    """
    single = folder / "model.safetensors"
    if index.name != DEFAULT_INDEX_NAME or single not in children:
        return
    if "model.safetensors" in set(read_weight_map(index).values()):
        return  # a one-shard index naming the file itself: one checkpoint
    # A broken save, like two files holding one tensor (reject_duplicates): exit 3, a PSS002
    # finding for `check`, and a gap in `pss trend` rather than the end of it.
    raise CorruptCheckpointError(
        f"folder '{folder}' holds both 'model.safetensors' and '{index.name}', which names "
        "other shards: two checkpoints, and transformers loads 'model.safetensors' (it ignores "
        "the index when that file exists)",
        hint=f"pass the one you mean: '{single}', or '{index}'; and remove the stale one",
    )


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
    weight_map = read_weight_map(index)
    shard_names = sorted(set(weight_map.values()))
    shards = [index.parent / name for name in shard_names]
    for shard in shards:
        if not os.path.lexists(shard):  # a link loop or dangling link fails below, by name
            raise CorruptCheckpointError(
                f"shard '{shard}' named in index '{index}' does not exist",
                hint="the download is incomplete: fetch the missing shard (e.g. git lfs pull)",
            )
    entries, metadata = _read_all(shards)
    reject_duplicates(entries)
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
        + [p for p in list_files(index.parent) if is_model_file(p)]
    )
    return CheckpointLayout(
        root=root,
        kind=SafetensorsKind.SHARDED,
        files=tuple(shards),
        entries=tuple(entries),
        index_file=index,
        metadata=metadata,
        unindexed_files=unindexed,
    )


def _read_all(files: Iterable[Path]) -> tuple[list[TensorEntry], dict[Path, dict[str, str]]]:
    entries: list[TensorEntry] = []
    metadata: dict[Path, dict[str, str]] = {}
    for file in files:
        file_entries, metadata[file] = read_header(file)
        entries.extend(file_entries)
    return entries, metadata
