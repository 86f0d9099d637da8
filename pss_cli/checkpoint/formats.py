"""File names and suffixes of the non-safetensors formats (torch-free, for discovery)."""

from __future__ import annotations

import re
from pathlib import Path

# PyTorch Distributed Checkpoint (DCP): one .metadata pickle + *.distcp storage files.
DCP_METADATA_NAME = ".metadata"
DISTCP_SUFFIX = ".distcp"
# torch.save pickles.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
TORCH_INDEX_SUFFIX = ".bin.index.json"  # pytorch_model.bin.index.json (HF sharded .bin)
TORCH_DEFAULT_INDEX_NAME = "pytorch_model.bin.index.json"
# Files of a training folder that are not model weights (HF Trainer, Accelerate, DeepSpeed).
NON_MODEL_FILES = re.compile(
    r"^(optimizer|scheduler|scaler|training_args|rng_state.*|random_states.*|.*optim_states"
    r"|.*model_states|bf16_zero_.*|zero_pp_.*)\.(pt|bin|pth)$"
)
# Sidecar with pss's provenance for formats that have no metadata field for it.
PROVENANCE_NAME = "pss-provenance.json"


def is_torch_file(path: Path) -> bool:
    return path.suffix.lower() in TORCH_SUFFIXES


def is_model_file(path: Path) -> bool:
    """A .pt/.bin/.pth file that may hold model weights (not optimizer.pt, rng_state.pth...)."""
    return is_torch_file(path) and NON_MODEL_FILES.match(path.name) is None


def provenance_sidecar(out: Path) -> Path:
    """Where the provenance of a written output lives: inside a folder output, or beside a
    single-file output as ``<name>.pss-provenance.json``."""
    if out.suffix.lower() in TORCH_SUFFIXES:
        return out.with_name(f"{out.name}.{PROVENANCE_NAME}")
    return out / PROVENANCE_NAME
