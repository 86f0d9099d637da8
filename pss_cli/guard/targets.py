"""Which parameters the guard watches, as matrices, and the checks made at construction.

Every trainable 2-D weight is a candidate; roles come from `pss_cli.checkpoint.selection.classify`
(the same table `pss scan` uses), and `nn.Embedding` modules are embeddings whatever their name.
Embeddings and the LM head are excluded by default (GuardConfig.exclude_roles), as in the paper's
code and `pss smooth`; 1-D tensors (norm scales, biases) are never matrices.

Fused Q/K/V is seen as three matrices only where the layout is unambiguous:
- `nn.MultiheadAttention.in_proj_weight` (3d, d): rows [q; k; v] (dim 0);
- transformers `Conv1D` named c_attn, weight (d, 3d) stored (in, out): columns [q | k | v] (dim 1);
- an `nn.Linear` named c_attn / qkv / qkv_proj / Wqkv with out == 3 x in (nanoGPT, timm): [q; k; v]
  rows (dim 0).
Never GPT-NeoX/Falcon `query_key_value`, which interleaves q, k, v per head, nor a grouped-query
qkv_proj whose parts differ in size: those stay one matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pss_cli.checkpoint.selection import Role, classify
from pss_cli.errors import GuardConfigError

QKV_PARTS = ("q", "k", "v")
_LINEAR_QKV_NAMES = frozenset({"c_attn", "qkv", "qkv_proj", "Wqkv"})


@dataclass(frozen=True, eq=False)
class MatrixSpec:
    """One monitored matrix: a whole 2-D parameter, or one of its Q/K/V parts."""

    name: str  # "h.0.attn.c_attn.weight[q]" for a part, else the parameter name
    param_name: str
    param: nn.Parameter
    role: str
    split_dim: int | None = None  # None: the whole parameter
    part: int = 0
    shape: tuple[int, int] = (0, 0)  # (m, n) of the matrix seen

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The matrix inside `tensor` (the parameter's full value, or its grad): a view."""
        if self.split_dim is None:
            return tensor
        return tensor.chunk(3, dim=self.split_dim)[self.part]

    @property
    def short_side(self) -> int:
        return min(self.shape)


def is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: `full_tensor()` (a collective) for a DTensor, else itself."""
    if is_dtensor(tensor):
        return tensor.full_tensor()  # type: ignore[attr-defined,no-any-return]
    return tensor


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named trainable parameters (shared ones once), after the construction checks."""
    if not isinstance(model, nn.Module):
        raise GuardConfigError(
            f"Guard needs a torch.nn.Module, got {type(model).__name__}",
            "pass the model whose parameters the optimizer updates",
        )
    _refuse_fsdp1(model)
    named = list(model.named_parameters())
    for name, p in named:
        if p.device.type == "meta":
            raise GuardConfigError(
                f"parameter '{name}' is on the meta device (no values yet)",
                "create the Guard after the model is materialised (to_empty + init, or "
                "load_state_dict(assign=True))",
            )
        _check_sharding(name, p)
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        raise GuardConfigError(
            f"{type(model).__name__} has no trainable parameter (all requires_grad=False)",
            "create the Guard for the model you train",
        )
    return trainable


_FSDP1_HINT = (
    "use FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor parameters the guard "
    "monitors one matrix at a time"
)


def _refuse_fsdp1(model: nn.Module) -> None:
    """FSDP1 (FullyShardedDataParallel) keeps each rank's part of the weights as 1-D slices of
    a flat buffer outside forward, with use_orig_params=True too: no matrix to monitor, and a
    gradient norm the guard would count as replicated."""
    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            where = f"'{name}'" if name else type(model).__name__
            raise GuardConfigError(
                f"{where} is wrapped in FSDP1 (FullyShardedDataParallel): its parameters are "
                "1-D slices of flat shards, not matrices (with use_orig_params=True too)",
                _FSDP1_HINT,
            )


def _check_sharding(name: str, p: torch.Tensor) -> None:
    if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
        raise GuardConfigError(
            f"parameter '{name}' is an FSDP1 flat parameter (several weights in one shard)",
            _FSDP1_HINT,
        )
    if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
        raise GuardConfigError(
            f"parameter '{name}' is partitioned by DeepSpeed ZeRO",
            "DeepSpeed steps inside its engine, before any hook could skip: the guard cannot act "
            "there; watch the run with `pss trend` on its checkpoints (docs/GUARD.md, DeepSpeed)",
        )
    if is_dtensor(p):
        placements = p.placements  # type: ignore[attr-defined]
        if any(pl.is_partial() for pl in placements):
            raise GuardConfigError(
                f"parameter '{name}' is a DTensor with a Partial placement ({placements})",
                "the guard supports Shard and Replicate placements (FSDP2, tensor parallel)",
            )


def check_optimizer_holds(
    trainable: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer
) -> None:
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not callable(getattr(optimizer, "step", None)):
        raise GuardConfigError(
            f"Guard needs a torch optimizer, got {type(optimizer).__name__}",
            "pass the optimizer that updates the model (torch.optim.AdamW, ...)",
        )
    inner: object = optimizer
    while not isinstance(inner, torch.optim.LBFGS) and isinstance(
        getattr(inner, "optimizer", None), torch.optim.Optimizer
    ):
        inner = inner.optimizer  # type: ignore[attr-defined]  # a wrapper (ClipThenStep)
    if isinstance(inner, torch.optim.LBFGS):
        raise GuardConfigError(
            "Guard cannot step LBFGS: it re-evaluates the loss through its closure several "
            "times per step, while the guard decides on the gradients of one backward pass",
            "use a first-order optimizer (AdamW, SGD, ...) with the guard",
        )
    held = {id(p) for group in groups for p in group["params"]}
    missing = [name for name, p in trainable if id(p) not in held]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GuardConfigError(
            f"the optimizer does not hold the trainable parameter '{missing[0]}'{more}",
            "build the optimizer from model.parameters() after wrapping the model, or freeze "
            "what it should not train (requires_grad_(False)); with several optimizers that "
            "each train a part of the model (a GAN), guard each one with its part: "
            "Guard(part, optimizer), or in Lightning guarded_optimizers(..., model=part)",
        )


def monitored_matrices(
    model: nn.Module,
    trainable: list[tuple[str, nn.Parameter]],
    exclude_roles: tuple[str, ...],
    split_fused_qkv: bool,
    allow_empty: bool = False,
) -> list[MatrixSpec]:
    """The matrices the monitor and `smooth` see, in parameter order.

    allow_empty: return [] instead of refusing (the guard's refresh after a freeze; and a model
    whose eligible matrices are all frozen for now, as progressive unfreezing starts).
    """
    embedding_params = _embedding_params(model)
    modules = dict(model.named_modules())
    specs: list[MatrixSpec] = []
    for name, p in trainable:
        if p.ndim != 2:
            continue
        role_name = _role(name, p, embedding_params)
        if role_name in exclude_roles:
            continue
        m, n = p.shape
        split = _qkv_split(name, modules, (m, n)) if split_fused_qkv else None
        if split is None:
            specs.append(MatrixSpec(name, name, p, role_name, None, 0, (m, n)))
            continue
        part_shape = (m // 3, n) if split == 0 else (m, n // 3)
        for index, part in enumerate(QKV_PARTS):
            specs.append(
                MatrixSpec(f"{name}[{part}]", name, p, f"attn_{part}", split, index, part_shape)
            )
    if not specs and not allow_empty:
        two_d = [name for name, p in trainable if p.ndim == 2]
        if two_d:
            raise GuardConfigError(
                f"no 2-D weight of {type(model).__name__} is left to monitor: "
                f"'{two_d[0]}' and the other {len(two_d) - 1} are excluded by role "
                f"({', '.join(exclude_roles)})",
                "set GuardConfig(exclude_roles=()) to monitor embeddings and the LM head too",
            )
        raise GuardConfigError(
            f"{type(model).__name__} has no trainable 2-D weight (the guard watches matrices)",
            "the guard is for models with linear layers (transformers, MLPs)",
        )
    return specs


def trainable_now(
    model: nn.Module, watched: list[tuple[str, nn.Parameter]]
) -> list[tuple[str, nn.Parameter]]:
    """The model's parameters that are trainable at this step: requires_grad, and held by the
    optimizer (`watched`), in the model's parameter order (what `trainable_parameters` gives
    at construction, where the optimizer must hold every trainable parameter)."""
    held = {id(p) for _, p in watched}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in held]


def frozen_candidates(model: nn.Module, exclude_roles: tuple[str, ...]) -> list[str]:
    """Names of frozen 2-D weights the guard would monitor once they are unfrozen."""
    embedding_params = _embedding_params(model)
    return [
        name
        for name, p in model.named_parameters()
        if not p.requires_grad
        and p.ndim == 2
        and _role(name, p, embedding_params) not in exclude_roles
    ]


def _embedding_params(model: nn.Module) -> set[int]:
    return {
        id(p)
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        for p in module.parameters(recurse=False)
    }


def _role(name: str, p: nn.Parameter, embedding_params: set[int]) -> str:
    role, _block = classify(name)
    return Role.EMBEDDING.value if id(p) in embedding_params else role.value


def _qkv_split(name: str, modules: dict[str, nn.Module], shape: tuple[int, int]) -> int | None:
    module_name, _, leaf = name.rpartition(".")
    module = modules.get(module_name)
    short = module_name.rpartition(".")[2]
    m, n = shape
    if leaf == "in_proj_weight" and isinstance(module, nn.MultiheadAttention):
        return 0 if m == 3 * n else None
    if leaf != "weight" or short not in _LINEAR_QKV_NAMES:
        return None
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight (in, out)
        return 1 if n == 3 * m else None
    if isinstance(module, nn.Linear):
        return 0 if m == 3 * n else None
    return None
