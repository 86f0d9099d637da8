"""Writing report files: temp file + rename, so a failed run never leaves a half-written report."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pss_cli.errors import UsageError


def write_text_atomically(path: Path, text: str) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(
            f"cannot write '{path}': folder '{directory}' does not exist",
            "create the folder first or choose another --output path",
        )
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    except OSError as exc:
        raise UsageError(
            f"cannot write '{path}': {exc.strerror or exc}", "check the path and permissions"
        ) from exc
