"""torch.save pickles read with weights_only=True: one ``.pt``/``.bin``/``.pth``/``.ckpt`` file
(a Lightning ``.ckpt`` holds its optimizer and LR schedulers inside), an HF
``pytorch_model.bin.index.json`` with its shards, or a folder of such files. Torch-free at
import: torch loads on first use."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pss_cli.checkpoint.formats.protocol import TensorBackend, WriteRequest, WriteResult
from pss_cli.checkpoint.formats.safetensors.header import require_regular_file
from pss_cli.checkpoint.layout_files import (
    read_weight_map,
    reject_duplicates,
    torch_weight_files,
)
from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.checkpoint.names import (
    TORCH_DEFAULT_INDEX_NAME,
    TORCH_INDEX_SUFFIX,
    TORCH_SUFFIXES,
    TORCH_TAR_SUFFIXES,
    is_torch_file_name,
)
from pss_cli.errors import CorruptCheckpointError, UsageError

if TYPE_CHECKING:
    from pss_cli.checkpoint.lr_files import LrScalePlan

_CHUNK = 16 * 2**20


class TorchKind(StrEnum):
    FILE = "torch-file"  # one .pt/.bin/.pth/.ckpt file
    SHARDED = "torch-sharded"  # pytorch_model.bin.index.json + shards
    DIRECTORY = "torch-directory"  # a folder of such files


class TorchFormat:
    name = "torch"
    title = "PyTorch"
    kinds: frozenset[str] = frozenset(TorchKind)
    file_suffixes: tuple[str, ...] = (*TORCH_TAR_SUFFIXES, *TORCH_SUFFIXES)

    def open_file(self, path: Path) -> CheckpointLayout | None:
        if path.name.endswith(TORCH_INDEX_SUFFIX):
            return _open_torch_sharded(path, index=path)
        if path.suffix.lower() in TORCH_SUFFIXES or _torch_tar(path):
            require_regular_file(path)
            return _open_torch_files(path, [path], TorchKind.FILE)
        return None

    def open_folder(self, folder: Path, children: list[Path]) -> CheckpointLayout | None:
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
        weights = list(torch_weight_files(children))
        if weights:
            return _open_torch_files(folder, weights, TorchKind.DIRECTORY)
        return None

    def backend(self, layout: CheckpointLayout) -> TensorBackend | None:
        from pss_cli.checkpoint.formats.torch.torch_file import TorchBackend

        return TorchBackend(layout)

    def digests(self, layout: CheckpointLayout, names: set[str] | None) -> dict[str, str]:
        """Of the tensor's values as stored (row-major bytes), since torch.save places them
        anew each time."""
        import torch

        from pss_cli.checkpoint.reader import TensorReader

        digests: dict[str, str] = {}
        with TensorReader(layout) as reader:
            for entry in layout.entries:
                if names is not None and entry.name not in names:
                    continue
                tensor = reader.read(entry).contiguous().reshape(-1)
                digest = hashlib.sha256()
                raw = tensor.view(torch.uint8) if tensor.numel() else tensor.new_empty(0)
                for start in range(0, raw.numel(), _CHUNK):  # bounded copies
                    digest.update(raw[start : start + _CHUNK].numpy().tobytes())
                digests[entry.name] = digest.hexdigest()
        return digests

    def check_output(self, layout: CheckpointLayout, out: Path) -> None:
        return None  # the common checks (out_checks.check_output_path) cover it

    def optimizer_file(self, layout: CheckpointLayout) -> Path | None:
        if layout.one_file:
            return None  # its optimizer state, if any, is inside the file (edit_object)
        from pss_cli.checkpoint.optimizer import find_optimizer_file

        return find_optimizer_file(layout.folder)

    def lr_plan(
        self, layout: CheckpointLayout, factor: float, keep_optimizer: bool
    ) -> LrScalePlan | None:
        from pss_cli.checkpoint.lr_files import LrScalePlan

        if layout.one_file:
            from pss_cli.checkpoint.formats.torch.torch_file import load

            return LrScalePlan.for_file(factor, layout.root, load(layout.root))
        return LrScalePlan.for_folder(factor, layout.folder)

    def write(self, request: WriteRequest) -> WriteResult:
        from pss_cli.checkpoint.formats.torch.torch_writer import write_torch_checkpoint

        out = request.out
        written = write_torch_checkpoint(
            request.layout,
            out,
            request.replacements,
            request.provenance,
            force=request.force,
            extra_files=None if is_torch_file_name(out) else request.extra_files,
            skip_copy=request.skip_copy,
            edit_object=request.edit_object,
            before_commit=request.before_commit,
        )
        return WriteResult(written)


def _open_torch_files(root: Path, files: list[Path], kind: TorchKind) -> CheckpointLayout:
    # imports torch: only when needed
    from pss_cli.checkpoint.formats.torch.torch_file import entries_of, other_weight_sets
    from pss_cli.checkpoint.formats.torch.torch_file import load as load_torch

    entries: list[TensorEntry] = []
    aliases: list[tuple[str, str, Path]] = []
    others: list[tuple[str, int, Path]] = []
    for file in files:
        tied: dict[str, str] = {}
        obj = load_torch(file)
        entries.extend(entries_of(file, obj, tied))
        aliases.extend((alias, name, file) for alias, name in tied.items())
        others.extend((key, count, file) for key, count in other_weight_sets(obj))
    reject_duplicates(entries)
    return CheckpointLayout(
        root=root,
        kind=kind,
        files=tuple(files),
        entries=tuple(entries),
        one_file=kind is TorchKind.FILE,
        aliases=tuple(aliases),
        other_weight_sets=tuple(others),
    )


def _open_torch_sharded(root: Path, index: Path) -> CheckpointLayout:
    weight_map = read_weight_map(index)
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not os.path.lexists(shard):
            raise CorruptCheckpointError(
                f"shard '{shard}' named in index '{index}' does not exist",
                hint="the download is incomplete: fetch the missing shard (e.g. git lfs pull)",
            )
        require_regular_file(shard)
    layout = _open_torch_files(root, shards, TorchKind.SHARDED)
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


def _torch_tar(path: Path) -> bool:
    """timm's `checkpoint-N.pth.tar` / `model_best.pth.tar`: a torch.save file whatever the
    `.tar` says (its content decides: a real tar archive is not read)."""
    from pss_cli.checkpoint.sniff import sniff

    name = path.name.lower()
    return name.endswith(TORCH_TAR_SUFFIXES) and path.is_file() and sniff(path) == "torch"
