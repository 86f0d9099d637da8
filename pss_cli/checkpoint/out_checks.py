"""Checks about an output path that need no computation, run before any (torch-free).

- the output is not the input, inside it, nor holding it, and its folder exists
  (``check_output_path``, the refusals every format's writer also makes);

- the output's folder is writable (probed by creating a file: permission bits do not tell
  about read-only mounts, and root passes every bit test);
- no other pss process is writing the same OUT now (its staging entry ``.OUT.pss-tmp-PID-*``
  names a live PID): the second run would fail only at the end, after all the computation;
- staging entries left by killed runs (``.*.pss-tmp-PID-*`` whose PID is gone) are found and
  named, and removed on request (``--clean-stale``);
- a one-file output is not put into the folder of a checkpoint it would then break (a second
  weights file beside ``model.safetensors`` makes the folder hold every tensor twice).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.staging import exists_error, file_output_error
from pss_cli.errors import UsageError

TMP_TAG = ".pss-tmp-"  # the writers' staging tag (checkpoint/staging.py), followed by the PID
_STAGING = re.compile(r"^\.(?P<out>.+)\.pss-tmp-(?:(?P<pid>\d+)-)?[^/]*$")
# A folder holding one of these is a model/training checkpoint folder that readers (pss,
# transformers) load as a whole.
_CHECKPOINT_MARKERS = (
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "trainer_state.json",
    "optimizer.pt",
)
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class StagingEntries:
    running: tuple[Path, ...]  # staging of OUT by a live process (not this one)
    stale: tuple[Path, ...]  # staging entries in OUT's folder whose process is gone


def probe_writable(folder: Path, out: Path) -> None:
    """UsageError unless a file can be created in ``folder`` (the output's parent)."""
    # Not named like a staging entry: nothing waiting for staging (or sweeping stale ones)
    # should mistake a probe for a write in progress.
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.pss-probe-", dir=folder)
    except OSError as exc:
        raise UsageError(
            f"cannot write the output '{out}': its folder '{folder}' is not writable "
            f"({exc.strerror or exc})",
            "choose an output on a writable disk, or fix the folder's permissions",
        ) from None
    try:
        os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def staging_entries(out: Path) -> StagingEntries:
    """Staging entries in ``out``'s folder: those of a live run writing ``out``, and the stale
    ones any killed run left there (entries without a PID, from older pss versions, count as
    stale)."""
    running: list[Path] = []
    stale: list[Path] = []
    try:
        names = os.listdir(out.parent)
    except OSError:
        return StagingEntries((), ())
    for name in sorted(names):
        match = _STAGING.match(name)
        if match is None:
            continue
        pid = match.group("pid")
        if pid is not None and _alive(int(pid)):
            if match.group("out") == out.name:
                running.append(out.parent / name)
            continue
        stale.append(out.parent / name)
    return StagingEntries(tuple(running), tuple(stale))


def refuse_concurrent(out: Path, entries: StagingEntries) -> None:
    if entries.running:
        raise UsageError(
            f"another pss process is writing '{out}' now (staging '{entries.running[0].name}')",
            "wait for it to finish, or choose another --out",
        )


def remove_stale(entries: StagingEntries) -> list[Path]:
    removed = []
    for path in entries.stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


def stale_note(entries: StagingEntries) -> str | None:
    if not entries.stale:
        return None
    names = ", ".join(p.name for p in entries.stale[:3])
    more = f" and {len(entries.stale) - 3} more" if len(entries.stale) > 3 else ""
    count = len(entries.stale)
    return (
        f"{count} stale staging {'entry' if count == 1 else 'entries'} left by killed pss runs "
        f"in '{entries.stale[0].parent}': {names}{more}; pass --clean-stale to remove "
        f"{'it' if count == 1 else 'them'}"
    )


def in_checkpoint_folder(source: Path) -> str | None:
    """The marker file that makes a one-file input's folder a checkpoint folder, or None."""
    if source.is_dir():
        return None
    return next((m for m in _CHECKPOINT_MARKERS if (source.parent / m).exists()), None)


def refuse_file_in_checkpoint_folder(source: Path, out: Path) -> None:
    """A weights-file OUT beside a one-file input, in a folder readers load as one checkpoint."""
    if not out.name.endswith(_WEIGHT_SUFFIXES):
        return
    folder = source.parent
    if out.parent.resolve() != folder.resolve():
        return
    marker = in_checkpoint_folder(source)
    if marker is None:
        return
    raise UsageError(
        f"output '{out}' would be a second weights file inside the checkpoint folder "
        f"'{folder}' (it holds {marker}): loaders read that folder's weight files together, "
        "and every tensor would then appear twice",
        "write the output outside that folder, e.g. beside it",
    )


def check_output_path(layout: CheckpointLayout, out: Path, *, force: bool = False) -> None:
    """The refusals of `write_repaired_checkpoint` about `out`, for callers that want them
    before doing the (long) work that precedes writing."""
    _check_file_suffix(layout, out)
    _check_out_path(layout, layout.folder, out, force=force)


def _check_file_suffix(layout: CheckpointLayout, out: Path) -> None:
    """An OUT ending in a format's one-file suffix is a file of that format: only a one-file
    input of the same format becomes one (a folder input does not fit in a file, and a
    safetensors file named .pt, or a pickle named .safetensors, fails whoever loads it)."""
    from pss_cli.checkpoint.formats import registry  # the formats import this module

    name = out.name.lower()
    own = registry.format_of(layout.kind)
    for fmt in registry.FORMATS:
        suffix = next((s for s in fmt.file_suffixes if name.endswith(s)), None)
        if suffix is None or (layout.one_file and fmt is own):
            continue
        if not layout.one_file:
            raise file_output_error(
                layout, out, f"a {suffix} file", f": smooth writes a {own.title} folder"
            )
        own_name = out.name[: -len(suffix)] + (own.file_suffixes or ("",))[0]
        raise UsageError(
            f"output '{out}' names a {fmt.title} file ({suffix}) but the input "
            f"'{layout.root}' is a {own.title} file: the repaired copy keeps the input's format",
            hint=f"name the output '{own_name}'",
        )


def _check_out_path(
    layout: CheckpointLayout, input_folder: Path, out: Path, *, force: bool
) -> None:
    out_real = out.resolve()
    # Resolved input files too: in the Hugging Face cache the files are symlinks into blobs/,
    # and writing over (or force-deleting a folder holding) a link's target harms the input.
    inputs = {p.resolve() for p in layout.files} | {layout.root.resolve()}
    if layout.index_file is not None:
        inputs.add(layout.index_file.resolve())
    hint = "choose an output path outside the input checkpoint, e.g. a sibling folder"
    if out_real in inputs or (not layout.one_file and out_real == input_folder.resolve()):
        raise UsageError(
            f"output '{out}' is the input checkpoint '{layout.root}'; pss never overwrites "
            "its input",
            hint=hint,
        )
    if not layout.one_file and out_real.is_relative_to(input_folder.resolve()):
        raise UsageError(
            f"output '{out}' is inside the input folder '{input_folder}'",
            hint=hint,
        )
    if any(p.is_relative_to(out_real) for p in inputs):
        raise UsageError(
            f"the input checkpoint '{layout.root}' is inside the output '{out}'",
            hint=hint,
        )
    if not out.parent.is_dir():
        raise UsageError(
            f"the folder '{out.parent}' for output '{out}' does not exist",
            hint=f"create it first (mkdir -p '{out.parent}') or choose another output path",
        )
    if os.path.lexists(out) and not force:
        raise exists_error(out)
