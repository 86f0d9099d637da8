"""Synthetic training runs for `pss trend` tests: checkpoints whose spectra evolve as told.

Each layer's singular values follow a power law (stable rank ~15-25 for 48 values) that drifts
by a few percent per checkpoint, with seeded noise, like healthy training. A collapsing layer's
sigma_1 is multiplied by `spike` from `collapse_step` on (stable rank 1 + (SR - 1) / spike^2: the
paper's collapse). Optionally writes trainer_state.json with a loss/grad-norm log that spikes at
`loss_spike_step`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.spectra_factory import with_spectrum

LAYERS = (
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
)
SHAPE = (48, 64)


def layer_spectrum(layer: int, t: int, spike: float, seed: int) -> torch.Tensor:
    r = min(SHAPE)
    g = torch.Generator().manual_seed(seed * 1000 + layer * 37 + t)
    i = torch.arange(r, dtype=torch.float64)
    alpha = 0.15 + 0.03 * layer  # stable ranks ~14-22: well above the floor of 5
    # Slow growth of the overall scale with training, plus 2 % noise on every value.
    scale = 1.0 + 0.03 * t
    s = scale * (i + 1) ** -alpha * (1 + 0.02 * torch.randn(r, generator=g, dtype=torch.float64))
    s = s.abs().sort(descending=True).values
    s[0] *= spike
    return s


def write_run(
    root: Path,
    steps: Sequence[int],
    collapse: Sequence[str] = (),
    collapse_step: int | None = None,
    spike: float = 6.0,
    naming: str = "checkpoint-{step}",
    seed: int = 0,
    loss_spike_step: int | None = None,
    log_every: int = 10,
    layers: Sequence[str] = LAYERS,
) -> list[Path]:
    """Checkpoints under `root` named by `naming`; returns their paths in step order."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, step in enumerate(steps):
        tensors = {}
        for layer, name in enumerate(layers):
            collapsed = name in collapse and collapse_step is not None and step >= collapse_step
            s = layer_spectrum(layer, t, spike if collapsed else 1.0, seed)
            tensors[name] = with_spectrum(*SHAPE, s, seed + layer).float().contiguous()
        folder = root / naming.format(step=step)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if loss_spike_step is not None:
            state = {"global_step": step, "log_history": _log(step, loss_spike_step, log_every)}
            (folder / "trainer_state.json").write_text(json.dumps(state))
        paths.append(folder)
    return paths


def _log(until: int, spike_step: int, every: int) -> list[dict[str, float | int]]:
    history: list[dict[str, float | int]] = []
    for step in range(every, until + 1, every):
        loss = 6.0 / (1 + step / 100) + 2.0
        grad = 1.0
        if step >= spike_step:
            loss, grad = 9.0, 60.0
        history.append({"step": step, "loss": loss, "grad_norm": grad, "learning_rate": 1e-3})
        if step % (every * 5) == 0:
            history.append({"step": step, "eval_loss": loss})  # eval entries carry no loss
    return history
