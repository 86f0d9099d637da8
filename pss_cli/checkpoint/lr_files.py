"""Where a checkpoint keeps the learning rates it resumes with, and how ``--lr-scale`` rewrites
and verifies them (the arithmetic is in lr_scale.py).

- HF Trainer ``checkpoint-N/``: ``optimizer.pt`` + ``scheduler.pt``;
- accelerate ``save_state`` folders: ``optimizer.bin`` + ``scheduler.bin``;
- one torch file (Lightning ``.ckpt``, a ``{"model", "optimizer", "scheduler"}`` ``.pt``): the
  ``optimizer_states``/``optimizer``... and ``lr_schedulers``/``lr_scheduler``/``scheduler`` keys.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pss_cli.checkpoint import lr_scale
from pss_cli.checkpoint.formats.torch import torch_file
from pss_cli.checkpoint.optimizer import OPTIMIZER_FILE_NAMES
from pss_cli.checkpoint.optimizer_in_file import IN_FILE_OPTIMIZER_KEYS
from pss_cli.errors import CheckpointError
from pss_cli.quiet import quiet_warnings

SCHEDULER_FILE_NAMES = ("scheduler.pt", "scheduler.bin")  # HF Trainer / accelerate
IN_FILE_SCHEDULER_KEYS = ("lr_schedulers", "lr_scheduler", "scheduler")


def _load(path: Path) -> Any:
    """Optimizer and scheduler files with the same safe loader as everything else: a file that
    needs more than plain data is refused, never unpickled."""
    try:
        with quiet_warnings("Detected pickle protocol"):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot load '{path}' safely to scale its learning rates "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
            hint="drop --lr-scale, and set the resume LR in your training script instead",
        ) from None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _in_file_states(obj: Any) -> tuple[list[Any], list[Any]]:
    """(optimizer state dicts, scheduler state dicts) kept inside one loaded torch file."""
    if not isinstance(obj, dict):
        return [], []
    optimizers = [s for k in IN_FILE_OPTIMIZER_KEYS if k in obj for s in _as_list(obj[k])]
    schedulers = [s for k in IN_FILE_SCHEDULER_KEYS if k in obj for s in _as_list(obj[k])]
    return (
        [s for s in optimizers if isinstance(s, dict)],
        [s for s in schedulers if isinstance(s, dict)],
    )


@dataclass
class LrScalePlan:
    """The files (or in-file keys) whose learning rates ``factor`` scales, found before any
    computation, and what was scaled (for the report)."""

    factor: float
    optimizer_file: Path | None = None
    scheduler_file: Path | None = None
    in_file: Path | None = None  # a single torch file holding both
    dcp_folder: Path | None = None  # a DCP folder: LRs are bytes items (dcp_lr.py)
    dcp_keys: list[str] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    verified: bool = False

    @classmethod
    def for_folder(cls, factor: float, folder: Path) -> LrScalePlan | None:
        optimizer = next((folder / n for n in OPTIMIZER_FILE_NAMES if (folder / n).is_file()), None)
        scheduler = next((folder / n for n in SCHEDULER_FILE_NAMES if (folder / n).is_file()), None)
        if optimizer is None and scheduler is None:
            return None
        plan = cls(factor, optimizer, scheduler)
        plan.before = plan._values_of(optimizer, scheduler)
        return plan

    @classmethod
    def for_dcp(cls, factor: float, folder: Path, keep_optimizer: bool) -> LrScalePlan | None:
        from pss_cli.checkpoint.formats.dcp import dcp_lr
        from pss_cli.checkpoint.formats.dcp.dcp import load_metadata

        metadata = load_metadata(folder)
        keys = [
            k
            for k in dcp_lr.lr_keys(metadata)
            if keep_optimizer or "param_groups" not in k.split(".")
        ]
        if not keys:
            return None
        plan = cls(factor, dcp_folder=folder, dcp_keys=keys)
        plan.before = dcp_lr.values(folder, metadata, keys)
        return plan

    def dcp_items(self) -> dict[Any, bytes]:
        """The scaled bytes items for dcp_writer (index -> serialised value)."""
        from pss_cli.checkpoint.formats.dcp import dcp_lr
        from pss_cli.checkpoint.formats.dcp.dcp import load_metadata

        assert self.dcp_folder is not None
        metadata = load_metadata(self.dcp_folder)
        self.keys = list(self.dcp_keys)
        return dcp_lr.scaled_items(self.dcp_folder, metadata, self.dcp_keys, self.factor)

    @classmethod
    def for_file(cls, factor: float, file: Path, obj: Any) -> LrScalePlan | None:
        optimizers, schedulers = _in_file_states(obj)
        if not optimizers and not schedulers:
            return None
        plan = cls(factor, in_file=file)
        plan.before = lr_scale.lr_values(optimizers, schedulers)
        return plan

    @staticmethod
    def _values_of(optimizer: Path | None, scheduler: Path | None) -> list[float]:
        optimizers = [_load(optimizer)] if optimizer is not None else []
        schedulers = [_load(scheduler)] if scheduler is not None else []
        return lr_scale.lr_values(optimizers, schedulers)

    def write_folder(self, staging: Path) -> None:
        """Scale the staged optimizer file (written by the optimizer policy; absent after
        ``drop``) and write the scaled scheduler file into ``staging``."""
        if self.optimizer_file is not None:
            staged = staging / self.optimizer_file.name
            if staged.is_file():
                state = _load(staged)
                self.keys += [
                    f"{staged.name}: {k}" for k in lr_scale.scale_optimizer(state, self.factor)
                ]
                _save(state, staged, self.optimizer_file)
        if self.scheduler_file is not None:
            state = _load(self.scheduler_file)
            if isinstance(state, dict):
                self.keys += [
                    f"{self.scheduler_file.name}: {k}"
                    for k in lr_scale.scale_scheduler(state, self.factor)
                ]
            _save(state, staging / self.scheduler_file.name, self.scheduler_file)

    def scale_object(self, obj: Any) -> bool:
        """Scale the optimizer and scheduler states inside a loaded torch file, in place."""
        optimizers, schedulers = _in_file_states(obj)
        for i, state in enumerate(optimizers):
            self.keys += [
                f"optimizer[{i}].{k}" for k in lr_scale.scale_optimizer(state, self.factor)
            ]
        for i, state in enumerate(schedulers):
            self.keys += [
                f"scheduler[{i}].{k}" for k in lr_scale.scale_scheduler(state, self.factor)
            ]
        return bool(optimizers or schedulers)

    def verify(self, staged: Path) -> None:
        """Re-read the staged output: every LR is the input's times the factor (a dropped
        optimizer's are gone, so only the scheduler's are compared then)."""
        expected = self.before
        if self.dcp_folder is not None:
            from pss_cli.checkpoint.formats.dcp import dcp_lr
            from pss_cli.checkpoint.formats.dcp.dcp import load_metadata

            self.after = dcp_lr.values(staged, load_metadata(staged), self.dcp_keys)
        elif self.in_file is not None:
            target = staged if staged.is_file() else staged / self.in_file.name
            optimizers, schedulers = _in_file_states(torch_file.load(target))
            self.after = lr_scale.lr_values(optimizers, schedulers)
            expected = self.before
        else:
            optimizer = (
                staged / self.optimizer_file.name if self.optimizer_file is not None else None
            )
            present = optimizer if optimizer is not None and optimizer.is_file() else None
            scheduler = (
                staged / self.scheduler_file.name if self.scheduler_file is not None else None
            )
            self.after = self._values_of(present, scheduler)
            expected = (
                self.before
                if present is not None or self.optimizer_file is None
                else self._values_of(None, self.scheduler_file)
            )
        if not lr_scale.values_match(expected, self.after, self.factor):
            raise CheckpointError(
                f"verification failed: the learning rates written under '{staged}' are not "
                f"the input's times {self.factor:g}; nothing was written",
                "this is a bug in pss; the input is untouched, report it",
            )
        self.verified = True

    def summary(self) -> dict[str, object]:
        return {
            "factor": self.factor,
            "scaled": list(self.keys),
            "before": self.before,
            "after": self.after,
            "verified": self.verified,
        }

    def note(self) -> str:
        if self.dcp_folder is not None:
            shown = ", ".join(self.dcp_keys[:3]) + (", ..." if len(self.dcp_keys) > 3 else "")
            where = f"the DCP items {shown}"
        elif self.in_file is not None:
            where = self.in_file.name
        else:
            where = ", ".join(
                p.name for p in (self.optimizer_file, self.scheduler_file) if p is not None
            )
        first = (
            f" (lr {self.before[0]:.4g} -> {self.after[0]:.4g})"
            if self.before and self.after
            else ""
        )
        return (
            f"learning rates x{self.factor:g} in {where}{first}: {len(self.keys)} stored "
            "entries scaled (a list such as base_lrs is one entry) and re-read from the output, "
            "so the trainer resumes at the scaled "
            "schedule even though it restores its optimizer and scheduler state"
        )


def _save(state: Any, dst: Path, mode_from: Path) -> None:
    """``torch.save`` into a temp file beside ``dst``, then rename (no partial file)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.pss-tmp-", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        torch.save(state, tmp)
        shutil.copymode(mode_from, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
