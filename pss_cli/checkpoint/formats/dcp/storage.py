"""Data of a DCP folder: tensors through torch's loader without a process group (``load_into``,
``DcpBackend``), storage items as raw bytes (``read_item_bytes``) and written as
FileSystemWriter writes them (``serialize_chunk``). dcp.py reads the metadata."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pss_cli.checkpoint.formats.dcp.dcp import SafeFileSystemReader, one_line
from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.checkpoint.torch_dtypes import torch_dtype_of
from pss_cli.errors import CheckpointError, CorruptCheckpointError
from pss_cli.quiet import quiet_lock


class DcpBackend:
    """Reads model tensors of one DCP folder through torch's loader, one key per call."""

    def __init__(self, layout: CheckpointLayout) -> None:
        self._layout = layout
        self._folder = layout.root

    def read(self, entry: TensorEntry) -> torch.Tensor:
        key = str(entry.key[0])
        dtype = torch_dtype(entry)
        out = {key: torch.empty(entry.shape, dtype=dtype)}
        load_into(self._folder, out)
        return out[key]

    def close(self) -> None:
        pass

    def release(self) -> None:
        pass


def torch_dtype(entry: TensorEntry) -> torch.dtype:
    return torch_dtype_of(entry.dtype)


def load_into(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``tensors`` (DCP key -> preallocated CPU tensor of the stored shape and dtype) from
    the folder, without a process group; errors name the folder and key."""
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    try:
        # no_dist=True is the documented single-process mode; torch still warns that it
        # assumes no process group, which is what we want. Under pss's one lock for
        # process-wide warning filters (pss_cli/quiet.py).
        with quiet_lock(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(no_dist|process group).*")
            warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
            dcp_load(tensors, storage_reader=SafeFileSystemReader(str(folder)), no_dist=True)
    except CheckpointError:
        raise
    except Exception as exc:
        keys = ", ".join(list(tensors)[:3])
        raise CorruptCheckpointError(
            f"cannot read '{keys}' from DCP folder '{folder}': {_root_cause(exc)}",
            hint="a .distcp file is truncated or damaged: copy the checkpoint again",
        ) from None


def _root_cause(exc: BaseException) -> str:
    # dcp.load wraps rank failures in CheckpointException({rank: (exc, traceback)}).
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner:
            inner = inner[0]
        if isinstance(inner, BaseException):
            return f"{type(inner).__name__}: {one_line(inner)}"
    return f"{type(exc).__name__}: {one_line(exc)}"


def read_item_bytes(folder: Path, info: Any) -> Iterator[bytes]:
    """The raw bytes of one storage item, in chunks (for digests and verbatim copies)."""
    path = folder / info.relative_path
    remaining = int(info.length)
    with open(path, "rb") as f:
        f.seek(int(info.offset))
        while remaining > 0:
            chunk = f.read(min(remaining, 16 * 2**20))
            if not chunk:
                raise CorruptCheckpointError(
                    f"DCP storage file '{path}' ends {remaining} bytes before an item it holds",
                    hint="the file is truncated: copy the checkpoint again",
                )
            remaining -= len(chunk)
            yield chunk


def serialize_chunk(tensor: torch.Tensor) -> bytes:
    """One storage item as FileSystemWriter writes it (TORCH_SAVE format): torch.save of a
    compact copy (a view would save its whole base storage)."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().to("cpu").contiguous().clone(), buffer)
    return buffer.getvalue()
