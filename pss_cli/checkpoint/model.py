"""Plain descriptions of a checkpoint on disk (torch-free, so they can be built from headers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its file's header describes it (nothing read yet)."""

    name: str
    file: Path  # the file holding it (a DCP tensor: the .distcp file of its first chunk)
    dtype: str  # safetensors dtype string: "F32", "BF16", "F16", "F64", "I8", "F8_E4M3", ...
    shape: tuple[int, ...]
    # byte range inside a safetensors file's data area; (0, nbytes) for the other formats,
    # which have no such range (their tensors sit inside pickles or DCP storage items)
    data_offsets: tuple[int, int]
    # Where the tensor lives for formats whose names are not storage keys: the key path into a
    # torch pickle's nested containers, or (dcp_key,) for a DCP entry (whose name is the model
    # FQN, its key e.g. "model.<fqn>"). Empty for safetensors.
    key: tuple[str | int, ...] = ()

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass(frozen=True)
class CheckpointLayout:
    """A validated checkpoint: every header parsed and checked, no tensor data loaded."""

    root: Path  # what the user named (file or directory)
    # The layout's kind, named by the format that opened it (formats/<name>/format.py declares
    # its kinds; formats/registry.format_of maps a kind back to its format). Generic code never
    # branches on it: it asks the format, or reads `one_file`.
    kind: str
    files: tuple[Path, ...]  # its weight files, in a stable order
    entries: tuple[TensorEntry, ...]  # every tensor, in file order then header order
    index_file: Path | None = None
    metadata: dict[Path, dict[str, str]] = field(default_factory=dict)  # per-file __metadata__
    # .safetensors files beside an index that the index does not name (e.g. Mistral's
    # consolidated.safetensors): not read, but reported so that nobody believes they were.
    unindexed_files: tuple[Path, ...] = ()
    # The user named one weights file: a repaired copy is one file too, and the files beside it
    # (optimizer.pt, ZeRO state) are not part of the checkpoint.
    one_file: bool = False
    # Names under which a torch file stores a tensor it also stores under an earlier name (tied
    # weights): (alias, the name it is analysed under, file). Reported, never analysed twice.
    aliases: tuple[tuple[str, str, Path], ...] = ()
    # Dicts of weights a wrapped torch file keeps beside the model's (an EMA copy): (key, tensor
    # count, file). Not analysed; reported so that nobody believes they were.
    other_weight_sets: tuple[tuple[str, int, Path], ...] = ()

    @property
    def folder(self) -> Path:
        """The folder the checkpoint lives in, whose other files (optimizer.pt, config.json,
        trainer_state.json) travel with it: a one-file input's parent (that file alone is
        the checkpoint), an index's folder, else the folder the user named."""
        if self.one_file:
            return self.root.parent
        if self.index_file is not None:
            return self.index_file.parent
        return self.root
