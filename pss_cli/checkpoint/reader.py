"""Stream tensors out of a validated layout, one at a time, without loading the checkpoint.

Two ways in:

- ``read(entry)``: the whole tensor, backed by ``safe_open``'s memory map (no copy). Convenient,
  but every page a caller touches through a mapping counts in the process's RSS for as long as
  the file stays mapped; ``release_mappings()`` unmaps the files (tensors already returned keep
  their own reference and stay valid).
- ``read_into(entry, out, byte_offset)``: positional reads of a byte range straight into a
  caller's buffer (a reused staging buffer, pinned host memory, or the compute buffer itself).
  Nothing is mapped, so memory is what the caller allocated: the scan streams multi-GB
  checkpoints through it at a bounded RSS (benchmarks/bench_memory.py).

Both paths validate first: ``safe_open`` does its own checks, and a file opened for
``read_into`` has its header re-read and compared with the layout's, so a file replaced or
truncated since ``open_checkpoint`` fails with an error naming it, not with garbage values.
"""

from __future__ import annotations

import ctypes
import struct
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from pss_cli.checkpoint.formats.registry import format_of
from pss_cli.checkpoint.formats.safetensors.header import os_error, read_header
from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.errors import CheckpointError, CorruptCheckpointError

_HINT = "the file may have changed or been damaged since it was scanned; re-download it"
# safetensors stores little-endian values; a big-endian host would need a byte swap, which the
# library's own loader does (read_into then declines and callers fall back to `read`).
_NATIVE_LITTLE_ENDIAN = sys.byteorder == "little"
# One read() call moves at most ~2 GiB on Linux; larger tensors are read in several calls anyway.
_MAX_READ_BYTES = 1 << 30


class TensorReader:
    """Context manager over a CheckpointLayout.

    Each file is opened once, on first use, and kept open until ``close()``. Returned tensors
    stay valid after ``close()``: ``read`` tensors hold their own reference to the mapping, and
    ``read_into`` fills memory the caller owns. ``read_into`` may be called from one loader
    thread while another thread computes (each file's position is guarded by a lock).
    """

    def __init__(self, layout: CheckpointLayout) -> None:
        self._layout = layout
        self._files = frozenset(layout.files)
        self._handles: dict[Path, Any] = {}  # safe_open objects (untyped extension type)
        self._raw: dict[Path, _RawFile] = {}
        self._lock = threading.Lock()
        # DCP folders and torch pickles are read by their format's backend (formats/).
        self._backend = format_of(layout.kind).backend(layout)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor ``entry`` describes, shape ``entry.shape``, in its stored dtype."""
        self._check_member(entry)
        if self._backend is not None:
            return self._backend.read(entry)
        handle = self._handle(entry.file)
        try:
            tensor: torch.Tensor = handle.get_tensor(entry.name)
        except Exception as exc:  # safetensors raises SafetensorError, OSError, RuntimeError...
            raise CorruptCheckpointError(
                f"cannot read tensor '{entry.name}' from '{entry.file}': {_one_line(exc)}",
                hint=_HINT,
            ) from exc
        if tuple(tensor.shape) != entry.shape:
            raise CorruptCheckpointError(
                f"tensor '{entry.name}' in '{entry.file}' has shape {tuple(tensor.shape)}, "
                f"but its header said {entry.shape}",
                hint=_HINT,
            )
        return tensor

    def can_read_into(self, entry: TensorEntry) -> bool:
        """True when ``read_into`` serves ``entry`` (a safetensors file on a little-endian host)."""
        return (
            _NATIVE_LITTLE_ENDIAN
            and self._backend is None
            and entry.file in self._files
            and entry.file.suffix == ".safetensors"
        )

    def read_into(self, entry: TensorEntry, out: torch.Tensor, byte_offset: int = 0) -> None:
        """Fill ``out`` with ``out.nbytes`` raw bytes of ``entry``'s data from ``byte_offset``.

        out: a contiguous CPU tensor of any dtype (its bytes are overwritten as stored, so the
        caller views them with the entry's dtype). Use ``can_read_into`` first.
        """
        self._check_member(entry)
        if not self.can_read_into(entry):
            raise ValueError(f"read_into cannot serve '{entry.file}'; use read()")
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("read_into needs a contiguous CPU tensor")
        size = out.numel() * out.element_size()
        if byte_offset < 0 or byte_offset + size > entry.nbytes:
            raise ValueError(
                f"bytes {byte_offset}..{byte_offset + size} lie outside tensor "
                f"'{entry.name}' ({entry.nbytes} bytes)"
            )
        if size == 0:
            return
        raw = self._raw_file(entry.file)
        raw.read_into(entry, out, entry.data_offsets[0] + byte_offset, size)

    def release_mappings(self) -> None:
        """Unmap the files ``read`` mapped, so that the pages touched through them leave RSS."""
        if self._backend is not None:
            self._backend.release()
        with self._lock:
            handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def close(self) -> None:
        self.release_mappings()
        with self._lock:
            raws, self._raw = self._raw, {}
        for raw in raws.values():
            raw.close()

    def _check_member(self, entry: TensorEntry) -> None:
        if entry.file not in self._files:
            raise ValueError(
                f"'{entry.file}' is not part of the checkpoint at '{self._layout.root}'"
            )

    def _handle(self, file: Path) -> Any:
        with self._lock:
            handle = self._handles.get(file)
            if handle is None:
                try:
                    handle = safe_open(str(file), framework="pt", device="cpu")
                except Exception as exc:
                    raise CorruptCheckpointError(
                        f"cannot open '{file}': {_one_line(exc)}", hint=_HINT
                    ) from exc
                self._handles[file] = handle
            return handle

    def _raw_file(self, file: Path) -> _RawFile:
        with self._lock:
            raw = self._raw.get(file)
            if raw is None:
                expected = [e for e in self._layout.entries if e.file == file]
                raw = _RawFile(file, expected)
                self._raw[file] = raw
            return raw


class _RawFile:
    """One safetensors file opened for positional reads, its header re-validated on open."""

    def __init__(self, path: Path, expected: list[TensorEntry]) -> None:
        self.path = path
        # The library's checks again (header size, JSON, dtypes, offsets tiling the data area,
        # file length), then the header must still describe what the layout was built from.
        try:
            entries, _metadata = read_header(path)
        except CheckpointError as exc:
            if type(exc) is CheckpointError:
                # Not the file's content: its access (permission denied, a link loop) or its
                # kind (now a folder). Its own hint says what to do, not "re-download it".
                raise
            raise CorruptCheckpointError(exc.message, hint=_HINT) from exc
        now = {(e.name, e.dtype, e.shape, e.data_offsets) for e in entries}
        then = {(e.name, e.dtype, e.shape, e.data_offsets) for e in expected}
        if not then <= now:
            changed = sorted(name for name, *_ in then - now)
            raise CorruptCheckpointError(
                f"'{path}' changed since it was opened: tensor '{changed[0]}' is no longer "
                "where its header said",
                hint=_HINT,
            )
        try:
            self._handle = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
            (header_len,) = struct.unpack("<Q", self._handle.read(8))
        except PermissionError as exc:
            raise os_error(path, exc) from exc  # as when the header was read: its own hint
        except (OSError, struct.error) as exc:
            raise CorruptCheckpointError(f"cannot read '{path}': {exc}", hint=_HINT) from exc
        self.data_start = 8 + header_len
        self._lock = threading.Lock()

    def read_into(self, entry: TensorEntry, out: torch.Tensor, offset: int, size: int) -> None:
        # A writable view of the tensor's own memory (``out`` stays referenced by the caller for
        # the whole call), so the kernel copies straight into it: no intermediate bytes object.
        view = memoryview((ctypes.c_ubyte * size).from_address(out.data_ptr())).cast("B")
        done = 0
        with self._lock:
            try:
                self._handle.seek(self.data_start + offset)
                while done < size:
                    step = min(size - done, _MAX_READ_BYTES)
                    got = self._handle.readinto(view[done : done + step])
                    if not got:
                        raise CorruptCheckpointError(
                            f"cannot read tensor '{entry.name}' from '{self.path}': the file "
                            f"ends {size - done} bytes early (truncated since it was opened?)",
                            hint=_HINT,
                        )
                    done += got
            except OSError as exc:
                raise CorruptCheckpointError(
                    f"cannot read tensor '{entry.name}' from '{self.path}': {exc}", hint=_HINT
                ) from exc

    def close(self) -> None:
        self._handle.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
