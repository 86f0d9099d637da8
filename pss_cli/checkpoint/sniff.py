"""What a file's first bytes say it is, for error messages: pss picks a checkpoint's format by
its name, and a torch zip named .safetensors (or a safetensors file named .pt) otherwise failed
with a message about header lengths or pickle opcodes that did not say what the file was."""

from __future__ import annotations

import struct
from pathlib import Path

_PICKLE_PROTOCOLS = frozenset({2, 3, 4, 5})


def sniff(path: Path) -> str | None:
    """'torch' (a torch.save zip or legacy pickle), 'safetensors', 'gguf', 'lfs' (a Git LFS
    pointer), 'hdf5' (Keras .h5), 'keras' (a Keras 3 .keras zip), 'npz' (NumPy), 'zip' (any
    other zip), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            size = f.seek(0, 2)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return "torch"  # a pickle: torch.save's legacy format
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(b"version https://git-lfs"):
        return "lfs"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8:
            return "safetensors"
    return None


def _zip_kind(path: Path) -> str:
    """torch.save's zip holds `<name>/data.pkl`; Keras 3 `config.json` and
    `model.weights.h5`; NumPy's .npz `.npy` members."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()[:1000]
    except (OSError, zipfile.BadZipFile):
        return "torch"  # a damaged zip: most likely a cut torch.save file, named as such
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    if "model.weights.h5" in names:
        return "keras"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "zip"


_OTHER_FORMATS = {
    "gguf": "a GGUF file",
    "hdf5": "an HDF5 file (Keras .h5?)",
    "keras": "a Keras model (.keras)",
    "npz": "a NumPy archive (.npz)",
    "zip": "a zip archive that is not a torch checkpoint",
}


def renaming_hint(path: Path, expected: str) -> str | None:
    """A hint when the content is another format than the one its name made pss expect."""
    found = sniff(path)
    if found is None or found == expected:
        return None
    if found == "torch":
        return f"'{path.name}' is a torch checkpoint (torch.save), whatever its name: name it .pt"
    if found == "safetensors":
        return f"'{path.name}' is a safetensors file, whatever its name: name it .safetensors"
    if found == "lfs":
        return (
            f"'{path.name}' is a Git LFS pointer, not the weights: fetch them (git lfs pull) "
            "and scan the real file"
        )
    return (
        f"'{path.name}' is {_OTHER_FORMATS[found]}, which pss does not read: convert the "
        "weights to safetensors (safetensors.torch.save_file) first"
    )
