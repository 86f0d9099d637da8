"""Which optimizer parameter id is which tensor, for frameworks whose order is deterministic.

A torch optimizer state_dict numbers parameters 0..N-1 in the order of its param_groups, which
is the order the training code passed them; the weights file does not keep it (safetensors
sorts names). Two frameworks fix that order:

- **HF Trainer** (``Trainer.create_optimizer``): two groups, first the parameters in
  ``get_decay_parameter_names(model)`` (not in a ``nn.LayerNorm``, name without ``bias``/
  ``layernorm``/``rmsnorm``/``norm``), then the others, each in ``model.named_parameters()``
  order, trainable only. The order needs the model's module tree: it is rebuilt from the
  checkpoint's ``config.json`` on the meta device (no weights, no download, no remote code)
  with the installed transformers, and the grouping is transformers' own function.
- **Lightning** (``configure_optimizers`` returning ``optimizer(self.parameters())``): one
  group in the module's parameter order, which is the ``state_dict`` order of the ``.ckpt``
  (buffers aside).

Every candidate mapping is checked against the optimizer state itself: as many ids as
parameters in each group, and every ``exp_avg`` shaped like its parameter. A mapping that fails
the check is not used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pss_cli.checkpoint.model import TensorEntry
from pss_cli.quiet import quiet_transformers

# Float buffers that nn modules register (never parameters, so never in the optimizer).
_BUFFER_NAMES = re.compile(
    r"(^|\.)(running_mean|running_var|num_batches_tracked|position_ids|inv_freq|masked_bias)$"
)
# transformers' rule, used only when the installed version has no get_decay_parameter_names.
_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def _group_ids(state_dict: dict[str, Any]) -> list[list[int]] | None:
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list):
        return None
    out: list[list[int]] = []
    for group in groups:
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(isinstance(p, int) for p in params):
            return None
        out.append(list(params))
    return out


def _consistent(
    names_by_group: list[list[str]],
    ids_by_group: list[list[int]],
    shapes: dict[str, tuple[int, ...]],
    state: dict[Any, Any],
) -> dict[str, int] | None:
    """name -> id when every group has as many names as ids and every stepped parameter's
    exp_avg has its tensor's shape; else None."""
    if len(names_by_group) != len(ids_by_group):
        return None
    mapping: dict[str, int] = {}
    for names, ids in zip(names_by_group, ids_by_group, strict=True):
        if len(names) != len(ids):
            return None
        for name, pid in zip(names, ids, strict=True):
            moment = state.get(pid, {}).get("exp_avg") if isinstance(state.get(pid), dict) else None
            if isinstance(moment, torch.Tensor) and tuple(moment.shape) != shapes.get(name):
                return None
            mapping[name] = pid
    return mapping


def trainer_mapping(
    folder: Path, state_dict: dict[str, Any], entries: Sequence[TensorEntry]
) -> dict[str, int] | None:
    """HF Trainer's name -> id map for ``folder`` (a checkpoint-N/ with config.json), or None
    when transformers is missing, the architecture unknown, or the check fails."""
    config_file = folder / "config.json"
    ids = _group_ids(state_dict)
    if not config_file.is_file() or ids is None:
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        architecture = config["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    named = _meta_model_parameters(folder, str(architecture))
    if named is None:
        return None
    names, decay = named
    shapes = {e.name: e.shape for e in entries}
    if not all(n in shapes for n in names):
        return None
    if len(ids) == 2:
        grouped = [[n for n in names if n in decay], [n for n in names if n not in decay]]
    else:
        grouped = [names]
    return _consistent(grouped, ids, shapes, state_dict["state"])


def _meta_model_parameters(folder: Path, architecture: str) -> tuple[list[str], set[str]] | None:
    """(trainable parameter names in named_parameters() order, Trainer's decay names) of the
    model class named by config.json, built on the meta device; None when not possible."""
    try:
        import transformers
    except ImportError:
        return None
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        return None
    # transformers warns about configs (e.g. "bos_token_id must be None or an integer within
    # the vocabulary") through its logger: pss keeps its streams clean (pss_cli/quiet.py).
    try:
        with quiet_transformers(transformers):
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
            with torch.device("meta"):
                model = model_class(config)
    except Exception:
        return None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    get_decay = getattr(transformers.Trainer, "get_decay_parameter_names", None)
    try:
        decay = set(get_decay(None, model)) if get_decay is not None else None
    except Exception:
        decay = None
    if decay is None:
        from transformers import trainer_pt_utils

        get_names: Any = trainer_pt_utils.get_parameter_names
        decay = set(get_names(model, [torch.nn.LayerNorm], list(_NO_DECAY_PATTERNS)))
    return names, decay


def module_order_mapping(
    state_dict: dict[str, Any], entries: Sequence[TensorEntry]
) -> dict[str, int] | None:
    """Lightning's (and any ``optimizer(model.parameters())``) name -> id map: one group, ids in
    the module's parameter order, which is the file's state_dict order without buffers."""
    ids = _group_ids(state_dict)
    if ids is None or len(ids) != 1:
        return None
    floats = [
        e.name
        for e in entries
        if e.dtype in ("F64", "F32", "F16", "BF16") and not _BUFFER_NAMES.search(e.name)
    ]
    return _consistent([floats], ids, {e.name: e.shape for e in entries}, state_dict["state"])
