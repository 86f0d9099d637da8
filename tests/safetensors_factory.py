"""Write valid and deliberately broken safetensors files byte by byte (for tests).

Independent of pss_cli.checkpoint.formats.safetensors.header on purpose: the item sizes here
are the test's own oracle, and corrupt files are built from explicit bytes, not through the
library under test.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

Spec = tuple[str, str, tuple[int, ...]]  # (name, dtype, shape)
DEFAULT_SPECS: tuple[Spec, ...] = (("a", "F32", (2, 3)), ("b", "F16", (4,)))


def layout_header(
    specs: Sequence[Spec], metadata: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], int]:
    """Header dict with back-to-back data_offsets in ``specs`` order, and the data length."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    cursor = 0
    for name, dtype, shape in specs:
        size = ITEM_BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [cursor, cursor + size],
        }
        cursor += size
    return header, cursor


def encode_header(header: Mapping[str, Any]) -> bytes:
    """JSON bytes padded with spaces to a multiple of 8, as the library writes them."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def write_raw(
    path: Path, header: bytes, data: bytes = b"", declared_len: int | None = None
) -> Path:
    """u64 length (``declared_len`` or the true one) + header bytes + data bytes."""
    length = len(header) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", length) + header + data)
    return path


def write_file(
    path: Path,
    specs: Sequence[Spec] = DEFAULT_SPECS,
    metadata: Mapping[str, str] | None = None,
    *,
    edit: Callable[[dict[str, Any]], None] | None = None,
    data_delta: int = 0,
) -> Path:
    """A safetensors file for ``specs``; ``edit`` mutates the header dict before encoding (to
    corrupt it), ``data_delta`` adds (> 0) or cuts (< 0) data bytes."""
    header, data_len = layout_header(specs, metadata)
    if edit is not None:
        edit(header)
    data = bytes(i % 251 for i in range(max(0, data_len + data_delta)))
    return write_raw(path, encode_header(header), data)


def write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """A real file written by safetensors itself (for round trips)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=dict(metadata or {"format": "pt"}))
    return path


def write_index(
    path: Path, weight_map: Mapping[str, str], extra: Mapping[str, Any] | None = None
) -> Path:
    """An HF ``model.safetensors.index.json``."""
    index: dict[str, Any] = {"metadata": {"total_size": 0}, "weight_map": dict(weight_map)}
    index.update(extra or {})
    path.write_text(json.dumps(index, indent=2))
    return path


# Named corruptions, reusable by other test modules.
def write_empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_short(path: Path, n_bytes: int = 5) -> Path:
    path.write_bytes(b"\x01" * n_bytes)
    return path


def write_lfs_pointer(path: Path) -> Path:
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a2146a1e7bbd1a5b3c2b6b0c1e4f5a8d9c0b1a2e3f4d5c6b7a8d9e0f1a2b3\n"
        "size 548105171\n"
    )
    return path


def write_header_past_eof(path: Path) -> Path:
    return write_raw(path, b'{"a":', declared_len=4096)


def write_huge_header_claim(path: Path) -> Path:
    return write_raw(path, b"{}      ", declared_len=200_000_000)


def write_truncated(path: Path, missing: int = 4) -> Path:
    return write_file(path, data_delta=-missing)
