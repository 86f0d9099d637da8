"""Turn a user-given path into a validated CheckpointLayout (headers only, no tensor data).

Each format of the registry (formats/registry.py) is asked in turn whether the path is its own:
safetensors (a ``.safetensors`` file, an HF ``*.safetensors.index.json`` or a folder holding one
or several ``.safetensors`` files, e.g. an HF Trainer ``checkpoint-N/`` whose optimizer.pt and
trainer_state.json are ignored here), a PyTorch Distributed Checkpoint folder (``.metadata`` +
``*.distcp``), torch pickles (a ``.pt``/``.bin``/``.pth``/``.ckpt`` file, a
``pytorch_model.bin.index.json`` with its shards, or a folder of such files). A folder with both
safetensors and .bin/.pt weights is read as safetensors (as transformers does); the others are
reported as not scanned. A file no format claims is tried as safetensors.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from pss_cli.checkpoint.formats import registry
from pss_cli.checkpoint.formats.safetensors.header import stat_path
from pss_cli.checkpoint.layout_files import list_files, weight_subfolders
from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.errors import CheckpointNotFoundError

# Formats we recognise only to say so clearly.
_UNSUPPORTED_SUFFIXES = {
    ".gguf": "a GGUF file",
    ".onnx": "an ONNX model",
    ".h5": "an HDF5 file (Keras, TensorFlow)",
    ".hdf5": "an HDF5 file",
    ".keras": "a Keras model",
    ".msgpack": "a msgpack file (Flax)",
    ".npz": "a NumPy archive",
    ".npy": "a NumPy array",
    ".tflite": "a TensorFlow Lite model",
}
_CONVERT_HINT = "convert the weights to safetensors (e.g. safetensors.torch.save_file) first"
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")


def open_checkpoint(path: Path) -> CheckpointLayout:
    """Discover and validate the checkpoint at ``path``; raise a CheckpointError subclass with a
    one-line message naming the file (and tensor) when it is missing or inconsistent."""
    st = stat_path(path)
    if stat.S_ISDIR(st.st_mode):
        return _open_directory(path)
    for fmt in registry.FORMATS:  # read at call time: a test may register a format
        layout = fmt.open_file(path)
        if layout is not None:
            return layout
    suffix = path.suffix.lower()
    if suffix in _UNSUPPORTED_SUFFIXES:
        raise CheckpointNotFoundError(
            f"'{path}' is {_UNSUPPORTED_SUFFIXES[suffix]}, which pss does not read",
            hint=_CONVERT_HINT,
        )
    return registry.SAFETENSORS.open_any_file(path)


def _open_directory(folder: Path) -> CheckpointLayout:
    children = list_files(folder)
    for fmt in registry.FORMATS:
        layout = fmt.open_folder(folder, children)
        if layout is not None:
            return layout
    raise _no_safetensors_error(folder, children)


def _no_safetensors_error(folder: Path, children: list[Path]) -> CheckpointNotFoundError:
    found = ", ".join(p.name for p in children[:8]) or "nothing"
    if len(children) > 8:
        found += f", ... ({len(children)} files)"
    unsupported = sorted({p.suffix for p in children if p.suffix.lower() in _UNSUPPORTED_SUFFIXES})
    note = f"; {'/'.join(unsupported)} files are not supported yet" if unsupported else ""
    message = f"folder '{folder}' holds no .safetensors files (found: {found}){note}"
    latest = _latest_checkpoint_dir(folder)
    parts = weight_subfolders(folder, limit=4)
    snapshots = _snapshots(folder)
    if latest is not None:
        hint = f"it holds trainer checkpoints: pass one of them, e.g. '{latest}'"
    elif snapshots:
        # A Hugging Face cache repo folder (models--org--name): the files are in a snapshot.
        hint = f"it is a Hugging Face cache folder: pass a snapshot, e.g. '{snapshots[-1]}'"
    elif parts:
        # A diffusers pipeline (unet/, vae/, text_encoder/), a sentence-transformers model
        # (0_Transformer/): each component is a checkpoint of its own.
        named = ", ".join(f"'{p.parent}'" for p in parts)
        hint = f"its weights are in sub-folders, each a checkpoint of its own: pass {named}"
    elif unsupported:
        hint = _CONVERT_HINT
    else:
        hint = "pass a folder or file that holds .safetensors weights"
    return CheckpointNotFoundError(message, hint=hint)


def _snapshots(folder: Path) -> list[Path]:
    """The snapshot folders of a Hugging Face cache repo folder, oldest first."""
    try:
        found = [p for p in (folder / "snapshots").iterdir() if p.is_dir()]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _latest_checkpoint_dir(folder: Path) -> Path | None:
    try:
        subdirs = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT_DIR.fullmatch(p.name)]
    except OSError:
        return None
    if not subdirs:
        return None
    return max(subdirs, key=lambda p: int(p.name.split("-")[1]))
