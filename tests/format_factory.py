"""Real DCP folders and torch.save files with known spectra, for the format tests.

DCP folders are written by torch's own writer (``dcp.save(..., no_dist=True)``), except the
multi-rank layout, which needs a process group to produce: ``save_dcp_chunked`` writes it by hand
in exactly the form a 2-rank FSDP save has (one ``__<rank>_0.distcp`` per rank, each tensor split
row-wise into chunks, one ``torch.save`` per chunk, a pickled Metadata), and the tests check
that torch's own reader loads it.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from pss_cli.config import ScanConfig
from pss_cli.pipeline import scan_checkpoint
from tests.spectra_factory import power_law, spiky, with_spectrum

COLLAPSED = "model.layers.0.mlp.down_proj.weight"
HEALTHY = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight")


def model_state(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF-style names: two healthy matrices, one collapsed (a spike 8x the bulk), a norm, an
    embedding and an int buffer."""
    state = {
        "model.embed_tokens.weight": with_spectrum(50, 24, power_law(24, 1.2), seed=3),
        HEALTHY[0]: with_spectrum(64, 24, power_law(24, 0.3), seed=1),
        HEALTHY[1]: with_spectrum(24, 24, power_law(24, 0.2), seed=4),
        COLLAPSED: with_spectrum(24, 64, spiky(24, (8.0,)), seed=2),
        "model.layers.0.input_layernorm.weight": torch.ones(24, dtype=torch.float64),
    }
    out = {k: v.to(dtype) for k, v in state.items()}
    out["model.position_ids"] = torch.arange(12, dtype=torch.int64)
    return out


def adam_state(model: dict[str, torch.Tensor], step: float = 7.0) -> dict[str, Any]:
    """An FQN-keyed AdamW state dict, as torch.distributed.checkpoint.state_dict produces it."""
    generator = torch.Generator().manual_seed(11)
    state: dict[str, Any] = {}
    for name, tensor in model.items():
        if not tensor.is_floating_point():
            continue
        state[name] = {
            "step": torch.tensor(step),
            "exp_avg": torch.randn(tensor.shape, generator=generator).to(tensor.dtype),
            "exp_avg_sq": torch.rand(tensor.shape, generator=generator).to(tensor.dtype),
        }
    groups = [{"lr": 1e-3, "betas": (0.9, 0.95), "params": sorted(state)}]
    return {"state": state, "param_groups": groups}


def save_dcp(folder: Path, state_dict: dict[str, Any]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state_dict, checkpoint_id=str(folder), no_dist=True)
    return folder


def load_dcp(folder: Path, template: dict[str, Any]) -> dict[str, Any]:
    """Load ``folder`` into a copy of ``template`` (tensors zeroed) with torch's own reader."""
    target = _zeroed(template)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=str(folder), no_dist=True)
    return target


def _zeroed(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, dict):
        return {k: _zeroed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_zeroed(v) for v in value]
    return value


def save_dcp_chunked(
    folder: Path,
    model: dict[str, torch.Tensor],
    ranks: int = 2,
    whole: frozenset[str] = frozenset(),
) -> Path:
    """A multi-rank DCP folder (keys ``model.<fqn>``): each >= 1-D tensor split along dim 0
    across ``ranks`` files, as FSDP's Shard(0) saves it; tensors named in ``whole`` are kept
    in one piece in rank 0's file (a replicated tensor saved once)."""
    folder.mkdir()
    state_md: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    planner: dict[str, tuple[str, ...]] = {}
    files = [io.BytesIO() for _ in range(ranks)]
    for fqn, tensor in model.items():
        key = f"model.{fqn}"
        planner[key] = ("model", fqn)
        rows = tensor.shape[0]
        bounds = [rows * r // ranks for r in range(ranks + 1)]
        if fqn in whole:
            bounds = [0] + [rows] * ranks
        chunks = []
        for rank in range(ranks):
            start, stop = bounds[rank], bounds[rank + 1]
            if stop == start:
                continue
            offsets = torch.Size([start] + [0] * (tensor.dim() - 1))
            piece = tensor[start:stop].clone()
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=piece.shape))
            stream = files[rank]
            begin = stream.tell()
            torch.save(piece, stream)
            storage[MetadataIndex(key, offsets)] = _StorageInfo(
                f"__{rank}_0.distcp", begin, stream.tell() - begin
            )
        state_md[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=tensor.dtype), size=tensor.shape, chunks=chunks
        )
    for rank, stream in enumerate(files):
        (folder / f"__{rank}_0.distcp").write_bytes(stream.getvalue())
    metadata = Metadata(state_dict_metadata=state_md, planner_data=planner, storage_data=storage)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return folder


class _RunsCode:
    """Unpickling this runs ``touch marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


def hostile_torch_file(path: Path, marker: Path, variant: str) -> Path:
    """A .pt/.bin whose pickle runs code when loaded without weights_only.

    variant: "reduce" (torch.save zip with a __reduce__ object beside real weights), "global"
    (a raw pickle GLOBAL posix.system, no torch at all), "legacy" (torch.save legacy non-zip
    format with the __reduce__ object).
    """
    weights = {"layer.weight": torch.randn(8, 8), "evil": _RunsCode(marker)}
    if variant == "reduce":
        torch.save(weights, path)
    elif variant == "legacy":
        torch.save(weights, path, _use_new_zipfile_serialization=False)
    elif variant == "global":
        command = f"touch '{marker}'".encode()
        # PROTO 2, GLOBAL 'posix system', SHORT_BINSTRING cmd, TUPLE1, REDUCE, STOP
        payload = b"\x80\x02cposix\nsystem\nU" + bytes([len(command)]) + command + b"\x85R."
        path.write_bytes(payload)
    else:
        raise ValueError(variant)
    return path


def stable_ranks(path: Path) -> dict[str, tuple[float | None, float | None]]:
    """(stable rank, sigma_max) per matrix of a scan with seed 5, for format comparisons."""
    report = scan_checkpoint(path, ScanConfig(seed=5))
    return {x.display_name: (x.stable_rank, x.sigma_max) for x in report.layers}


def safetensors_reference(tmp_path: Path, model: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`stable_ranks` of `model` saved as safetensors: what every other format must match."""
    path = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in model.items()}, str(path))
    return stable_ranks(path)


def flip_bytes_in_largest_record(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of the largest record of a zip `.pt` (its CRC no
    longer matches; torch.load itself does not notice)."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
        start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra)
    data = bytearray(path.read_bytes())
    middle = start + record.file_size // 2
    data[middle : middle + count] = bytes(255 - b for b in data[middle : middle + count])
    path.write_bytes(bytes(data))
