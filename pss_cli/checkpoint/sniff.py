"""What a file's first bytes say it is, for error messages: pss picks a checkpoint's format by
its name, and a torch zip named .safetensors (or a safetensors file named .pt) otherwise failed
with a message about header lengths or pickle opcodes that did not say what the file was."""

from __future__ import annotations

import struct
from pathlib import Path

_PICKLE_PROTOCOLS = frozenset({2, 3, 4, 5})


def sniff(path: Path) -> str | None:
    """'torch' (a torch.save zip or legacy pickle), 'safetensors', 'gguf', or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = f.seek(0, 2)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return "torch"  # torch.save's zip format (any zip, strictly; torch's is the one seen)
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return "torch"  # a pickle: torch.save's legacy format
    if head.startswith(b"GGUF"):
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8:
            return "safetensors"
    return None


def renaming_hint(path: Path, expected: str) -> str | None:
    """A hint when the content is another format than the one its name made pss expect."""
    found = sniff(path)
    if found is None or found == expected:
        return None
    if found == "torch":
        return f"'{path.name}' is a torch checkpoint (torch.save), whatever its name: name it .pt"
    if found == "safetensors":
        return f"'{path.name}' is a safetensors file, whatever its name: name it .safetensors"
    return f"'{path.name}' is a GGUF file, which pss does not read"
