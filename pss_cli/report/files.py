"""Writing report files: temp file + rename, so a failed run never leaves a half-written report."""

from __future__ import annotations

import contextlib
import io
import os
import select
import stat
import sys
import tempfile
from pathlib import Path

from pss_cli.errors import PssError, UsageError


class OutputError(PssError):
    """A report file could not be written (exit 3: the run itself failed)."""


def refuse_overwriting_checkpoint(output: Path, checkpoint: Path) -> None:
    """`-o` must never land on the checkpoint: the file itself, or anything inside its folder
    (a shard, the index, a Trainer folder's files). Checked before any work is done."""
    out = output.resolve()
    source = checkpoint.resolve()
    folder = source if source.is_dir() else None
    if source.is_file() and source.name.endswith(".index.json"):
        folder = source.parent  # a sharded index: its shards live beside it
    if out == source or (folder is not None and out.is_relative_to(folder)):
        raise UsageError(
            f"--output '{output}' would overwrite part of the checkpoint '{checkpoint}'",
            "write the report outside the checkpoint, e.g. -o report.json",
        )


def check_report_path(path: Path) -> None:
    """Usage errors about -o FILE, raised before any work is done."""
    if _written_in_place(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f"cannot write '{path}': permission denied", "choose another path")
        return  # a device or FIFO (/dev/null, /dev/stdout): its folder need not be writable
    if path.is_symlink():
        path = Path(os.path.realpath(path))  # the link's target is what gets written
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(
            f"cannot write '{path}': folder '{directory}' does not exist",
            "create the folder first or choose another --output path",
        )
    if path.is_dir():
        raise UsageError(f"cannot write '{path}': it is a folder", "name a file for --output")
    try:
        # Created and removed at once: permission bits say nothing about read-only mounts,
        # and a report refused after the whole scan wastes it.
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=directory)
    except OSError as exc:
        raise UsageError(
            f"cannot write '{path}': folder '{directory}' is not writable ({exc.strerror or exc})",
            "choose a writable --output path",
        ) from None
    try:
        os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def write_text_atomically(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename.

    A symlink is followed (its target is replaced, the link stays a link), and a path that is
    neither a file nor missing (a device such as /dev/null or /dev/stdout, a FIFO) is written
    in place: a rename would have replaced the device node itself with a regular file (as
    root, `-o /dev/null` replaced the system's /dev/null).
    """
    if _written_in_place(path):  # through any link (/dev/stdout -> /proc/self/fd/1 -> a pipe)
        _write_in_place(path, data)
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        check_report_path(path)
    except UsageError as exc:
        # Checked before the run too (a usage error then); failing now, after the work (the
        # folder was removed meanwhile), the run itself failed: exit 3, not 2.
        raise OutputError(exc.message, exc.hint) from exc
    directory = path.parent if str(path.parent) else Path(".")
    temp: str | None = None
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            # Data on disk before the rename publishes it: after a crash the report is the old
            # one or the new one, never an empty file (a full disk often shows up only here).
            os.fsync(handle.fileno())
        # mkstemp creates 0600; a report is an ordinary file: honour the umask like open() does.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
        temp = None
    except OSError as exc:
        raise _output_error(path, exc) from exc
    finally:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def _written_in_place(path: Path) -> bool:
    # Neither missing, nor a file, nor a folder: a character device or a FIFO.
    return path.exists() and not path.is_file() and not path.is_dir()


def _write_in_place(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as handle:  # no truncation of a device; a FIFO's reader gets it
            handle.write(data)
    except OSError as exc:
        raise _output_error(path, exc) from exc


def _output_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(
        f"cannot write '{path}': {exc.strerror or exc}", "check the path, space and permissions"
    )


def write_stdout(text: str) -> None:
    """Print a command's result: every byte, or a BrokenPipeError.

    Into a pipe whose reader went away mid-write (`pss scan ... | head`), Python's buffered
    stdout wrote what the pipe took and dropped the rest without an error (measured: one write
    of 65536 of 700000 bytes, SIGPIPE ignored, exit 0), so the documented exit 141 never came.
    A pipe gets the bytes with os.write until all are taken; anything else (a terminal, a file,
    a test runner's buffer) the usual text stream.
    """
    try:
        fd = sys.stdout.fileno()
        pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pipe = False
    if not pipe:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:  # stdout on a full disk (or /dev/full): a failed run, not a bug
            raise OutputError(
                f"cannot write the report to standard output: {exc.strerror or exc}",
                "check the space left where standard output goes, or use -o FILE",
            ) from exc
        return
    sys.stdout.flush()
    data = memoryview(text.encode(sys.stdout.encoding or "utf-8", sys.stdout.errors or "strict"))
    while data:
        try:
            data = data[os.write(fd, data) :]
        except BlockingIOError:  # a pipe its parent set non-blocking: wait until writable
            select.select([], [fd], [])
