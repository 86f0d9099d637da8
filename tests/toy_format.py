"""A checkpoint format that exists only in the tests: one JSON file (``*.tjson``) mapping tensor
names to {"dtype", "shape", "data"}. It implements the whole ``CheckpointFormat`` protocol in
this one module and nothing else in pss knows it, which is what docs/ARCHITECTURE.md promises
("Adding a checkpoint format": one folder and one registry line); test_format_plugin.py adds
the registry line and runs scan, check and smooth on it."""

from __future__ import annotations

import hashlib
import json
import math
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from pss_cli.checkpoint import staging
from pss_cli.checkpoint.formats.protocol import TensorBackend, WriteRequest, WriteResult
from pss_cli.checkpoint.lr_files import LrScalePlan
from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.errors import CorruptCheckpointError

SUFFIX = ".tjson"
_DTYPES = {"F32": torch.float32, "F64": torch.float64}
_METADATA = "__metadata__"


class ToyKind(StrEnum):
    FILE = "toy-json-file"


def save_toy(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    names = {v: k for k, v in _DTYPES.items()}
    blob: dict[str, Any] = {_METADATA: dict(metadata)}
    for name, tensor in tensors.items():
        blob[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data": tensor.reshape(-1).tolist(),
        }
    path.write_text(json.dumps(blob))


def _load(path: Path) -> dict[str, Any]:
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"cannot read '{path}': {exc}", "re-save it") from None
    if not isinstance(blob, dict):
        raise CorruptCheckpointError(f"'{path}' is not a toy checkpoint", "re-save it")
    return blob


class _Backend:
    def __init__(self, layout: CheckpointLayout) -> None:
        self._blob = _load(layout.root)

    def read(self, entry: TensorEntry) -> torch.Tensor:
        item = self._blob[entry.name]
        return torch.tensor(item["data"], dtype=_DTYPES[item["dtype"]]).reshape(entry.shape)

    def release(self) -> None:
        return None

    def close(self) -> None:
        return None


class ToyFormat:
    name = "toy"
    title = "toy JSON"
    kinds: frozenset[str] = frozenset(ToyKind)
    file_suffixes: tuple[str, ...] = (SUFFIX,)

    def open_file(self, path: Path) -> CheckpointLayout | None:
        if not path.name.endswith(SUFFIX):
            return None
        blob = _load(path)
        entries = []
        for name, item in blob.items():
            if name == _METADATA:
                continue
            shape = tuple(int(d) for d in item["shape"])
            size = 4 if item["dtype"] == "F32" else 8
            nbytes = size * math.prod(shape)
            entries.append(TensorEntry(name, path, item["dtype"], shape, (0, nbytes)))
        return CheckpointLayout(
            root=path,
            kind=ToyKind.FILE,
            files=(path,),
            entries=tuple(entries),
            metadata={path: dict(blob.get(_METADATA, {}))},
            one_file=True,
        )

    def open_folder(self, folder: Path, children: list[Path]) -> CheckpointLayout | None:
        return None

    def backend(self, layout: CheckpointLayout) -> TensorBackend | None:
        return _Backend(layout)

    def digests(self, layout: CheckpointLayout, names: set[str] | None) -> dict[str, str]:
        blob = _load(layout.root)
        return {
            e.name: hashlib.sha256(json.dumps(blob[e.name]).encode()).hexdigest()
            for e in layout.entries
            if names is None or e.name in names
        }

    def check_output(self, layout: CheckpointLayout, out: Path) -> None:
        return None

    def optimizer_file(self, layout: CheckpointLayout) -> Path | None:
        return None

    def lr_plan(
        self, layout: CheckpointLayout, factor: float, keep_optimizer: bool
    ) -> LrScalePlan | None:
        return None

    def write(self, request: WriteRequest) -> WriteResult:
        layout, out = request.layout, request.out
        reader = _Backend(layout)
        tensors = {
            e.name: request.replacements[e.name]
            if e.name in request.replacements
            else reader.read(e)
            for e in layout.entries
        }
        with staging.staged_file(out) as tmp:
            save_toy(tmp, tensors, dict(request.provenance))
            request.before_commit(tmp)
            staging.commit_file(tmp, out, request.force)
        return WriteResult(out)
