"""The checkpoint formats pss reads and writes: one line per format (docs/ARCHITECTURE.md,
"Adding a checkpoint format"). Order is detection order: a folder with both .safetensors and
.bin files is read as safetensors, as transformers does."""

from __future__ import annotations

from pss_cli.checkpoint.formats.dcp.format import DcpFormat
from pss_cli.checkpoint.formats.protocol import CheckpointFormat
from pss_cli.checkpoint.formats.safetensors.format import SafetensorsFormat
from pss_cli.checkpoint.formats.torch.format import TorchFormat

SAFETENSORS = SafetensorsFormat()  # also opens any file no format claims (discover.py)

FORMATS: tuple[CheckpointFormat, ...] = (
    SAFETENSORS,
    DcpFormat(),
    TorchFormat(),
)


def format_of(kind: str) -> CheckpointFormat:
    """The format that owns layouts of ``kind`` (a layout's kind names its format)."""
    for fmt in FORMATS:
        if kind in fmt.kinds:
            return fmt
    raise LookupError(f"no checkpoint format owns layout kind {kind!r}")
