"""Stage, then rename atomically: how every writer publishes its output (one implementation).

Everything is staged beside ``out`` (same parent, so the final rename never crosses a
filesystem), fsynced, then moved into place with one rename; on any failure, Ctrl-C included,
the staging entry is removed, so ``out`` is either complete or absent. The safetensors, DCP and
torch writers all publish this way (same temp names, same --force swap, same fsync discipline).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.names import TORCH_SUFFIXES, TORCH_TAR_SUFFIXES
from pss_cli.errors import CheckpointError, UsageError

# Staging entries are named `.OUT.pss-tmp-PID-*` (out_checks.py finds stale and live ones by it).
TMP_TAG = ".pss-tmp-"
_OLD_TAG = ".pss-old-"


@contextlib.contextmanager
def staged_folder(out: Path, like: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out`` (same filesystem), removed on any failure."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}{os.getpid()}-", dir=out.parent))
    try:
        # The input folder's mode (mkdtemp makes it 0700), but writable by its owner: a
        # read-only input folder (a finished run locked with chmod a-w, a shared model store)
        # made the staging folder read-only before anything was written into it.
        os.chmod(staging, stat.S_IMODE(os.stat(like).st_mode) | stat.S_IRWXU)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(out: Path) -> Iterator[Path]:
    # The suffix kept, so that the staged file can be opened (and verified) as a checkpoint
    # (both of timm's `.pth.tar`).
    lower = out.name.lower()
    suffix = next((s for s in TORCH_TAR_SUFFIXES if lower.endswith(s)), out.suffix)
    fd, name = tempfile.mkstemp(
        prefix=f".{out.name}{TMP_TAG}{os.getpid()}-", suffix=suffix, dir=out.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        # BaseException: Ctrl-C must not leave a half-written hidden file behind either.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def commit_folder(staging: Path, out: Path, force: bool) -> None:
    _fsync_tree(staging)
    _commit_dir(staging, out, force)
    _fsync_dir(out.parent)


def commit_file(tmp: Path, out: Path, force: bool) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    _commit_file(tmp, out, force)
    _fsync_dir(out.parent)


def copy_others(
    input_folder: Path,
    staging: Path,
    written: set[str],
    skip_copy: Callable[[Path], bool] | None,
) -> list[str]:
    """Copy every other entry of ``input_folder`` unchanged, metadata (mtime, mode) kept by
    copy2; returns the names copied.

    Symbolic links: one that leads inside ``input_folder`` stays a link (its target is copied
    too, so it still leads there); one that leads outside it is copied as the file it points
    to (a Hugging Face cache snapshot is made of relative links to `../../blobs/<sha>`: copied
    as links, config.json and the tokenizer dangled in the output and `from_pretrained` failed
    on it), unless that file is weights or large (`_heavy`), which, like a folder, becomes a
    link to its absolute target (copying could pull in gigabytes or a whole cache, or loop); a
    dangling one stays as it is.
    """

    def skipped(path: Path) -> bool:
        return skip_copy is not None and skip_copy(path)

    copied = []
    with os.scandir(input_folder) as it:
        children = sorted(it, key=lambda e: e.name)
    for child in children:
        src = Path(child.path)
        if child.name in written or skipped(src):
            continue
        if _copy_entry(src, staging / child.name, skipped, Path(os.path.realpath(input_folder))):
            copied.append(child.name)
    return copied


def _copy_entry(src: Path, dst: Path, skipped: Callable[[Path], bool], root: Path) -> bool:
    """Copy one entry (see `copy_others`); False for what is not copied (FIFOs, sockets,
    devices: copying them could block or never end). ``root``: the input folder, resolved."""
    if src.is_symlink():
        target = Path(os.path.realpath(src))
        if target.is_relative_to(root) or not target.exists():
            os.symlink(os.readlink(src), dst)
        elif target.is_file() and not _heavy(src.name, target):
            shutil.copy2(target, dst)
        elif target.is_file() or target.is_dir():
            # Other weights (a snapshot's original/consolidated.00.pth, onnx/, flax: gigabytes
            # of the unrepaired model) and folders: a link to the absolute target, not a copy.
            os.symlink(target, dst)
        else:  # a FIFO or device behind the link: not read
            return False
        return True
    if src.is_dir():
        os.mkdir(dst)
        with os.scandir(src) as it:
            for entry in sorted(it, key=lambda e: e.name):
                path = Path(entry.path)
                if not skipped(path):
                    _copy_entry(path, dst / entry.name, skipped, root)
        shutil.copystat(src, dst)
        return True
    if src.is_file():
        shutil.copy2(src, dst, follow_symlinks=False)
        return True
    return False


# Files that a link outside the input leads to are copied unless they are weights or large.
_COPY_LIMIT_BYTES = 64 << 20
_WEIGHT_FILE_SUFFIXES = (
    ".safetensors", *TORCH_SUFFIXES, *TORCH_TAR_SUFFIXES, ".distcp",
    ".onnx", ".msgpack", ".h5", ".gguf", ".pb", ".tflite", ".npz", ".npy",
)  # fmt: skip


def _heavy(name: str, target: Path) -> bool:
    return name.lower().endswith(_WEIGHT_FILE_SUFFIXES) or target.stat().st_size > _COPY_LIMIT_BYTES


def file_output_error(layout: CheckpointLayout, out: Path, names: str, why: str = "") -> UsageError:
    """OUT names one file but the input is not one file: the one refusal for every format
    (exit 2, a usage error). ``names`` says what OUT names ("a .safetensors file")."""
    return UsageError(
        f"output '{out}' names {names} but the input '{layout.root}' is a {layout.kind} "
        f"checkpoint with {len(layout.files)} file(s)",
        hint=f"pass a folder as the output path{why}",
    )


def exists_error(out: Path) -> UsageError:
    return UsageError(
        f"output '{out}' already exists",
        hint="choose a new path, or pass --force to replace it",
    )


def disk_error(out: Path, layout: CheckpointLayout, exc: OSError) -> CheckpointError:
    where = f"'{exc.filename}'" if exc.filename else f"'{out}'"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        need = sum(_size(p) for p in layout.files) / 1e9
        return CheckpointError(
            f"cannot write the repaired checkpoint to '{out}': no space left on the device "
            f"holding {where}",
            hint=f"free at least {need:.2f} GB there (the weights alone need that much) or "
            "choose an output on another disk",
        )
    reason = exc.strerror or str(exc)
    return CheckpointError(
        f"cannot write the repaired checkpoint to '{out}': {reason} ({where})",
        hint="check that the output folder is writable and the disk is mounted",
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def write_provenance(path: Path, provenance: Mapping[str, str]) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(dict(provenance), indent=2, sort_keys=True) + "\n")


# Publishing: rename the staged result into place


def _commit_file(tmp: Path, out: Path, force: bool) -> None:
    if force and not out.is_dir():
        os.replace(tmp, out)  # atomic even when out exists: no moment without a valid out
        return
    if force:
        _swap_in(tmp, out)
        return
    try:
        # link() fails with EEXIST when out appeared meanwhile (another writer): no silent
        # overwrite, unlike rename(), which replaces files.
        os.link(tmp, out)
    except FileExistsError:
        raise exists_error(out) from None
    except OSError:
        # Filesystems without hard links (some FUSE/SMB mounts): best effort check then rename.
        if os.path.lexists(out):
            raise exists_error(out) from None
        os.replace(tmp, out)
        return
    tmp.unlink()


def _commit_dir(staging: Path, out: Path, force: bool) -> None:
    if force and os.path.lexists(out):
        _swap_in(staging, out)
        return
    try:
        # rename() of a folder onto an existing non-empty folder (or a file) fails, so a
        # concurrent writer that finished first wins and we report "exists".
        os.rename(staging, out)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise exists_error(out) from None
        raise


def _swap_in(staged: Path, out: Path) -> None:
    """--force: move the old out aside, rename the new one in, then delete the old one; put the
    old one back if the second rename fails, so a failure never loses the previous output."""
    aside = out.parent / f".{out.name}{_OLD_TAG}{secrets.token_hex(6)}"
    os.rename(out, aside)
    try:
        os.rename(staged, out)
    except BaseException:
        os.rename(aside, out)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            aside.unlink()


# Durability


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under ``root`` (copies included): rename is atomic,
    but without fsync a crash could publish a folder whose files are still empty."""
    for path in _walk(root):
        if path.is_symlink():
            continue
        if path.is_dir():
            _fsync_dir(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _walk(root: Path) -> Iterator[Path]:
    yield root
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            yield Path(folder) / name


def _fsync_dir(folder: Path) -> None:
    # Directory fsync makes the rename itself durable; not all platforms allow it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
