"""Write the repaired checkpoint in the input's format, verified while staged, then published."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from pss_cli import __version__
from pss_cli.checkpoint.formats.protocol import WriteRequest
from pss_cli.checkpoint.formats.registry import format_of
from pss_cli.checkpoint.lr_files import LrScalePlan
from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.optimizer import OptimizerOutcome, rewrite_optimizer_state
from pss_cli.checkpoint.optimizer_in_file import apply_in_file
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.config import OptimizerPolicy
from pss_cli.repair.model import Change, SmoothConfig
from pss_cli.repair.report import parameters_text
from pss_cli.repair.verify import verify_or_raise
from pss_cli.results import LayerResult


class LazyReplacements(Mapping[str, torch.Tensor]):
    """Replacement tensors formed on access from the stored tensor and its rank-k updates.

    Nothing is cached: the writer reads each once to check it and once to write it, and memory
    never holds more than one repaired tensor (a whole-model `--all` stays bounded).
    """

    def __init__(self, layout: CheckpointLayout, changes: list[Change]) -> None:
        self._layout = layout
        self._by_tensor: dict[str, list[Change]] = {}
        for change in changes:
            self._by_tensor.setdefault(change.plan.entry.name, []).append(change)

    def __getitem__(self, name: str) -> torch.Tensor:
        group = self._by_tensor[name]
        entry = group[0].plan.entry
        m, n = group[0].plan.layer.matrix_shape
        with TensorReader(self._layout) as reader:
            tensor = reader.read(entry).clone().reshape(-1, m, n)
        for change in group:
            index = change.plan.layer.index
            slot = index if index is not None else 0
            tensor[slot] = change.apply(tensor[slot])
        return tensor.reshape(entry.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_tensor)

    def __len__(self) -> int:
        return len(self._by_tensor)


Measured = dict[tuple[str, int | None], LayerResult]


class OutputWriter:
    """Writes the repaired checkpoint in the input's format. The staged output is verified
    (`verify_or_raise`) before it is renamed into place: a checkpoint that fails its own
    verification never appears where a trainer could resume from it, and with --force the
    previous output stays until the new one has passed."""

    def __init__(
        self,
        layout: CheckpointLayout,
        changes: list[Change],
        config: SmoothConfig,
        lr_plan: LrScalePlan | None,
    ) -> None:
        self.layout = layout
        self.changes = changes
        self.config = config
        self.lr_plan = lr_plan
        self.replacements = LazyReplacements(layout, changes)
        self.modified_names = sorted(self.replacements)
        self.optimizer_file = format_of(layout.kind).optimizer_file(layout)
        self.scheduler_file = lr_plan.scheduler_file if lr_plan is not None else None
        self.left_out = stale_weight_files(layout)
        self.optimizer_outcomes: list[OptimizerOutcome] = []
        self.verification: list[tuple[int, Measured]] = []

    def write(self, out: Path) -> tuple[Path, int, Measured]:
        """(the output written, untouched tensors verified, changed matrices re-measured)."""
        result = format_of(self.layout.kind).write(
            WriteRequest(
                layout=self.layout,
                out=out,
                replacements=self.replacements,
                provenance=self._provenance(),
                force=self.config.force,
                optimizer_policy=self.config.optimizer_state,
                lr_plan=self.lr_plan,
                extra_files=self._extra_files,
                skip_copy=self._skip_copy,
                edit_object=self._edit_in_file_optimizer,
                before_commit=self._verify_staged,
            )
        )
        self.optimizer_outcomes.extend(result.optimizer_outcomes)
        verified_untouched, after = self.verification[-1]
        return result.out, verified_untouched, after

    def _provenance(self) -> dict[str, str]:
        return {
            "pss.version": __version__,
            "pss.command": "smooth",
            "pss.method": str(self.config.params.method),
            "pss.parameters": parameters_text(self.config),
            "pss.modified_tensors": ",".join(self.modified_names),
        }

    def _extra_files(self, _input_root: Path, staging: Path) -> None:
        """The optimizer and LR files of a folder output, rewritten into the staging folder."""
        if self.optimizer_file is not None:
            self.optimizer_outcomes.append(
                rewrite_optimizer_state(
                    self.optimizer_file,
                    staging / self.optimizer_file.name,
                    self.config.optimizer_state,
                    self.layout.entries,
                    self.modified_names,
                )
            )
        if self.lr_plan is not None:
            self.lr_plan.write_folder(staging)

    def _skip_copy(self, path: Path) -> bool:
        return path in (self.optimizer_file, self.scheduler_file) or path in self.left_out

    def _edit_in_file_optimizer(self, file: Path, obj: object) -> bool:
        """{"model": ..., "optimizer": ...} in one .pt: the same policy as optimizer.pt."""
        outcome = apply_in_file(
            obj, file, self.config.optimizer_state, self.layout.entries, self.modified_names
        )
        scaled = self.lr_plan.scale_object(obj) if self.lr_plan is not None else False
        if outcome is None:
            return scaled
        self.optimizer_outcomes.append(outcome)
        return scaled or (
            outcome.policy is not OptimizerPolicy.KEEP
            and (
                outcome.policy is OptimizerPolicy.DROP
                or bool(outcome.reset_param_ids or outcome.reset_names)
            )
        )

    def _verify_staged(self, staged: Path) -> None:
        self.verification.append(verify_or_raise(self.layout, staged, self.changes, self.config))
        if self.lr_plan is not None:
            self.lr_plan.verify(staged)


# transformers' torch twin of model.safetensors (single or sharded): the same weights, saved
# before safetensors became the default, or beside it. Other torch files beside safetensors
# (a PEFT adapter_model.bin, a custom .pt) may be different weights: copied, with a note.
_TORCH_TWIN = re.compile(r"pytorch_model(?:-\d+-of-\d+)?\.bin(?:\.index\.json)?")


def stale_weight_files(layout: CheckpointLayout) -> tuple[Path, ...]:
    """transformers' pytorch_model*.bin (and its index) beside the safetensors weights that pss
    reads and repairs: left out of the output.

    Copied unchanged, they put the collapsed weights back beside the repaired ones: a loader
    that prefers them (transformers' from_pretrained(use_safetensors=False)) resumed from the
    weights the repair was for, and nothing said so.
    """
    beside = [p for p in layout.unindexed_files if p.suffix != ".safetensors"]
    if not beside:
        return ()
    folder = beside[0].parent
    twins = [p for p in beside if _TORCH_TWIN.fullmatch(p.name)]
    index = folder / "pytorch_model.bin.index.json"
    if twins and index.is_file():
        twins.append(index)
    return tuple(twins)


def copied_weight_files(layout: CheckpointLayout, left_out: tuple[Path, ...]) -> tuple[Path, ...]:
    """Other torch weight files beside the safetensors ones (all but `left_out`, the
    `stale_weight_files`): copied unchanged, never read."""
    return tuple(
        p for p in layout.unindexed_files if p.suffix != ".safetensors" and p not in left_out
    )


def stale_weight_note(path: Path) -> str:
    return (
        f"left out {path.name}: transformers' torch copy of the weights repaired here in "
        "safetensors; copied unchanged it would keep the collapsed weights in the output (a "
        "loader that prefers it, e.g. from_pretrained(use_safetensors=False), would read them)"
    )


def copied_weight_note(path: Path) -> str:
    return (
        f"copied {path.name} unchanged: torch weights beside the safetensors ones, which pss "
        "neither reads nor repairs (an adapter, or another copy of the weights?)"
    )
