"""``--lr-scale`` for DCP folders: the learning rates are bytes items (a ``torch.save`` of one
value each, e.g. ``optimizer.param_groups.0.lr``, ``scheduler.base_lrs``); they are loaded with
``torch.load(weights_only=True)`` (plain numbers and lists: a value that needs more is refused),
scaled, and re-serialised the way FileSystemWriter writes bytes items."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

from pss_cli.checkpoint import lr_scale
from pss_cli.checkpoint.formats.dcp.dcp import keys_of
from pss_cli.checkpoint.formats.dcp.storage import read_item_bytes
from pss_cli.errors import CheckpointError

_SCHEDULER_HEADS = ("scheduler", "lr_scheduler", "schedulers", "lr_schedulers")


def lr_keys(metadata: Metadata) -> list[str]:
    """Bytes keys that hold learning rates: optimizer param-group LRs, scheduler LR lists."""
    found = []
    for item in keys_of(metadata):
        if not isinstance(item.storage, BytesStorageMetadata):
            continue
        parts = item.key.split(".")
        last = parts[-1]
        in_groups = "param_groups" in parts and last in lr_scale.GROUP_LR_KEYS
        in_scheduler = parts[0] in _SCHEDULER_HEADS and last in lr_scale.SCHEDULER_LR_KEYS
        if in_groups or in_scheduler:
            found.append(item.key)
    return sorted(found)


def _index_of(metadata: Metadata, key: str) -> tuple[MetadataIndex, Any]:
    for index, info in metadata.storage_data.items():
        if index.fqn == key:
            return index, info
    raise CheckpointError(
        f"DCP key '{key}' has no storage item", hint="the checkpoint is incomplete"
    )


def read_value(folder: Path, metadata: Metadata, key: str) -> Any:
    _, info = _index_of(metadata, key)
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(
            f"DCP item '{key}' in '{folder}' is stored compressed or transformed",
            hint="drop --lr-scale and set the resume LR in your training script",
        )
    data = b"".join(read_item_bytes(folder, info))
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read the learning rate '{key}' in '{folder}' safely ({type(exc).__name__})",
            hint="drop --lr-scale and set the resume LR in your training script",
        ) from None


def values(folder: Path, metadata: Metadata, keys: list[str]) -> list[float]:
    out: list[float] = []
    for key in keys:
        value = read_value(folder, metadata, key)
        out.extend(lr_scale.numbers(value))
    return out


def scaled_items(
    folder: Path, metadata: Metadata, keys: list[str], factor: float
) -> dict[MetadataIndex, bytes]:
    """index -> the new serialised bytes of every LR item, scaled by ``factor``."""
    items: dict[MetadataIndex, bytes] = {}
    for key in keys:
        index, _ = _index_of(metadata, key)
        value, _changed = lr_scale.scaled(read_value(folder, metadata, key), factor)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        items[index] = buffer.getvalue()
    return items
