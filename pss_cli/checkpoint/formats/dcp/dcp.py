"""Read PyTorch Distributed Checkpoint (DCP) folders without a process group.

A DCP folder holds ``.metadata`` (a pickled ``torch.distributed.checkpoint.metadata.Metadata``:
every key's shape, dtype and chunks, and where each chunk's storage item lies) and ``*.distcp``
files (each storage item is one ``torch.save`` of a chunk, or raw bytes for non-tensor values).
FSDP, torchtitan, OLMo-core and Megatron-Core's ``torch_dist`` write them.

Security: torch's own ``FileSystemReader.read_metadata`` runs ``pickle.load`` on ``.metadata``,
which executes whatever the pickle says. pss instead unpickles it with an allow-list of the
classes a DCP Metadata is built from (below), so a crafted ``.metadata`` cannot run code; the
tensors themselves are read by torch with ``weights_only=True``. Non-tensor values (bytes items,
which torch would unpickle with ``weights_only=False``) are never loaded, only byte-copied.

Names: model weights keep their FQN (``model.<fqn>`` or a bare ``<fqn>`` key -> ``<fqn>``), so a
scan of a DCP folder names matrices exactly like one of the same weights in safetensors.
Optimizer moments (2-D float tensors like the weights) and other state are not entries: they are
never scanned, only carried (or reset/dropped) by ``pss smooth``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from pss_cli.checkpoint.formats.dcp.format import DcpKind
from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.checkpoint.names import DCP_METADATA_NAME, DISTCP_SUFFIX
from pss_cli.checkpoint.torch_dtypes import safetensors_dtype
from pss_cli.errors import CheckpointError, CorruptCheckpointError

METADATA_NAME = DCP_METADATA_NAME
# Top-level keys (first element of a key's planner path) that hold the model's weights in the
# common layouts: dcp.save({"model": model.state_dict(), ...}), Lightning/DeepSpeed-style names.
MODEL_KEYS = ("model", "module", "state_dict", "model_state_dict")
# First elements that are never model weights (optimizer, schedulers, trainer state).
NON_MODEL_KEYS = frozenset(
    {
        "optimizer",
        "optim",
        "optimizers",
        "optimizer_state",
        "optimizer_state_dict",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "dataloader",
        "train_state",
        "trainer",
        "rng",
        "rng_state",
        "extra_state",
    }
)
# Key suffixes of per-parameter optimizer state, in case a trainer flattened it to the top level.
_OPTIMIZER_LEAVES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "step")
_METADATA_HINT = (
    "the DCP folder is incomplete or damaged: copy it again from where it was saved "
    "(.metadata is written last, by the coordinator rank)"
)

# (module, name) pairs a DCP .metadata pickle may reference. Everything here is a plain data
# class, an enum, or a constructor of a dtype/size/path from literal arguments: none runs
# code chosen by the file.
_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "MetadataIndex",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "StorageMeta",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.distributed.checkpoint._extension", "ExtensionRegistry"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only DCP metadata classes and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in DCP metadata")


def _safe_listdir(folder: Path) -> list[Path]:
    try:
        return [folder / name for name in os.listdir(folder)]
    except OSError:
        return []


def load_metadata(folder: Path) -> Metadata:
    """The folder's DCP Metadata, unpickled through the allow-list; CorruptCheckpointError
    naming ``.metadata`` when it is missing, unreadable or not DCP metadata."""
    path = folder / METADATA_NAME
    if not path.is_file():
        distcp = sorted(p.name for p in _safe_listdir(folder) if p.name.endswith(DISTCP_SUFFIX))
        raise CorruptCheckpointError(
            f"DCP folder '{folder}' has no '{METADATA_NAME}' file"
            + (f" (it holds {distcp[0]}, ...)" if distcp else ""),
            hint=_METADATA_HINT,
        )
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as exc:
        raise CorruptCheckpointError(
            f"cannot read DCP metadata '{path}': {exc.strerror or exc}", hint=_METADATA_HINT
        ) from None
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "is not allowed" in message:
            raise CorruptCheckpointError(
                f"DCP metadata '{path}' references {message.split(' is not allowed')[0]}, "
                "which DCP metadata never holds; pss does not unpickle it (that could run code)",
                hint="only open checkpoints from a source you trust; re-save it with "
                "torch.distributed.checkpoint",
            ) from None
        raise CorruptCheckpointError(
            f"DCP metadata '{path}' is not a valid pickle ({message or 'truncated'})",
            hint=_METADATA_HINT,
        ) from None
    except Exception as exc:  # EOFError, ValueError, TypeError from a damaged stream
        raise CorruptCheckpointError(
            f"DCP metadata '{path}' is damaged ({type(exc).__name__}: {one_line(exc)})",
            hint=_METADATA_HINT,
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(
        getattr(metadata, "state_dict_metadata", None), dict
    ):
        raise CorruptCheckpointError(
            f"'{path}' does not hold DCP metadata (found {type(metadata).__name__})",
            hint=_METADATA_HINT,
        )
    if not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CorruptCheckpointError(
            f"DCP metadata '{path}' has no storage map (written by an unsupported torch?)",
            hint=_METADATA_HINT,
        )
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with the allow-listed metadata loader (reads stay torch's:
    ``torch.load(weights_only=True)`` per storage item)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return load_metadata(Path(self.path))


@dataclass(frozen=True)
class DcpKey:
    """One DCP key and what pss makes of it."""

    key: str  # the flattened DCP key, e.g. "model.layers.0.attn.wq.weight"
    path: tuple[str | int, ...]  # the planner path, e.g. ("model", "layers.0.attn.wq.weight")
    storage: TensorStorageMetadata | BytesStorageMetadata


def keys_of(metadata: Metadata) -> list[DcpKey]:
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    found = []
    for key, storage in metadata.state_dict_metadata.items():
        path = planner_data.get(key)
        if not isinstance(path, tuple) or not path:
            path = (key,)
        found.append(DcpKey(str(key), tuple(path), storage))
    return found


def model_name(item: DcpKey) -> str | None:
    """The model FQN a DCP key holds, or None when it is not a model weight."""
    path = item.path
    head = path[0]
    if isinstance(head, str) and head in MODEL_KEYS and len(path) >= 2:
        return ".".join(str(p) for p in path[1:])
    if len(path) == 1 and isinstance(head, str):
        first = head.split(".", 1)[0]
        if first in NON_MODEL_KEYS or head.endswith(_OPTIMIZER_LEAVES):
            return None
        return head
    return None


def open_dcp(folder: Path) -> CheckpointLayout:
    """A DCP folder as a layout of its model weights (metadata only, no tensor data)."""
    metadata = load_metadata(folder)
    files = _storage_files(folder, metadata)
    entries: list[TensorEntry] = []
    seen: dict[str, str] = {}
    for item in keys_of(metadata):
        if not isinstance(item.storage, TensorStorageMetadata):
            continue
        name = model_name(item)
        if name is None:
            continue
        if name in seen:
            raise CorruptCheckpointError(
                f"DCP keys '{seen[name]}' and '{item.key}' in '{folder}' both hold model "
                f"weight '{name}'",
                hint="pass a checkpoint with one model state dict",
            )
        seen[name] = item.key
        entries.append(_entry(folder, metadata, item, name))
    return CheckpointLayout(
        root=folder,
        kind=DcpKind.FOLDER,
        files=tuple(files),
        entries=tuple(entries),
        index_file=folder / METADATA_NAME,
    )


def _storage_files(folder: Path, metadata: Metadata) -> list[Path]:
    names: set[str] = set()
    for index, info in metadata.storage_data.items():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or not relative:
            raise CorruptCheckpointError(
                f"DCP metadata in '{folder}' gives no file for '{_index_name(index)}'",
                hint=_METADATA_HINT,
            )
        parts = Path(relative).parts
        if Path(relative).is_absolute() or ".." in parts or len(parts) != 1:
            # A hostile .metadata must not make pss read (or later copy) files elsewhere.
            raise CorruptCheckpointError(
                f"DCP metadata in '{folder}' places '{_index_name(index)}' in '{relative}', "
                "outside the checkpoint folder",
                hint=_METADATA_HINT,
            )
        names.add(relative)
    files = sorted(folder / name for name in names)
    sizes: dict[str, int] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(
                f"DCP storage file '{file}' named by '{folder / METADATA_NAME}' does not exist",
                hint="the checkpoint copy is incomplete: every rank's .distcp file is needed",
            )
        sizes[file.name] = file.stat().st_size
    for index, info in metadata.storage_data.items():
        end = int(info.offset) + int(info.length)
        if int(info.offset) < 0 or int(info.length) < 0 or end > sizes[info.relative_path]:
            # Caught here, by name, instead of as an obscure unpickling error mid-scan.
            raise CorruptCheckpointError(
                f"DCP storage file '{folder / info.relative_path}' is truncated: it has "
                f"{sizes[info.relative_path]} bytes, '{_index_name(index)}' needs bytes up "
                f"to {end}",
                hint="the copy is incomplete (or a rank was killed while saving): copy the "
                "checkpoint again",
            )
    return files


def _index_name(index: object) -> str:
    return str(getattr(index, "fqn", index))


def chunk_indexes(key: str, storage: TensorStorageMetadata) -> list[MetadataIndex]:
    return [MetadataIndex(key, chunk.offsets) for chunk in storage.chunks]


def _entry(folder: Path, metadata: Metadata, item: DcpKey, name: str) -> TensorEntry:
    storage = item.storage
    assert isinstance(storage, TensorStorageMetadata)
    shape = tuple(int(d) for d in storage.size)
    dtype = safetensors_dtype(storage.properties.dtype)
    if dtype is None:
        raise CorruptCheckpointError(
            f"DCP tensor '{item.key}' in '{folder}' has dtype {storage.properties.dtype}, "
            "which pss does not know",
            hint="exclude it or convert the checkpoint",
        )
    infos = []
    for index in chunk_indexes(item.key, storage):
        info = metadata.storage_data.get(index)
        if info is None:
            raise CorruptCheckpointError(
                f"DCP metadata in '{folder}' lists a chunk of '{item.key}' at offsets "
                f"{list(index.offset or ())} without storage",
                hint=_METADATA_HINT,
            )
        infos.append(info)
    if not infos:
        raise CorruptCheckpointError(
            f"DCP tensor '{item.key}' in '{folder}' has no chunks", hint=_METADATA_HINT
        )
    _check_chunks_cover(folder, item.key, storage)
    nbytes = _numel(shape) * storage.properties.dtype.itemsize
    return TensorEntry(
        name=name,
        file=folder / infos[0].relative_path,
        dtype=dtype,
        shape=shape,
        data_offsets=(0, nbytes),
        key=(item.key,),
    )


def _check_chunks_cover(folder: Path, key: str, storage: TensorStorageMetadata) -> None:
    """Chunks must lie inside the tensor and add up to it (DCP chunks never overlap), else a
    read would leave parts of the tensor uninitialised."""
    size = tuple(int(d) for d in storage.size)
    total = 0
    for chunk in storage.chunks:
        offsets = tuple(int(o) for o in chunk.offsets)
        sizes = tuple(int(s) for s in chunk.sizes)
        if (
            len(offsets) != len(size)
            or len(sizes) != len(size)
            or any(
                o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)
            )
        ):
            raise CorruptCheckpointError(
                f"DCP metadata in '{folder}': a chunk of '{key}' (offsets {list(offsets)}, "
                f"sizes {list(sizes)}) lies outside its shape {list(size)}",
                hint=_METADATA_HINT,
            )
        total += _numel(sizes)
    if total != _numel(size):
        raise CorruptCheckpointError(
            f"DCP metadata in '{folder}': the chunks of '{key}' hold {total} of its "
            f"{_numel(size)} elements",
            hint=_METADATA_HINT,
        )


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
