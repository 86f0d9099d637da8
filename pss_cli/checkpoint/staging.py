"""Stage-then-rename for the non-safetensors writers, reusing writer.py's helpers.

Thin public wrappers: writer.py (owned by the safetensors writer) keeps these private, and the
DCP and torch writers must publish their output exactly the same way (same temp names, same
--force swap, same fsync discipline), so they call the same code rather than a copy of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from pss_cli.checkpoint import writer as _writer
from pss_cli.checkpoint.model import CheckpointLayout

TMP_TAG = _writer._TMP_TAG


def input_folder(layout: CheckpointLayout) -> Path:
    return _writer._input_folder(layout)


@contextlib.contextmanager
def staged_folder(out: Path, like: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out`` (same filesystem), removed on any failure."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}{os.getpid()}-", dir=out.parent))
    try:
        shutil.copymode(like, staging)  # mkdtemp makes it 0700
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(out: Path) -> Iterator[Path]:
    # The suffix kept, so that the staged file can be opened (and verified) as a checkpoint.
    fd, name = tempfile.mkstemp(
        prefix=f".{out.name}{TMP_TAG}{os.getpid()}-", suffix=out.suffix, dir=out.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def commit_folder(staging: Path, out: Path, force: bool) -> None:
    _writer._fsync_tree(staging)
    _writer._commit_dir(staging, out, force)
    _writer._fsync_dir(out.parent)


def commit_file(tmp: Path, out: Path, force: bool) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    _writer._commit_file(tmp, out, force)
    _writer._fsync_dir(out.parent)


def copy_others(
    folder: Path, staging: Path, written: set[str], skip: Callable[[Path], bool] | None
) -> list[str]:
    """Every other entry of ``folder`` copied unchanged (links kept as links)."""
    return _writer._copy_others(folder, staging, written, skip)


def disk_error(out: Path, layout: CheckpointLayout, exc: OSError) -> Exception:
    return _writer._disk_error(out, layout, exc)


def write_provenance(path: Path, provenance: Mapping[str, str]) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(dict(provenance), indent=2, sort_keys=True) + "\n")
