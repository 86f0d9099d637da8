"""Stream tensors out of a validated layout, one at a time, without loading the checkpoint."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.errors import CorruptCheckpointError

_HINT = "the file may have changed or been damaged since it was scanned; re-download it"


class TensorReader:
    """Context manager over a CheckpointLayout.

    Each file is opened once, on first use, and kept open: ``safe_open`` maps the file, and
    ``get_tensor`` then returns a tensor backed by that mapping (no copy, NOTES "Numerics"), so
    repeated reads are cheap and memory stays bounded by what the caller keeps alive. Returned
    tensors stay valid after ``close()``: they hold their own reference to the mapping.
    """

    def __init__(self, layout: CheckpointLayout) -> None:
        self._layout = layout
        self._files = frozenset(layout.files)
        self._handles: dict[Path, Any] = {}  # safe_open objects (untyped extension type)

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
        if entry.file not in self._files:
            raise ValueError(
                f"'{entry.file}' is not part of the checkpoint at '{self._layout.root}'"
            )
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

    def close(self) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def _handle(self, file: Path) -> Any:
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
