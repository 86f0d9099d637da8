"""Write a repaired copy of a DCP folder that the same training code loads.

Untouched storage items are byte-copied verbatim (a ``.distcp`` file without a changed item is
copied whole); only the chunks of modified tensors (and, with ``--optimizer-state reset``, of
their Adam moments) are re-serialised the way FileSystemWriter does (``torch.save`` of each
chunk), and ``.metadata`` is rewritten with the new offsets from torch's own Metadata object.
Memory: one modified tensor at a time (its chunks go to a scratch file in the staging folder,
which is removed before the output is published); nothing else is loaded.

The output is staged beside OUT and renamed into place (staging.py), with a
``pss-provenance.json`` sidecar (DCP metadata has no free-form field; loaders ignore the file).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from pss_cli.checkpoint import staging as st
from pss_cli.checkpoint.formats.dcp.dcp import (
    METADATA_NAME,
    DcpKey,
    chunk_indexes,
    keys_of,
    load_metadata,
    model_name,
)
from pss_cli.checkpoint.formats.dcp.storage import load_into, read_item_bytes, serialize_chunk
from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.names import provenance_sidecar
from pss_cli.checkpoint.optimizer import OptimizerOutcome
from pss_cli.config import OptimizerPolicy
from pss_cli.errors import CheckpointError

# First path element (or first dotted segment of a flattened key) of optimizer state.
OPTIMIZER_KEYS = frozenset(
    {"optimizer", "optim", "optimizers", "optimizer_state", "optimizer_state_dict"}
)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
_SCRATCH = ".pss-scratch"
_COPY_CHUNK = 16 * 2**20


def write_dcp_checkpoint(
    layout: CheckpointLayout,
    out: Path,
    replacements: Mapping[str, torch.Tensor],
    provenance: Mapping[str, str],
    policy: OptimizerPolicy,
    *,
    force: bool = False,
    before_commit: Callable[[Path], None] | None = None,
    lr_items: Mapping[MetadataIndex, bytes] | None = None,
) -> tuple[Path, OptimizerOutcome]:
    """Write the DCP folder ``layout.root`` to the folder ``out`` with ``replacements`` (model
    FQN -> tensor of the stored shape and dtype) and the optimizer ``policy`` applied to the
    modified parameters' FQN-keyed moments. Returns ``out`` and what was done to the optimizer
    state. ``before_commit(staged_folder)`` runs on the complete staged output; raising there
    publishes nothing. ``lr_items`` are bytes items to write instead of the stored ones (the
    learning rates scaled by ``--lr-scale``, dcp_lr.py)."""
    folder = layout.root
    metadata = load_metadata(folder)
    keys = keys_of(metadata)
    by_name = {e.name: e for e in layout.entries}
    for name, tensor in replacements.items():
        entry = by_name.get(name)
        if entry is None or tuple(tensor.shape) != entry.shape:
            raise ValueError(f"replacement for '{name}' does not match the checkpoint")
    optimizer_keys = [k for k in keys if _is_optimizer(k)]
    moments, outcome = _plan_optimizer(folder, optimizer_keys, sorted(replacements), policy)
    dropped = {k.key for k in optimizer_keys} if policy is OptimizerPolicy.DROP else set()
    try:
        with st.staged_folder(out, folder) as staging:
            scratch = staging / _SCRATCH
            blobs = _write_blobs(scratch, metadata, layout, replacements, moments, lr_items)
            storage_data = _write_storage(folder, staging, metadata, blobs, scratch, dropped)
            scratch.unlink()
            new_metadata = dataclasses.replace(
                metadata,
                state_dict_metadata={
                    k: v for k, v in metadata.state_dict_metadata.items() if k not in dropped
                },
                planner_data=(
                    {k: v for k, v in metadata.planner_data.items() if k not in dropped}
                    if isinstance(metadata.planner_data, dict)
                    else metadata.planner_data
                ),
                storage_data=storage_data,
            )
            with open(staging / METADATA_NAME, "xb") as f:
                pickle.dump(new_metadata, f)  # as FileSystemWriter.finish writes it
            written = {p.name for p in layout.files} | {METADATA_NAME}
            written.add(provenance_sidecar(staging).name)
            st.copy_others(folder, staging, written, None)
            st.write_provenance(provenance_sidecar(staging), provenance)
            _validate(staging, layout, replacements, moments, dropped)
            if before_commit is not None:
                before_commit(staging)
            st.commit_folder(staging, out, force)
    except OSError as exc:
        raise st.disk_error(out, layout, exc) from exc
    return out, outcome


def _is_optimizer(item: DcpKey) -> bool:
    head = item.path[0]
    first = head.split(".", 1)[0] if isinstance(head, str) else ""
    return model_name(item) is None and (head in OPTIMIZER_KEYS or first in OPTIMIZER_KEYS)


def _moment_of(item: DcpKey) -> tuple[str, str] | None:
    """(parameter FQN, moment) when ``item`` is an FQN-keyed Adam moment, e.g.
    ("optimizer", "state", "<fqn>", "exp_avg") or the flattened "optimizer.state.<fqn>.exp_avg"
    (torchtitan's flatten_optimizer_state_dict)."""
    text = ".".join(str(p) for p in item.path)
    for moment in _MOMENT_KEYS:
        suffix = f".{moment}"
        if not text.endswith(suffix):
            continue
        marker = ".state."
        at = text.find(marker)
        if at < 0:
            return None
        return text[at + len(marker) : -len(suffix)], moment
    return None


def _plan_optimizer(
    folder: Path, optimizer_keys: list[DcpKey], modified: list[str], policy: OptimizerPolicy
) -> tuple[list[DcpKey], OptimizerOutcome]:
    """The moment keys to zero, and the report of the policy (mirrors optimizer.py's)."""
    where = folder / METADATA_NAME
    if not optimizer_keys:
        return [], OptimizerOutcome(policy, None, (), "none", ())
    if policy is OptimizerPolicy.KEEP:
        kept: tuple[str, ...] = ()
        if modified:
            kept = (
                f"optimizer state in '{folder.name}' kept unchanged: its Adam moments were "
                f"accumulated for the old values of the {len(modified)} repaired tensor(s); "
                "use --optimizer-state reset to zero them; either way, resume at a lower "
                "learning rate",
            )
        return [], OptimizerOutcome(policy, where, (), "none", kept)
    if policy is OptimizerPolicy.DROP:
        message = (
            f"optimizer state dropped from '{folder.name}' ({len(optimizer_keys)} keys): "
            "load the checkpoint without the optimizer (e.g. dcp.load of the model only) and "
            "start a fresh optimizer; a loader that expects optimizer keys will fail"
        )
        return [], OptimizerOutcome(policy, where, (), "none", (message,))
    by_param: dict[str, list[DcpKey]] = {}
    for item in optimizer_keys:
        found = _moment_of(item)
        if found is not None and isinstance(item.storage, TensorStorageMetadata):
            by_param.setdefault(found[0], []).append(item)
    moments: list[DcpKey] = []
    reset: list[str] = []
    missing: list[str] = []
    for name in modified:
        items = by_param.get(name, [])
        if {(_moment_of(i) or ("", ""))[1] for i in items} >= set(_MOMENT_KEYS):
            moments.extend(items)
            reset.append(name)
        else:
            missing.append(name)
    messages: list[str] = []
    if reset:
        messages.append(
            f"DCP optimizer state: zeroed Adam moments (exp_avg, exp_avg_sq) of the "
            f"{len(reset)} repaired parameter(s) ({', '.join(reset)}), matched by FQN; step "
            "counters kept: resume at a lower learning rate (docs/EXPERIMENTS.md)"
        )
    if missing:
        messages.append(
            f"DCP optimizer state has no exp_avg/exp_avg_sq for {', '.join(missing)} "
            "(frozen, or not an Adam-style optimizer): nothing reset for them"
        )
    mapping = "exact" if reset and not missing else "partial" if reset else "none"
    outcome = OptimizerOutcome(
        policy, where, (), mapping, tuple(messages), reset_names=tuple(reset)
    )
    return moments, outcome


def _write_blobs(
    scratch: Path,
    metadata: Metadata,
    layout: CheckpointLayout,
    replacements: Mapping[str, torch.Tensor],
    moments: list[DcpKey],
    extra: Mapping[MetadataIndex, bytes] | None = None,
) -> dict[MetadataIndex, tuple[int, int]]:
    """Serialise every chunk to rewrite into ``scratch``: index -> (offset, length) there."""
    blobs: dict[MetadataIndex, tuple[int, int]] = {}
    by_name = {e.name: e for e in layout.entries}
    with open(scratch, "xb") as f:

        def put(index: MetadataIndex, chunk: torch.Tensor) -> None:
            data = serialize_chunk(chunk)
            blobs[index] = (f.tell(), len(data))
            f.write(data)

        for name in sorted(replacements):
            key = str(by_name[name].key[0])
            storage = metadata.state_dict_metadata[key]
            assert isinstance(storage, TensorStorageMetadata)
            full = replacements[name]  # formed once; its chunks are sliced from it
            for index, chunk in zip(chunk_indexes(key, storage), storage.chunks, strict=True):
                put(index, _narrow(full, chunk.offsets, chunk.sizes))
            del full
        for item in moments:
            storage = item.storage
            assert isinstance(storage, TensorStorageMetadata)
            for index, chunk in zip(chunk_indexes(item.key, storage), storage.chunks, strict=True):
                put(index, torch.zeros(tuple(chunk.sizes), dtype=storage.properties.dtype))
        for index, data in (extra or {}).items():
            blobs[index] = (f.tell(), len(data))
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return blobs


def _narrow(tensor: torch.Tensor, offsets: Any, sizes: Any) -> torch.Tensor:
    for dim, (offset, size) in enumerate(zip(offsets, sizes, strict=True)):
        tensor = tensor.narrow(dim, int(offset), int(size))
    return tensor


def _write_storage(
    folder: Path,
    staging: Path,
    metadata: Metadata,
    blobs: dict[MetadataIndex, tuple[int, int]],
    scratch: Path,
    dropped: set[str],
) -> dict[MetadataIndex, Any]:
    """Every .distcp file into staging; returns the new storage map."""
    per_file: dict[str, list[tuple[MetadataIndex, Any]]] = {}
    for index, info in metadata.storage_data.items():
        per_file.setdefault(info.relative_path, []).append((index, info))
    storage_data: dict[MetadataIndex, Any] = {}
    for relative, items in sorted(per_file.items()):
        changed = any(index in blobs or index.fqn in dropped for index, _ in items)
        src, dst = folder / relative, staging / relative
        if not changed:
            shutil.copy2(src, dst)  # offsets stay valid: the file is byte-identical
            storage_data.update(dict(items))
            continue
        with open(dst, "xb") as fout, open(scratch, "rb") as fscratch:
            done: dict[tuple[int, int], int] = {}  # an item shared by two indexes: copy once
            for index, info in sorted(items, key=lambda pair: int(pair[1].offset)):
                if index.fqn in dropped:
                    continue
                if index in blobs:
                    offset, length = blobs[index]
                    new = fout.tell()
                    _copy_range(fscratch, fout, offset, length, scratch)
                    storage_data[index] = dataclasses.replace(
                        info, offset=new, length=length, transform_descriptors=None
                    )
                    continue
                span = (int(info.offset), int(info.length))
                if span not in done:
                    done[span] = fout.tell()
                    for piece in read_item_bytes(folder, info):
                        fout.write(piece)
                storage_data[index] = dataclasses.replace(info, offset=done[span])
        shutil.copymode(src, dst)
    return storage_data


def _copy_range(fin: Any, fout: Any, offset: int, length: int, path: Path) -> None:
    fin.seek(offset)
    remaining = length
    while remaining:
        piece = fin.read(min(remaining, _COPY_CHUNK))
        if not piece:
            raise CheckpointError(f"internal error: scratch file '{path}' ended early")
        fout.write(piece)
        remaining -= len(piece)


def _validate(
    staging: Path,
    layout: CheckpointLayout,
    replacements: Mapping[str, torch.Tensor],
    moments: list[DcpKey],
    dropped: set[str],
) -> None:
    """Re-read what was re-serialised through torch's own DCP reader before publishing: a bug
    here must cost a failed run, never a checkpoint that does not load."""
    metadata = load_metadata(staging)
    if dropped & set(metadata.state_dict_metadata):
        raise CheckpointError("internal error: dropped optimizer keys are still in the output")
    by_name = {e.name: e for e in layout.entries}
    checks: list[tuple[str, Callable[[], torch.Tensor]]] = [
        (str(by_name[name].key[0]), lambda name=name: replacements[name])  # type: ignore[misc]
        for name in sorted(replacements)
    ]
    for item in moments:
        storage = item.storage
        assert isinstance(storage, TensorStorageMetadata)
        size, dtype = tuple(storage.size), storage.properties.dtype
        checks.append((item.key, lambda size=size, dtype=dtype: torch.zeros(size, dtype=dtype)))  # type: ignore[misc]
    for key, expected in checks:
        storage = metadata.state_dict_metadata[key]
        assert isinstance(storage, TensorStorageMetadata)
        got = {key: torch.empty(tuple(storage.size), dtype=storage.properties.dtype)}
        load_into(staging, got)
        want = expected()
        if not torch.equal(
            got[key].reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)
        ):
            raise CheckpointError(
                f"internal error: '{key}' reads back different values from the rewritten DCP "
                "folder",
                hint="please report this bug; the input was not modified",
            )
