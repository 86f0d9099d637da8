"""Hashes of tensors' stored bytes, read straight from the files (to prove "byte-identical")."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from pss_cli.checkpoint.model import TORCH_KINDS, CheckpointLayout, LayoutKind, TensorEntry

_CHUNK = 16 * 2**20


def tensor_digests(layout: CheckpointLayout, names: set[str] | None = None) -> dict[str, str]:
    """sha256 of each tensor's byte range (all tensors, or those in `names`), streamed.

    DCP: of the tensor's stored chunk items (verbatim copies hash alike). torch pickles: of the
    tensor's values as stored (row-major bytes), since torch.save places them anew each time.
    """
    if layout.kind is LayoutKind.DCP:
        return _dcp_digests(layout, names)
    if layout.kind in TORCH_KINDS:
        return _torch_digests(layout, names)
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


def _dcp_digests(layout: CheckpointLayout, names: set[str] | None) -> dict[str, str]:
    from pss_cli.checkpoint.dcp import chunk_indexes, load_metadata, read_item_bytes

    metadata = load_metadata(layout.root)
    digests: dict[str, str] = {}
    for entry in layout.entries:
        if names is not None and entry.name not in names:
            continue
        key = str(entry.key[0])
        storage = metadata.state_dict_metadata[key]
        digest = hashlib.sha256()
        for index in chunk_indexes(key, storage):  # type: ignore[arg-type]
            for piece in read_item_bytes(layout.root, metadata.storage_data[index]):
                digest.update(piece)
        digests[entry.name] = digest.hexdigest()
    return digests


def _torch_digests(layout: CheckpointLayout, names: set[str] | None) -> dict[str, str]:
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
            for start in range(0, raw.numel(), _CHUNK):  # bounded copies, not a whole tensor
                digest.update(raw[start : start + _CHUNK].numpy().tobytes())
            digests[entry.name] = digest.hexdigest()
    return digests
