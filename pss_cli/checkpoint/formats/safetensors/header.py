"""Parse and validate a safetensors header in pure Python (json + struct, no torch).

Layout of a safetensors file (https://github.com/huggingface/safetensors, "Format"):
8-byte little-endian u64 N, then N bytes of UTF-8 JSON (name -> {dtype, shape, data_offsets},
optional ``__metadata__`` str -> str), then the data area. We repeat the library's own checks
(header <= 100 MB, offsets tile the data area exactly, file length matches) so that a bad file
fails here with a message naming it, before any mmap, and so scans can list tensors without torch.
Only the header bytes are read: the data area may be many GB.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any, NoReturn

from pss_cli.checkpoint.model import TensorEntry
from pss_cli.checkpoint.sniff import renaming_hint
from pss_cli.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

# The safetensors library refuses larger headers (MAX_HEADER_SIZE); a larger claim means garbage.
MAX_HEADER_BYTES = 100_000_000
LFS_POINTER_PREFIX = b"version https://git-lfs"
METADATA_KEY = "__metadata__"

# Bits per element for every dtype the safetensors spec (0.8) defines. Bits, not bytes, because
# F4 and F6 pack several values per byte; a tensor's byte size is numel * bits / 8 exactly.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}

_NOT_SAFETENSORS_HINT = (
    "the file is truncated or not a safetensors file; re-download or re-save the checkpoint"
)
_REDOWNLOAD_HINT = "the file is damaged or was cut short; re-download or re-save the checkpoint"


def stat_path(path: Path) -> os.stat_result:
    """``os.stat`` (following symlinks) with OS errors turned into one-line checkpoint errors."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"path '{path}' does not exist",
            hint="check the spelling; pass a .safetensors file or index, a .pt/.bin/.pth/.ckpt "
            "file, or a folder holding a checkpoint (Trainer checkpoint-N/, sharded, DCP)",
        ) from None
    except OSError as exc:
        raise os_error(path, exc) from None


def require_regular_file(path: Path) -> int:
    """Return the size of ``path``; refuse FIFOs, devices and sockets *before* opening them,
    because ``open()`` on a FIFO blocks forever and a device can be endless."""
    st = stat_path(path)
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(
            f"'{path}' is a folder, expected a .safetensors file",
            hint="pass the folder itself as the checkpoint, or a file inside it",
        )
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(
            f"'{path}' is not a regular file (a pipe, device or socket)",
            hint="copy the checkpoint to a regular file first",
        )
    return st.st_size


def read_header(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """Validate ``path``'s header and return its tensors in data-offset order plus
    ``__metadata__`` (empty when absent). Raises CorruptCheckpointError on any inconsistency."""
    file_len = require_regular_file(path)
    raw = _read_header_bytes(path, file_len)
    header = _decode_json(path, raw)
    metadata = _parse_metadata(path, header.pop(METADATA_KEY, None))
    for text in (*header, *metadata, *metadata.values()):
        _require_unicode(path, text)
    entries = [_parse_entry(path, name, spec) for name, spec in header.items()]
    entries.sort(key=lambda e: (e.data_offsets, e.name))
    _check_tiling(path, entries, data_len=file_len - 8 - len(raw))
    return entries, metadata


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes that ``shape`` of ``dtype`` occupies, or None when sub-byte values do not fill
    whole bytes (the library rejects such slices)."""
    numel = 1
    for dim in shape:
        numel *= dim
    bits = numel * DTYPE_BITS[dtype]
    return bits // 8 if bits % 8 == 0 else None


def _read_header_bytes(path: Path, file_len: int) -> bytes:
    if file_len == 0:
        _corrupt(path, "file is empty (0 bytes), not a safetensors file", _REDOWNLOAD_HINT)
    try:
        with open(path, "rb") as f:
            prefix = f.read(len(LFS_POINTER_PREFIX))
            if prefix.startswith(LFS_POINTER_PREFIX):
                _corrupt(
                    path,
                    "file is a Git LFS pointer, not the tensor data",
                    "run `git lfs pull` in the repository (or download the file itself)",
                )
            if file_len < 8:
                _corrupt(
                    path,
                    f"file is too short to be a safetensors file ({file_len} bytes; "
                    "the header length field alone needs 8)",
                    _NOT_SAFETENSORS_HINT,
                )
            (header_len,) = struct.unpack("<Q", prefix[:8])
            if header_len > MAX_HEADER_BYTES or header_len > file_len - 8:
                renamed = renaming_hint(path, "safetensors")
                if renamed is not None:
                    _corrupt(path, "not a safetensors file", renamed)
            if header_len > MAX_HEADER_BYTES:
                _corrupt(
                    path,
                    f"header length field claims {header_len} bytes, over the 100 MB "
                    "safetensors limit",
                    _NOT_SAFETENSORS_HINT,
                )
            if header_len > file_len - 8:
                _corrupt(
                    path,
                    f"header length field claims {header_len} bytes but only "
                    f"{file_len - 8} bytes follow it",
                    _NOT_SAFETENSORS_HINT,
                )
            f.seek(8)
            return f.read(header_len)
    except OSError as exc:
        raise os_error(path, exc) from None


def _decode_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _corrupt(
            path, f"header is not UTF-8 (bad byte at offset {8 + exc.start})", _NOT_SAFETENSORS_HINT
        )
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKeyError as exc:
        _corrupt(path, f"header names tensor '{exc.key}' twice", _REDOWNLOAD_HINT)
    except json.JSONDecodeError as exc:
        _corrupt(
            path,
            f"header is not valid JSON ({exc.msg} at byte {8 + exc.pos})",
            _NOT_SAFETENSORS_HINT,
        )
    except ValueError:
        # Python refuses integers of more than 4300 digits (int_max_str_digits); no shape or
        # offset can need one, so the header is garbage.
        _corrupt(path, "header holds an integer with thousands of digits", _NOT_SAFETENSORS_HINT)
    except RecursionError:
        # Arrays/objects nested thousands deep: valid JSON, but no safetensors header nests
        # deeper than 3 levels, and parsing further would exhaust the stack.
        _corrupt(path, "header JSON is nested too deeply", _NOT_SAFETENSORS_HINT)
    if not isinstance(header, dict):
        _corrupt(
            path,
            f"header is a JSON {_json_type(header)}, expected an object",
            _NOT_SAFETENSORS_HINT,
        )
    return header


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last duplicate; two entries for one tensor name mean the
    # header cannot be trusted, so refuse instead of guessing which one is real.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def _parse_metadata(path: Path, raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        _corrupt(
            path,
            f"__metadata__ is a JSON {_json_type(raw)}, expected an object of strings",
            _REDOWNLOAD_HINT,
        )
    for key, value in raw.items():
        if not isinstance(value, str):
            _corrupt(
                path,
                f"__metadata__ must map strings to strings "
                f"(key '{key}' has a {_json_type(value)} value)",
                "re-save the checkpoint with string metadata values",
            )
    return dict(raw)


def _parse_entry(path: Path, name: str, spec: object) -> TensorEntry:
    where = f"tensor '{name}'"
    if not isinstance(spec, dict):
        _corrupt(
            path, f"{where} is a JSON {_json_type(spec)}, expected an object", _REDOWNLOAD_HINT
        )
    for field in ("dtype", "shape", "data_offsets"):
        if field not in spec:
            _corrupt(path, f"{where} has no '{field}'", _REDOWNLOAD_HINT)
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str):
        _corrupt(path, f"{where} has a non-string dtype {dtype!r}", _REDOWNLOAD_HINT)
    if dtype not in DTYPE_BITS:
        _corrupt(
            path,
            f"{where} has unknown dtype '{dtype}'",
            "the file may come from a newer safetensors version; known: " + ", ".join(DTYPE_BITS),
        )
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        _corrupt(
            path,
            f"{where} has an invalid shape {shape!r} (expected a list of integers)",
            _REDOWNLOAD_HINT,
        )
    if any(d < 0 for d in shape):
        _corrupt(path, f"{where} has a negative dimension in shape {shape}", _REDOWNLOAD_HINT)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        _corrupt(
            path,
            f"{where} has invalid data_offsets {offsets!r} (expected [begin, end] integers)",
            _REDOWNLOAD_HINT,
        )
    begin, end = offsets
    if begin < 0 or end < begin:
        _corrupt(
            path,
            f"{where} has data_offsets [{begin}, {end}] with begin < 0 or end < begin",
            _REDOWNLOAD_HINT,
        )
    needed = tensor_nbytes(dtype, tuple(shape))
    if needed is None:
        _corrupt(
            path, f"{where}: {dtype} shape {shape} does not fill whole bytes", _REDOWNLOAD_HINT
        )
    if end - begin != needed:
        _corrupt(
            path,
            f"{where} spans {end - begin} bytes but {dtype} with shape {shape} needs {needed}",
            _REDOWNLOAD_HINT,
        )
    return TensorEntry(
        name=name, file=path, dtype=dtype, shape=tuple(shape), data_offsets=(begin, end)
    )


def _check_tiling(path: Path, entries: list[TensorEntry], data_len: int) -> None:
    """The byte ranges (sorted) must cover [0, data_len) with no overlap and no gap: the library
    enforces the same, and a gap or overlap means the header and the data disagree."""
    cursor, previous = 0, None
    for entry in entries:
        begin, end = entry.data_offsets
        if begin < cursor:
            _corrupt(
                path,
                f"tensors '{previous}' and '{entry.name}' overlap in the data area "
                f"(bytes {begin}-{cursor})",
                _REDOWNLOAD_HINT,
            )
        if begin > cursor:
            _corrupt(
                path,
                f"{begin - cursor} unused bytes (a gap) in the data area before tensor "
                f"'{entry.name}' (bytes {cursor}-{begin})",
                _REDOWNLOAD_HINT,
            )
        cursor, previous = end, entry.name
    if cursor > data_len:
        _corrupt(
            path,
            f"file is truncated: tensor '{previous}' ends at data byte {cursor} but the data area "
            f"has only {data_len} bytes",
            _REDOWNLOAD_HINT,
        )
    if cursor < data_len:
        _corrupt(
            path,
            f"{data_len - cursor} trailing bytes after the last tensor '{previous}' that no "
            "header entry accounts for",
            _REDOWNLOAD_HINT,
        )


def _require_unicode(path: Path, text: str) -> None:
    """JSON escapes can spell lone UTF-16 surrogates (``"\\ud800"``), which are not Unicode: the
    safetensors library refuses such headers, and they cannot be printed or written back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
        _corrupt(
            path,
            f"header holds a name or metadata string that is not valid Unicode ('{shown}': a "
            "lone surrogate escape)",
            _NOT_SAFETENSORS_HINT,
        )


def os_error(path: Path, exc: OSError) -> CheckpointError:
    """An OS error on ``path`` as a one-line checkpoint error with a hint that fits its cause."""
    if isinstance(exc, PermissionError):
        return CheckpointError(
            f"cannot read '{path}': permission denied",
            hint="check the file's permissions (ls -l) or run as a user who can read it",
        )
    if exc.errno == errno.ELOOP:
        return CheckpointError(
            f"'{path}' is a symbolic link loop (too many levels of links)",
            hint="fix or remove the link so that it points to a real file",
        )
    return CheckpointError(
        f"cannot read '{path}': {exc.strerror or exc}",
        hint="check that the path is readable and the disk is mounted",
    )


def _corrupt(path: Path, what: str, hint: str) -> NoReturn:
    raise CorruptCheckpointError(f"'{path}': {what}", hint=hint)


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python; a shape of [true] is not a shape.
    return type(value) is int


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
