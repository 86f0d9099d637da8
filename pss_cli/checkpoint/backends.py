"""Per-format tensor sources behind TensorReader.read, for layouts that are not safetensors."""

from __future__ import annotations

from typing import Protocol

import torch

from pss_cli.checkpoint.model import TORCH_KINDS, CheckpointLayout, LayoutKind, TensorEntry


class TensorBackend(Protocol):
    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor ``entry`` describes, in its stored dtype and shape."""
        ...

    def release(self) -> None:
        """Drop cached files or mappings (tensors already returned stay valid)."""
        ...

    def close(self) -> None: ...


def open_backend(layout: CheckpointLayout) -> TensorBackend | None:
    """The backend for ``layout``'s format; None for safetensors (TensorReader's own path)."""
    if layout.kind is LayoutKind.DCP:
        from pss_cli.checkpoint.dcp import DcpBackend

        return DcpBackend(layout)
    if layout.kind in TORCH_KINDS:
        from pss_cli.checkpoint.torch_file import TorchBackend

        return TorchBackend(layout)
    return None
