"""Write a repaired copy of a checkpoint without ever touching the input.

Each output safetensors file is the input file with a new ``__metadata__`` and the byte ranges of
the replaced tensors overwritten; everything else is streamed across in fixed-size chunks, so
memory stays bounded by one chunk plus one replacement tensor, and untouched tensors are
byte-identical by construction (STYLE.md rule 8). Tensor entries, dtypes, shapes and data_offsets
are kept exactly, which is valid because a replacement has the same shape and dtype, hence the
same byte size (docs/DESIGN.md "safetensors": offsets must tile the data area).

Atomicity: everything is staged beside ``out`` (same parent, so the final rename never crosses a
filesystem), fsynced, then moved into place with one rename; on any failure, Ctrl-C included, the
staging area is removed, so ``out`` is either complete or absent.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pss_cli.checkpoint import out_checks
from pss_cli.checkpoint.formats.safetensors.header import (
    MAX_HEADER_BYTES,
    METADATA_KEY,
    read_header,
)
from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.checkpoint.staging import (
    commit_file,
    commit_folder,
    copy_others,
    disk_error,
    staged_file,
    staged_folder,
)
from pss_cli.checkpoint.torch_dtypes import safetensors_dtype
from pss_cli.errors import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"
# 16 MiB: large enough that per-call overhead vanishes against disk bandwidth, small enough that
# a repair of a 100 GB checkpoint stays within a few tens of MB of memory.
CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class WrittenCheckpoint:
    """What ``write_repaired_checkpoint`` produced (all paths are final, under ``out``)."""

    out: Path  # final path (file or folder)
    files: tuple[Path, ...]  # safetensors files written
    copied: tuple[Path, ...]  # other top-level files and folders copied unchanged
    replaced: tuple[str, ...]  # tensor names whose bytes were replaced, sorted


def write_repaired_checkpoint(
    layout: CheckpointLayout,
    out: Path,
    replacements: Mapping[str, torch.Tensor],
    provenance: Mapping[str, str],
    *,
    force: bool = False,
    extra_files: Callable[[Path, Path], None] | None = None,
    skip_copy: Callable[[Path], bool] | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> WrittenCheckpoint:
    """Write ``layout`` to ``out`` with ``replacements`` (same shape and dtype as stored, else
    ValueError) and ``provenance`` merged into every file's ``__metadata__``.

    ``out`` is a ``.safetensors`` file only for a single-file input; otherwise a folder with the
    same file names, a regenerated index (sharded) and every other input file copied unchanged
    (except those ``skip_copy`` refuses). ``extra_files(input_folder, staging_dir)`` runs after
    the copy, before the final rename, so a caller can add or replace files (e.g. optimizer.pt).
    ``before_commit(staged_path)`` runs last, on the complete staged output (same file names and
    suffix as ``out``): raising there publishes nothing, so a caller's verification decides
    whether the output ever appears under its final name. Raises UsageError for a bad ``out``
    and CheckpointError when the disk fails.
    """
    by_name = {entry.name: entry for entry in layout.entries}
    _check_replacements(by_name, replacements)
    _check_provenance(provenance)
    out_checks.check_output_path(layout, out, force=force)
    to_file = out.name.endswith(SAFETENSORS_SUFFIX)
    if to_file and extra_files is not None:
        raise ValueError("extra_files needs a folder output, not a single .safetensors file")
    input_folder = layout.folder

    replaced = tuple(sorted(replacements))
    try:
        if to_file:
            _write_single_file(
                layout.files[0], out, layout, replacements, provenance, force, before_commit
            )
            return WrittenCheckpoint(out=out, files=(out,), copied=(), replaced=replaced)
        names, copied = _write_folder(
            layout,
            input_folder,
            out,
            replacements,
            provenance,
            force,
            extra_files,
            skip_copy,
            before_commit,
        )
    except OSError as exc:
        raise disk_error(out, layout, exc) from exc
    return WrittenCheckpoint(
        out=out,
        files=tuple(out / name for name in names),
        copied=tuple(out / name for name in copied),
        replaced=replaced,
    )


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_replacements(
    by_name: Mapping[str, TensorEntry], replacements: Mapping[str, torch.Tensor]
) -> None:
    for name, tensor in replacements.items():
        entry = by_name.get(name)
        if entry is None:
            raise ValueError(f"replacement for tensor '{name}', which the checkpoint does not hold")
        dtype = safetensors_dtype(tensor.dtype)
        if dtype != entry.dtype:
            raise ValueError(
                f"replacement for tensor '{name}' has dtype {tensor.dtype} but the checkpoint "
                f"stores {entry.dtype}: cast it back before writing"
            )
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(
                f"replacement for tensor '{name}' has shape {tuple(tensor.shape)} but the "
                f"checkpoint stores {entry.shape}"
            )


def _check_provenance(provenance: Mapping[str, str]) -> None:
    for key, value in provenance.items():
        if not isinstance(key, str) or not isinstance(value, str):
            # safetensors metadata is str -> str only; the library would refuse the file.
            raise ValueError(f"provenance must map strings to strings (got {key!r}: {value!r})")


# ---------------------------------------------------------------------------------------------
# Layout-level writing


def _write_single_file(
    src: Path,
    out: Path,
    layout: CheckpointLayout,
    replacements: Mapping[str, torch.Tensor],
    provenance: Mapping[str, str],
    force: bool,
    before_commit: Callable[[Path], None] | None = None,
) -> None:
    with staged_file(out) as tmp:
        _write_safetensors(src, tmp, layout, replacements, provenance)
        _validate(src, tmp, layout, replacements, provenance)
        if before_commit is not None:
            before_commit(tmp)
        # mkstemp makes it 0600: the input's permissions, once written (a 0444 input copied
        # first made the staged file unwritable)
        shutil.copymode(src, tmp)
        commit_file(tmp, out, force)


def _write_folder(
    layout: CheckpointLayout,
    input_folder: Path,
    out: Path,
    replacements: Mapping[str, torch.Tensor],
    provenance: Mapping[str, str],
    force: bool,
    extra_files: Callable[[Path, Path], None] | None,
    skip_copy: Callable[[Path], bool] | None,
    before_commit: Callable[[Path], None] | None = None,
) -> tuple[list[str], list[str]]:
    with staged_folder(out, input_folder) as staging:
        names = []
        for src in layout.files:
            _write_safetensors(src, staging / src.name, layout, replacements, provenance)
            shutil.copymode(src, staging / src.name)  # a 0600 shard stays 0600
            names.append(src.name)
        if layout.index_file is not None:
            _write_index(layout, staging / layout.index_file.name, provenance)
            shutil.copymode(layout.index_file, staging / layout.index_file.name)
        copied: list[str] = []
        if not layout.one_file:
            written = {src.name for src in layout.files}
            if layout.index_file is not None:
                written.add(layout.index_file.name)
            copied = copy_others(input_folder, staging, written, skip_copy)
        if extra_files is not None:
            extra_files(input_folder, staging)
        for src in layout.files:
            _validate(src, staging / src.name, layout, replacements, provenance)
        if before_commit is not None:
            before_commit(staging)
        commit_folder(staging, out, force)
    return names, copied


def _write_index(layout: CheckpointLayout, dst: Path, provenance: Mapping[str, str]) -> None:
    """Same weight_map and other keys; total_size recomputed from the headers (HF defines it as
    the sum of the tensors' byte sizes, so it does not change, but a stale input value is fixed)."""
    assert layout.index_file is not None
    raw: Any = json.loads(layout.index_file.read_text(encoding="utf-8"))
    # open_checkpoint already checked it is an object with a weight_map; keep every other key.
    metadata = raw.get("metadata")
    metadata = dict(metadata) if isinstance(metadata, dict) else {}
    metadata["total_size"] = sum(entry.nbytes for entry in layout.entries)
    metadata["pss_provenance"] = dict(provenance)
    raw["metadata"] = metadata
    with open(dst, "x", encoding="utf-8") as f:
        f.write(json.dumps(raw, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# One safetensors file


def _write_safetensors(
    src: Path,
    dst: Path,
    layout: CheckpointLayout,
    replacements: Mapping[str, torch.Tensor],
    provenance: Mapping[str, str],
) -> None:
    # Re-read the header now (cheap): the file may have changed since it was opened, and copying
    # a data area that no longer matches the layout's offsets would corrupt the output silently.
    entries, metadata = read_header(src)
    expected = sorted((e for e in layout.entries if e.file == src), key=_entry_key)
    if sorted(entries, key=_entry_key) != [_rebase(e, src) for e in expected]:
        raise CheckpointError(
            f"'{src}' changed since it was opened (its header no longer matches)",
            hint="make sure nothing else writes to the input, then run pss again",
        )
    merged = {**metadata, **provenance}
    header = _encode_header(entries, merged)
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(
            f"the new header of '{dst.name}' would exceed the 100 MB safetensors limit"
        )
    # (begin, end, tensor) in data order: segments to overwrite while streaming.
    patches = sorted(
        (
            (e.data_offsets[0], e.data_offsets[1], replacements[e.name])
            for e in entries
            if e.name in replacements
        ),
        key=lambda p: p[0],
    )
    data_len = entries[-1].data_offsets[1] if entries else 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        (in_header_len,) = struct.unpack("<Q", fin.read(8))
        fin.seek(8 + in_header_len)
        _write_chunk(fout, struct.pack("<Q", len(header)) + header)
        buffer = bytearray(CHUNK_BYTES)
        cursor = 0
        for begin, end, tensor in patches:
            _copy_bytes(fin, fout, begin - cursor, buffer)
            _write_tensor(fout, tensor, end - begin)
            fin.seek(end - begin, os.SEEK_CUR)
            cursor = end
        _copy_bytes(fin, fout, data_len - cursor, buffer)
        fout.flush()
        os.fsync(fout.fileno())


def _entry_key(entry: TensorEntry) -> tuple[tuple[int, int], str]:
    return entry.data_offsets, entry.name


def _rebase(entry: TensorEntry, file: Path) -> TensorEntry:
    return TensorEntry(entry.name, file, entry.dtype, entry.shape, entry.data_offsets)


def _encode_header(entries: list[TensorEntry], metadata: Mapping[str, str]) -> bytes:
    """Compact JSON padded with spaces to a multiple of 8, as safetensors writes it: the data
    area then starts 8-byte aligned, which the library relies on for zero-copy mmap views."""
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": list(entry.data_offsets),
        }
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def _copy_bytes(
    fin: io.BufferedReader, fout: io.BufferedWriter, n_bytes: int, buffer: bytearray
) -> None:
    view = memoryview(buffer)
    remaining = n_bytes
    while remaining > 0:
        n_read = fin.readinto(view[: min(remaining, len(buffer))])
        if not n_read:
            raise CheckpointError(
                f"'{fin.name}' ended {remaining} bytes early while copying",
                hint="the file was truncated while pss was reading it; re-download it",
            )
        _write_chunk(fout, view[:n_read])
        remaining -= n_read


def _write_tensor(fout: io.BufferedWriter, tensor: torch.Tensor, n_bytes: int) -> None:
    # safetensors stores little-endian; torch's in-memory layout is the host's.
    if sys.byteorder != "little":
        raise NotImplementedError("writing safetensors on a big-endian host is not supported")
    # reshape(-1) first: view(torch.uint8) refuses 0-d tensors. The uint8 view reinterprets the
    # bytes without conversion, which bf16 (no numpy dtype) and fp8 need.
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() != n_bytes:
        raise ValueError(f"replacement is {raw.numel()} bytes, the slot is {n_bytes}")
    view = raw.numpy().data  # 1-D uint8, so slicing is by byte
    for start in range(0, n_bytes, CHUNK_BYTES):
        _write_chunk(fout, view[start : start + CHUNK_BYTES])


def _write_chunk(fout: io.BufferedWriter, chunk: bytes | memoryview) -> None:
    """Every output byte goes through here (one place to fail in tests, e.g. ENOSPC)."""
    fout.write(chunk)


def _validate(
    src: Path,
    dst: Path,
    layout: CheckpointLayout,
    replacements: Mapping[str, torch.Tensor],
    provenance: Mapping[str, str],
) -> None:
    """Reopen the staged file with our parser and with the library before anything is
    published: a bug here must cost a failed run, never a broken checkpoint at ``out``."""
    src_entries, src_metadata = read_header(src)
    entries, metadata = read_header(dst)
    if [_rebase(e, dst) for e in src_entries] != entries or metadata != {
        **src_metadata,
        **provenance,
    }:
        raise CheckpointError(
            f"internal error: the rewritten '{dst.name}' does not match '{src}'",
            hint="please report this bug; the input was not modified",
        )
    names = [e.name for e in entries if e.name in replacements]
    try:
        with safe_open(str(dst), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for name in names:
                stored = f.get_tensor(name)
                expected = replacements[name].detach().to("cpu").contiguous()
                if not torch.equal(
                    stored.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)
                ):
                    raise ValueError(f"tensor '{name}' reads back different bytes")
    except Exception as exc:
        raise CheckpointError(
            f"internal error: safetensors cannot read the rewritten '{dst.name}': {exc}",
            hint="please report this bug; the input was not modified",
        ) from exc
    if keys != {e.name for e in entries}:
        raise CheckpointError(
            f"internal error: safetensors lists other tensors in the rewritten '{dst.name}'",
            hint="please report this bug; the input was not modified",
        )
