"""Hashes of tensors' stored bytes, read straight from the files (to prove "byte-identical")."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry

_CHUNK = 16 * 2**20


def tensor_digests(layout: CheckpointLayout, names: set[str] | None = None) -> dict[str, str]:
    """sha256 of each tensor's byte range (all tensors, or those in `names`), streamed."""
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
