"""File names and suffixes of the non-safetensors formats (torch-free, for discovery)."""

from __future__ import annotations

import os
import re
from pathlib import Path

# PyTorch Distributed Checkpoint (DCP): one .metadata pickle + *.distcp storage files.
DCP_METADATA_NAME = ".metadata"
DISTCP_SUFFIX = ".distcp"
# torch.save pickles; ``.ckpt`` is PyTorch Lightning's (a dict with ``state_dict``,
# ``optimizer_states``, ``lr_schedulers``, ``global_step``, ...), read the same safe way.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# timm's `checkpoint-N.pth.tar` / `model_best.pth.tar`: torch.save files under a double suffix.
TORCH_TAR_SUFFIXES = (".pth.tar", ".pt.tar")


def is_torch_file_name(path: Path) -> bool:
    """A name torch.save files go by: a torch suffix, or timm's `.pth.tar`."""
    return path.suffix.lower() in TORCH_SUFFIXES or path.name.lower().endswith(TORCH_TAR_SUFFIXES)


LIGHTNING_SUFFIX = ".ckpt"
TORCH_INDEX_SUFFIX = ".bin.index.json"  # pytorch_model.bin.index.json (HF sharded .bin)
TORCH_DEFAULT_INDEX_NAME = "pytorch_model.bin.index.json"
# Files of a training folder that are not model weights (HF Trainer, Accelerate, DeepSpeed).
NON_MODEL_FILES = re.compile(
    r"^(optimizer|scheduler|scaler|training_args|rng_state.*|random_states.*|.*optim_states"
    r"|.*model_states|bf16_zero_.*|zero_pp_.*)\.(pt|bin|pth)$"
)
# Sidecar with pss's provenance for formats that have no metadata field for it.
PROVENANCE_NAME = "pss-provenance.json"


# Opt-in (`--allow-pickle-types`, or PSS_ALLOW_PICKLE_TYPES=1): let torch's weights_only loader
# also build a few plain-data classes that training scripts put into checkpoints as
# hyperparameters. None of them runs code when built: a path, a namespace of attributes.
ALLOW_PICKLE_TYPES_ENV = "PSS_ALLOW_PICKLE_TYPES"
HARMLESS_PICKLE_TYPES = (
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
    "pathlib.Path",
    "argparse.Namespace",
)
_allow_pickle_types = [False]


def set_allow_pickle_types(enabled: bool) -> None:
    """Process-wide switch for the allow-list above (set once by the command line)."""
    _allow_pickle_types[0] = enabled


def allow_pickle_types() -> bool:
    return _allow_pickle_types[0] or os.environ.get(ALLOW_PICKLE_TYPES_ENV, "") in ("1", "true")


def is_torch_file(path: Path) -> bool:
    return path.suffix.lower() in TORCH_SUFFIXES


def is_model_file(path: Path) -> bool:
    """A .pt/.bin/.pth file that may hold model weights (not optimizer.pt, rng_state.pth...)."""
    return is_torch_file(path) and NON_MODEL_FILES.match(path.name) is None


def provenance_sidecar(out: Path) -> Path:
    """Where the provenance of a written output lives: inside a folder output, or beside a
    single-file output as ``<name>.pss-provenance.json``."""
    if is_torch_file_name(out):
        return out.with_name(f"{out.name}.{PROVENANCE_NAME}")
    return out / PROVENANCE_NAME
