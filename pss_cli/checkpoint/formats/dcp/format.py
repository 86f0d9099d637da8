"""PyTorch Distributed Checkpoint: a folder with ``.metadata`` + ``*.distcp`` (FSDP, torchtitan,
OLMo-core, Megatron-Core torch_dist). Its optimizer state and learning rates are keys of the same
folder (dcp_writer.py, dcp_lr.py). Torch-free at import: torch.distributed loads on first use."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pss_cli.checkpoint.formats.protocol import TensorBackend, WriteRequest, WriteResult
from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.checkpoint.names import DCP_METADATA_NAME as METADATA_NAME
from pss_cli.checkpoint.names import DISTCP_SUFFIX
from pss_cli.errors import CorruptCheckpointError

if TYPE_CHECKING:
    from pss_cli.checkpoint.lr_files import LrScalePlan


class DcpKind(StrEnum):
    # .metadata + *.distcp (FSDP, torchtitan, OLMo-core, Megatron-Core torch_dist); entries are
    # the model weights only, named by FQN
    FOLDER = "dcp"


class DcpFormat:
    name = "dcp"
    title = "DCP"
    kinds: frozenset[str] = frozenset(DcpKind)
    file_suffixes: tuple[str, ...] = ()  # always a folder: OUT naming any weights file is refused

    def open_file(self, path: Path) -> CheckpointLayout | None:
        name = path.name
        if not (name == METADATA_NAME or name.endswith(DISTCP_SUFFIX)):
            return None
        if name.endswith(DISTCP_SUFFIX) and not (path.parent / METADATA_NAME).is_file():
            raise CorruptCheckpointError(
                f"'{path}' is one file of a PyTorch Distributed Checkpoint, and its folder "
                f"has no '{METADATA_NAME}'",
                hint="pass the whole DCP folder, with its .metadata and every .distcp file",
            )
        return _open_dcp(path.parent)

    def open_folder(self, folder: Path, children: list[Path]) -> CheckpointLayout | None:
        if any(p.name == METADATA_NAME or p.name.endswith(DISTCP_SUFFIX) for p in children):
            return _open_dcp(folder)
        return None

    def backend(self, layout: CheckpointLayout) -> TensorBackend | None:
        from pss_cli.checkpoint.formats.dcp.storage import DcpBackend

        return DcpBackend(layout)

    def digests(self, layout: CheckpointLayout, names: set[str] | None) -> dict[str, str]:
        """Of the tensor's stored chunk items (verbatim copies hash alike)."""
        from pss_cli.checkpoint.formats.dcp.dcp import chunk_indexes, load_metadata
        from pss_cli.checkpoint.formats.dcp.storage import read_item_bytes

        metadata = load_metadata(layout.root)
        digests: dict[str, str] = {}
        for entry in layout.entries:
            if names is not None and entry.name not in names:
                continue
            key = str(entry.key[0])
            storage = metadata.state_dict_metadata[key]
            digest = hashlib.sha256()
            for index in chunk_indexes(key, storage):  # type: ignore[arg-type]
                for piece in read_item_bytes(layout.root, metadata.storage_data[index]):
                    digest.update(piece)
            digests[entry.name] = digest.hexdigest()
        return digests

    def check_output(self, layout: CheckpointLayout, out: Path) -> None:
        return None  # the common checks (out_checks.check_output_path) cover it

    def optimizer_file(self, layout: CheckpointLayout) -> Path | None:
        return None  # DCP keeps its optimizer state inside the folder's own keys (dcp_writer.py)

    def lr_plan(
        self, layout: CheckpointLayout, factor: float, keep_optimizer: bool
    ) -> LrScalePlan | None:
        from pss_cli.checkpoint.lr_files import LrScalePlan

        return LrScalePlan.for_dcp(factor, layout.root, keep_optimizer=keep_optimizer)

    def write(self, request: WriteRequest) -> WriteResult:
        from pss_cli.checkpoint.formats.dcp.dcp_writer import write_dcp_checkpoint

        written, outcome = write_dcp_checkpoint(
            request.layout,
            request.out,
            request.replacements,
            request.provenance,
            request.optimizer_policy,
            force=request.force,
            before_commit=request.before_commit,
            lr_items=request.lr_plan.dcp_items() if request.lr_plan is not None else None,
        )
        return WriteResult(written, (outcome,))


def _open_dcp(folder: Path) -> CheckpointLayout:
    from pss_cli.checkpoint.formats.dcp.dcp import open_dcp  # imports torch.distributed

    return open_dcp(folder)
