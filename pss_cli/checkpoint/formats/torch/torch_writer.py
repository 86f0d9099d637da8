"""Write a repaired copy of a torch.save checkpoint (.pt/.bin/.pth, single, folder or sharded).

Each file holding a modified tensor is loaded with ``weights_only=True`` (mapped copy-on-write
for zip files, so only the modified tensors' pages are copied in memory), the modified tensors
are overwritten in place (same dtype and shape; a tensor shared under several names, e.g. tied
embeddings, is one storage and so stays shared), and the same object is ``torch.save``d back in
the file's own format (zip or legacy). Files without a modified tensor are copied byte for byte.
Provenance goes to a ``pss-provenance.json`` sidecar (a pickle has no metadata field, and a new
key would break ``load_state_dict(strict=True)``); a sharded index also records it.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pss_cli.checkpoint import staging as st
from pss_cli.checkpoint.formats.torch import torch_file
from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.checkpoint.names import is_torch_file_name, provenance_sidecar
from pss_cli.checkpoint.torch_dtypes import safetensors_dtype
from pss_cli.errors import CheckpointError


def write_torch_checkpoint(
    layout: CheckpointLayout,
    out: Path,
    replacements: Mapping[str, torch.Tensor],
    provenance: Mapping[str, str],
    *,
    force: bool = False,
    extra_files: Callable[[Path, Path], None] | None = None,
    skip_copy: Callable[[Path], bool] | None = None,
    edit_object: Callable[[Path, Any], bool] | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``layout`` with ``replacements`` to ``out``: a file when the input is one file and
    ``out`` ends in .pt/.bin/.pth, else a folder mirroring the input's files. ``edit_object(file,
    obj)`` may change a loaded file's object in place (e.g. its optimizer state) and returns
    whether it did. ``before_commit(staged_path)`` runs on the complete staged output; raising
    there publishes nothing. Returns ``out``."""
    by_name = {e.name: e for e in layout.entries}
    _check(by_name, replacements)
    to_file = is_torch_file_name(out)
    if to_file and not layout.one_file:
        raise st.file_output_error(layout, out, "one file")
    if to_file and extra_files is not None:
        raise ValueError("extra_files needs a folder output")
    try:
        if to_file:
            with st.staged_file(out) as tmp:
                _write_one(layout.files[0], tmp, layout, replacements, edit_object)
                if before_commit is not None:
                    before_commit(tmp)
                shutil.copymode(layout.files[0], tmp)  # once written (a 0444 input)
                sidecar = provenance_sidecar(out)
                sidecar.unlink(missing_ok=True)
                st.write_provenance(sidecar, provenance)
                st.commit_file(tmp, out, force)
            return out
        with st.staged_folder(out, layout.folder) as staging:
            written: set[str] = set()
            for file in layout.files:
                _write_one(file, staging / file.name, layout, replacements, edit_object)
                written.add(file.name)
            if layout.index_file is not None:
                _write_index(layout.index_file, staging / layout.index_file.name, provenance)
                written.add(layout.index_file.name)
            if not layout.one_file:  # a one-file input's neighbours are not part of it
                written.add(provenance_sidecar(staging).name)
                st.copy_others(layout.folder, staging, written, skip_copy)
            if extra_files is not None:
                extra_files(layout.folder, staging)
            provenance_sidecar(staging).unlink(missing_ok=True)
            st.write_provenance(provenance_sidecar(staging), provenance)
            if before_commit is not None:
                before_commit(staging)
            st.commit_folder(staging, out, force)
    except OSError as exc:
        raise st.disk_error(out, layout, exc) from exc
    return out


def _check(by_name: Mapping[str, TensorEntry], replacements: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in replacements.items():
        entry = by_name.get(name)
        if entry is None:
            raise ValueError(f"replacement for tensor '{name}', which the checkpoint does not hold")
        if safetensors_dtype(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(
                f"replacement for '{name}' is {tensor.dtype} {tuple(tensor.shape)}, the "
                f"checkpoint stores {entry.dtype} {entry.shape}"
            )


def _write_one(
    src: Path,
    dst: Path,
    layout: CheckpointLayout,
    replacements: Mapping[str, torch.Tensor],
    edit_object: Callable[[Path, Any], bool] | None,
) -> None:
    mine = [e for e in layout.entries if e.file == src and e.name in replacements]
    obj: Any = None
    edited = False
    if mine or edit_object is not None:
        obj = torch_file.load(src)
        # Tensors by storage, built once per file: only tensors in one storage can overlap
        # (each replacement compared itself with every tensor of the file before: ~1 us per
        # pair, seconds for `--all` over a few thousand tensors).
        by_storage: dict[int, list[tuple[str, tuple[str | int, ...], torch.Tensor]]] = {}
        for name, key, tensor in torch_file.flatten(obj):
            by_storage.setdefault(_storage_of(tensor), []).append((name, key, tensor))
        for entry in mine:
            target = torch_file.lookup(obj, entry.key)
            if not isinstance(target, torch.Tensor) or tuple(target.shape) != entry.shape:
                raise CheckpointError(
                    f"'{src}' changed since it was opened: '{entry.name}' is not where it was",
                    hint="make sure nothing else writes to the input, then run pss again",
                )
            sharing = by_storage.get(_storage_of(target), [])
            _replace(src, obj, entry, target, replacements[entry.name], sharing)
        if edit_object is not None:
            edited = edit_object(src, obj)
    if not mine and not edited:
        shutil.copy2(src, dst)  # byte-identical: nothing in this file changes
        return
    legacy = not zipfile.is_zipfile(src)
    with open(dst, "wb") as f:
        torch.save(obj, f, _use_new_zipfile_serialization=not legacy)
    shutil.copymode(src, dst)


def _replace(
    src: Path,
    obj: Any,
    entry: TensorEntry,
    target: torch.Tensor,
    value: torch.Tensor,
    tensors: list[tuple[str, tuple[str | int, ...], torch.Tensor]],
) -> None:
    """Put `value` where `entry` is in the loaded object.

    In place, into the private (copy-on-write) mapping, so that names sharing this exact
    storage view (tied weights) see the new values too and torch.save keeps them one storage.
    A tensor that only overlaps others (q = qkv[:d], w_t = w.t(), a slice) gets a storage of its
    own instead: writing through it changed the overlapping names too, and the verification
    then failed as "a bug in pss". The others keep the values they had.
    """
    # Other names by key, not by object: torch.load gives a tensor saved under two names back
    # as one object, and that tie once went unnoticed (`other is not target` skipped it).
    overlapping = [
        (name, same)
        for name, key, other in tensors
        if key != entry.key
        for same in [_same_view(other, target)]
        if same or _overlap(other, target)
    ]
    if not any(not same for _, same in overlapping):
        target.copy_(value)
        return
    tied = [name for name, same in overlapping if same]
    views = [name for name, same in overlapping if not same]
    parent = torch_file.lookup(obj, entry.key[:-1])
    if tied or isinstance(parent, tuple):
        raise CheckpointError(
            f"'{entry.name}' in '{src}' shares memory with '{views[0]}' (a view of the same "
            "storage)" + (f" and is tied to '{tied[0]}'" if tied else " inside a tuple"),
            hint="smoothing it would change the other names too; save the checkpoint with "
            "each tensor .clone()d (or as safetensors), or leave it out with --layers",
        )
    parent[entry.key[-1]] = value.to(target.dtype).clone()


def _storage_of(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage().data_ptr())


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' byte ranges in their storage intersect (a conservative test: the
    span from the first to the last element)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        first = int(t.storage_offset()) * t.element_size()
        extent = sum(
            (int(size) - 1) * abs(int(stride))
            for size, stride in zip(t.shape, t.stride(), strict=True)
        )
        return first, first + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _write_index(index: Path, dst: Path, provenance: Mapping[str, str]) -> None:
    raw: Any = json.loads(index.read_text(encoding="utf-8"))
    metadata = raw.get("metadata")
    metadata = dict(metadata) if isinstance(metadata, dict) else {}
    metadata["pss_provenance"] = dict(provenance)
    raw["metadata"] = metadata
    with open(dst, "x", encoding="utf-8") as f:
        f.write(json.dumps(raw, indent=2) + "\n")
