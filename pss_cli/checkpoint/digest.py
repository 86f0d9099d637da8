"""Hashes of tensors' stored bytes, read straight from the files (to prove "byte-identical")."""

from __future__ import annotations

from pss_cli.checkpoint.formats.registry import format_of
from pss_cli.checkpoint.model import CheckpointLayout


def tensor_digests(layout: CheckpointLayout, names: set[str] | None = None) -> dict[str, str]:
    """sha256 of each tensor's stored bytes (all tensors, or those in `names`), streamed.

    safetensors: of the tensor's byte range. DCP: of the tensor's stored chunk items (verbatim
    copies hash alike). torch pickles: of the tensor's values as stored (row-major bytes), since
    torch.save places them anew each time. Each format's ``digests`` says how.
    """
    return format_of(layout.kind).digests(layout, names)
