"""The one protocol a checkpoint format implements (docs/ARCHITECTURE.md, "Adding a checkpoint
format"). Torch-free: the formats import torch inside their methods, so discovery and
``pss --help`` stay light."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pss_cli.checkpoint.model import CheckpointLayout, TensorEntry

if TYPE_CHECKING:
    import torch

    from pss_cli.checkpoint.lr_files import LrScalePlan
    from pss_cli.checkpoint.optimizer import OptimizerOutcome
    from pss_cli.config import OptimizerPolicy


class TensorBackend(Protocol):
    """How TensorReader reads a format whose tensors are not safetensors byte ranges."""

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor ``entry`` describes, in its stored dtype and shape."""
        ...

    def release(self) -> None:
        """Drop cached files or mappings (tensors already returned stay valid)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class WriteRequest:
    """What repair hands a format's ``write``: the repaired copy of ``layout`` goes to ``out``."""

    layout: CheckpointLayout
    out: Path
    replacements: Mapping[str, torch.Tensor]  # tensor name -> new tensor, stored shape and dtype
    provenance: Mapping[str, str]  # pss.version, pss.method, ... (metadata or sidecar)
    force: bool
    optimizer_policy: OptimizerPolicy
    lr_plan: LrScalePlan | None
    # (input_folder, staging_folder): rewrite the optimizer and LR files of a folder output
    extra_files: Callable[[Path, Path], None]
    skip_copy: Callable[[Path], bool]  # input files that extra_files writes instead
    # (file, loaded_object) -> changed?: optimizer and LR state inside a torch pickle
    edit_object: Callable[[Path, Any], bool]
    # verification of the complete staged output; raising there publishes nothing
    before_commit: Callable[[Path], None]


@dataclass(frozen=True)
class WriteResult:
    out: Path
    # optimizer outcomes the format produced itself (the others arrive via the callbacks)
    optimizer_outcomes: tuple[OptimizerOutcome, ...] = ()


class CheckpointFormat(Protocol):
    """One on-disk checkpoint format: detection, reading, writing and its training state."""

    name: str
    title: str  # for messages: "safetensors", "DCP", "PyTorch"
    # The `CheckpointLayout.kind` values of the layouts this format opens: names unique across
    # formats (the format's own StrEnum), which `registry.format_of` maps back to the format.
    kinds: frozenset[str]
    # Suffixes of the one-file layouts this format writes (".safetensors"): an OUT that ends in
    # one is a file, which only a one-file input of this same format can become
    # (out_checks.check_output_path). Empty for a format that is always a folder.
    file_suffixes: tuple[str, ...]

    def open_file(self, path: Path) -> CheckpointLayout | None:
        """The validated layout of the regular file ``path``, or None when it is not this
        format's (detection by name: discovery asks the formats in registry order)."""
        ...

    def open_folder(self, folder: Path, children: list[Path]) -> CheckpointLayout | None:
        """The same for a folder (``children``: its regular files, sorted)."""
        ...

    def backend(self, layout: CheckpointLayout) -> TensorBackend | None:
        """TensorReader's source of tensors; None: read as safetensors byte ranges."""
        ...

    def digests(self, layout: CheckpointLayout, names: set[str] | None) -> dict[str, str]:
        """sha256 per tensor (all, or those in ``names``) proving untouched tensors identical."""
        ...

    def check_output(self, layout: CheckpointLayout, out: Path) -> None:
        """Format-specific refusals about OUT (after the common ones), before any work."""
        ...

    def optimizer_file(self, layout: CheckpointLayout) -> Path | None:
        """A separate optimizer-state file the repair rewrites (HF Trainer optimizer.pt)."""
        ...

    def lr_plan(
        self, layout: CheckpointLayout, factor: float, keep_optimizer: bool
    ) -> LrScalePlan | None:
        """What ``--lr-scale factor`` scales in this checkpoint; None when nothing."""
        ...

    def write(self, request: WriteRequest) -> WriteResult:
        """Write the repaired copy, staged, verified (``request.before_commit``), published."""
        ...
