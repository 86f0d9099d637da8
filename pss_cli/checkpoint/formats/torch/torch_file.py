"""Read ``torch.save`` checkpoints (.pt/.bin/.pth) safely: weights_only=True, mmap when possible.

Security: pss never executes pickled code. Every file is loaded with
``torch.load(weights_only=True)``, whose unpickler accepts only tensors, primitives and
containers; a file that needs any other global (a pickled nn.Module, a custom class, a
``__reduce__`` calling os.system) is refused with the offending global named, and the advice to
convert it to safetensors in a trusted environment.

Memory: zip-format files (torch >= 1.6 default) are loaded with ``mmap=True``: tensors are views
of a private (copy-on-write) mapping, read lazily, so a 100 GB file costs what is touched.
Legacy (non-zip) files cannot be mapped and are read into memory whole.

Names: the model's state dict is found inside common wrappers (``state_dict`` (Lightning),
``model_state_dict``, ``model``, ``module`` (DeepSpeed)), and nested dicts are flattened with
dotted names, so the names match those of the same weights in safetensors. Each entry keeps its
key path (TensorEntry.key) so that a repair can put tensors back exactly where they were.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import threading
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry
from pss_cli.checkpoint.names import HARMLESS_PICKLE_TYPES, allow_pickle_types
from pss_cli.checkpoint.sniff import renaming_hint
from pss_cli.checkpoint.torch_dtypes import safetensors_dtype
from pss_cli.errors import CheckpointError, CorruptCheckpointError
from pss_cli.quiet import quiet_warnings

# Wrapper keys whose value is the model's state dict, in the order they are tried.
MODEL_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Top-level siblings of the weights that are never model weights (moments are 2-D floats).
NON_MODEL_KEYS = frozenset(
    {
        "optimizer",
        "optimizer_state_dict",
        "optimizer_states",
        "optim",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "scaler",
        "rng_state",
        "callbacks",
        "loops",
    }
)
# A plain state dict is what pss reads; torch.save keeps tied weights (safetensors' save_file
# refuses tensors that share memory, and the object torch.load returns may be a whole module).
CONVERT_HINT = (
    "pss never executes pickled code; in a trusted environment, save the weights as a plain "
    "state dict (obj = torch.load(path, weights_only=False); torch.save(obj.state_dict() if "
    "hasattr(obj, 'state_dict') else obj, 'weights.pt')) and scan that"
)
_DAMAGED_HINT = "the file is truncated or damaged: copy or download it again"
# Re-map a file after this many bytes were read through its mapping (the unpickling it costs is
# small next to reading 256 MiB), so a scan's RSS does not grow with the file.
REMAP_BYTES = 256 * 2**20


def load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``, mapped when the format allows; typed errors."""
    try:
        mappable = zipfile.is_zipfile(path)
    except OSError as exc:
        raise CorruptCheckpointError(
            f"cannot read '{path}': {exc.strerror or exc}", hint=_DAMAGED_HINT
        ) from None
    if mappable:
        _check_crcs(path)
    try:
        # Legacy (non-zip) files make torch warn about the pickle protocol; irrelevant here.
        quiet = contextlib.nullcontext() if mappable else quiet_warnings("Detected pickle protocol")
        with quiet, torch.serialization.safe_globals(_extra_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mappable)
    except OSError as exc:
        raise CorruptCheckpointError(
            f"cannot read '{path}': {exc.strerror or exc}", hint=_DAMAGED_HINT
        ) from None
    except Exception as exc:
        raise load_error(path, exc) from None


# Files whose zip records passed their CRC check in this process: (path, size, mtime_ns).
_VERIFIED: set[tuple[str, int, int]] = set()


def _check_crcs(path: Path) -> None:
    """Every zip record against its stored CRC-32, once per file version and process.

    torch.load reads a zip checkpoint's tensor records without checking them: 64 flipped bytes
    in the middle of a valid `.pt` loaded silently and changed one layer's stable rank from 1.00
    to 1.72. Reading the records once more costs a pass over the file (then in the page cache
    for the load that follows); a damaged checkpoint must not pass as a healthy one.
    """
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                # torch.serialization.set_crc32_options(False) writes 0 for every record:
                # nothing to check there (torch.load reads such files).
                if info.CRC == 0 and info.file_size > 0:
                    continue
                try:
                    with archive.open(info) as record:  # checks the CRC at the record's end
                        while record.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    raise CorruptCheckpointError(
                        f"'{path}' is damaged: its record '{info.filename}' does not match its "
                        "CRC-32 checksum",
                        hint=_DAMAGED_HINT,
                    ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CorruptCheckpointError(
            f"cannot read '{path}' as a zip checkpoint: {exc}", hint=_DAMAGED_HINT
        ) from None
    _VERIFIED.add(key)


def _extra_safe_globals() -> list[Any]:
    """The opt-in allow-list (formats.HARMLESS_PICKLE_TYPES) as classes, or nothing."""
    if not allow_pickle_types():
        return []
    classes: list[Any] = []
    for dotted in HARMLESS_PICKLE_TYPES:
        module, _, name = dotted.rpartition(".")
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:
            classes.append(found)
    return classes


def load_error(path: Path, exc: BaseException) -> CheckpointError:
    """The one-line error for a torch.load failure: needs arbitrary pickle, or damaged."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch embeds ANSI bold codes
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(
        r"[Uu]nsupported (?:global|class)[: ]+([\w.]+)", text
    )
    if found:
        name = found.group(1)
        hint = CONVERT_HINT
        if name in HARMLESS_PICKLE_TYPES and not allow_pickle_types():
            hint = (
                f"'{name}' is plain data (a hyperparameter, typically): pass "
                "--allow-pickle-types (or set PSS_ALLOW_PICKLE_TYPES=1) to let pss build it and "
                "the few other harmless types listed in docs/formats.md"
            )
        return CheckpointError(
            f"'{path}' needs arbitrary pickle to load (the global '{name}'): pss "
            "refuses it, because unpickling can run any code the file's author chose",
            hint=hint,
        )
    renamed = renaming_hint(path, "torch")
    if renamed is not None:
        return CorruptCheckpointError(f"'{path}' is not a torch checkpoint", hint=renamed)
    if "WeightsUnpickler error:" in text:
        # Not a global: an opcode or structure torch's safe unpickler refuses (garbage, or a
        # pickle built by hand). Either way pss cannot read it safely.
        reason = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the")[0].split())
        return CorruptCheckpointError(
            f"'{path}' is not a readable torch checkpoint (torch's safe loader refuses it: "
            f"{reason[:120] or 'unknown reason'})",
            hint="it is damaged, or a pickle that needs more than tensors; " + CONVERT_HINT,
        )
    detail = " ".join(text.split())[:200] or type(exc).__name__
    return CorruptCheckpointError(
        f"'{path}' is not a readable torch checkpoint ({type(exc).__name__}: {detail})",
        hint=_DAMAGED_HINT,
    )


def model_root(obj: Any) -> tuple[tuple[str | int, ...], Mapping[Any, Any]]:
    """The key path to the model state dict inside ``obj`` and that dict (maybe ``obj``)."""
    if not isinstance(obj, Mapping):
        return (), {}
    path: tuple[str | int, ...] = ()
    current: Mapping[Any, Any] = obj
    while True:
        for key in MODEL_CONTAINER_KEYS:
            value = current.get(key)
            if isinstance(value, Mapping) and _holds_tensor(value):
                path = (*path, key)
                current = value
                break
        else:
            return path, current


def other_weight_sets(obj: Any) -> list[tuple[str, int]]:
    """(key, tensor count) of the dicts of weights stored beside the model's in a wrapped
    checkpoint ({"model": ..., "ema": ...}, timm's {"state_dict": ..., "state_dict_ema": ...}),
    which pss does not analyse: they were left out of the report without a word."""
    root, _ = model_root(obj)
    if not root or not isinstance(obj, Mapping):
        return []
    found = []
    for key, value in obj.items():
        if key == root[0] or not isinstance(key, str) or key in NON_MODEL_KEYS:
            continue
        if not isinstance(value, Mapping):
            continue
        tensors = [t for _, _, t in flatten(value)]
        if any(t.dim() >= 2 for t in tensors):
            found.append((key, len(tensors)))
    return found


def _holds_tensor(value: Any, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if depth > 64:
        return False
    if isinstance(value, Mapping):
        return any(_holds_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_tensor(v, depth + 1) for v in value)
    return False


def flatten(obj: Any) -> Iterator[tuple[str, tuple[str | int, ...], torch.Tensor]]:
    """(dotted name, key path from ``obj``'s root, tensor) of every model tensor in ``obj``."""
    root, state = model_root(obj)
    at_top = not root
    stack: list[tuple[str, tuple[str | int, ...], Any]] = [("", root, state)]
    while stack:
        prefix, path, value = stack.pop()
        if isinstance(value, torch.Tensor):
            yield prefix, path, value
            continue
        if len(path) > 64:
            continue  # absurd nesting: not a state dict
        children: list[tuple[str, tuple[str | int, ...], Any]] = []
        if isinstance(value, Mapping):
            for key, child in value.items():
                if not isinstance(key, str | int) or isinstance(key, bool):
                    continue
                if at_top and path == root and isinstance(key, str) and key in NON_MODEL_KEYS:
                    continue
                name = f"{prefix}.{key}" if prefix else str(key)
                children.append((name, (*path, key), child))
        elif isinstance(value, list | tuple):
            for i, child in enumerate(value):
                name = f"{prefix}.{i}" if prefix else str(i)
                children.append((name, (*path, i), child))
        stack.extend(reversed(children))


def lookup(obj: Any, key: tuple[str | int, ...]) -> Any:
    for part in key:
        obj = obj[part]
    return obj


def entries_of(path: Path, obj: Any, aliases: dict[str, str] | None = None) -> list[TensorEntry]:
    """Entries of one loaded file; a tensor shared under several names (tied weights) is listed
    once, under its first name, so that it is scanned and smoothed once. `aliases`, when
    given, receives each other name -> the name it is listed under."""
    if not isinstance(obj, Mapping) and _holds_tensor(obj):
        # A bare tensor or a list of state dicts has no names to report: once an empty report
        # with exit 0, as if the file held no weights.
        raise CheckpointError(
            f"'{path}' holds a {type(obj).__name__}, not a state dict (names -> tensors)",
            hint="save model.state_dict() (or a dict of named tensors) and scan that file",
        )
    entries: list[TensorEntry] = []
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    names: set[str] = set()
    for name, key, tensor in flatten(obj):
        if name in names:
            raise CorruptCheckpointError(
                f"'{path}' holds two tensors named '{name}' (keys {key!r} and another)",
                hint="flattening its nested dicts made names collide; convert it to "
                "safetensors with names of your choice",
            )
        names.add(name)
        dtype = safetensors_dtype(tensor.dtype)
        if dtype is None or tensor.layout is not torch.strided or tensor.is_quantized:
            continue  # complex32, sparse, quantized: kept as they are, never analysed
        alias = (
            tensor.untyped_storage().data_ptr(),
            int(tensor.storage_offset()),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() and alias in seen:
            if aliases is not None:
                aliases[name] = seen[alias]
            continue
        seen[alias] = name
        entries.append(
            TensorEntry(
                name=name,
                file=path,
                dtype=dtype,
                shape=tuple(tensor.shape),
                data_offsets=(0, tensor.numel() * tensor.element_size()),
                key=key,
            )
        )
    return entries


class TorchBackend:
    """Tensors of torch files, each file loaded (mapped) once per reader and kept until
    ``release()``; returned tensors hold their own reference to the mapping."""

    def __init__(self, layout: CheckpointLayout) -> None:
        self._layout = layout
        self._loaded: dict[Path, Any] = {}
        self._mapped_bytes = 0
        self._legacy: set[Path] = set()
        self._lock = threading.Lock()

    def read(self, entry: TensorEntry) -> torch.Tensor:
        with self._lock:
            if self._mapped_bytes > REMAP_BYTES:
                # Pages read through a mapping stay in RSS while it lives; forgetting the
                # loaded object unmaps the file once the caller drops the tensors it holds.
                # Legacy files are kept: they are in memory anyway, and reloading re-reads them.
                self._loaded = {p: o for p, o in self._loaded.items() if p in self._legacy}
                self._mapped_bytes = 0
            obj = self._loaded.get(entry.file)
            if obj is None:
                obj = load(entry.file)
                self._loaded[entry.file] = obj
                if not zipfile.is_zipfile(entry.file):
                    self._legacy.add(entry.file)
            if entry.file not in self._legacy:
                self._mapped_bytes += entry.nbytes
        try:
            tensor = lookup(obj, entry.key)
        except (KeyError, IndexError, TypeError):
            tensor = None
        if (
            not isinstance(tensor, torch.Tensor)
            or tuple(tensor.shape) != entry.shape
            or safetensors_dtype(tensor.dtype) != entry.dtype
        ):
            raise CorruptCheckpointError(
                f"tensor '{entry.name}' in '{entry.file}' is no longer what it was when the "
                "checkpoint was opened",
                hint="make sure nothing else writes to the input, then run pss again",
            )
        return tensor

    def release(self) -> None:
        with self._lock:
            self._loaded = {}

    def close(self) -> None:
        self.release()
