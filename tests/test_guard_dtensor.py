"""pss guard on DTensor layouts beyond plain FSDP2, 2 CPU processes (gloo): HSDP (a Replicate
mesh dimension), tensor parallelism (a replicated bias), and `optimizer_policy="reset"` on one
part of a sharded fused Q/K/V weight; and FSDP1 refused. Each case failed before its fix: the
HSDP norm read sqrt(2) too high, the TP norm counted the replicated bias twice, and the reset
zeroed the moments of a part that was not smoothed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

WORLD = 2


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(32, 96)  # split into q, k, v (out = 3 x in)
        with torch.no_grad():
            self.qkv.weight[32:64].zero_()  # k all zero: left alone by the smooth
        self.proj = nn.Linear(96, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.qkv(x)))


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)


def _reference_norm() -> float:
    """Sum of per-parameter norms of the gradient averaged over both ranks' batches."""
    model = MLP()
    for rank in range(WORLD):
        x, y = _data(rank)
        (nn.functional.mse_loss(model(x), y) / WORLD).backward()
    return sum(float(p.grad.norm()) for p in model.parameters() if p.grad is not None)


def _worker(rank: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from pss_cli.errors import GuardConfigError
    from pss_cli.guard import Guard, GuardConfig
    from tests.guard_factory import init_gloo

    init_gloo(out, rank, WORLD)
    results: dict[str, object] = {}
    x, y = _data(rank)

    # HSDP: fully_shard on a (replicate=2, shard=1) mesh; every gradient is Replicate there.
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    model = MLP()
    fully_shard(model, mesh=mesh)
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.0))
    nn.functional.mse_loss(model(x), y).backward()
    results["hsdp"] = guard.step().grad_norm

    # Tensor parallel: up column-wise, down row-wise; down.bias stays Replicate.
    tp_mesh = init_device_mesh("cpu", (WORLD,))
    model = parallelize_module(MLP(), tp_mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.0))
    # Both ranks see both batches (TP shards the model, not the data): mean over the world.
    loss = sum(nn.functional.mse_loss(model(a), b) for a, b in map(_data, range(WORLD)))
    (loss / WORLD).backward()
    results["tp"] = guard.step().grad_norm

    # optimizer_policy="reset" on the q and v parts of a sharded fused weight.
    model = Attn()
    fully_shard(model.qkv)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    config = GuardConfig(
        spike_factor=1e-9, warmup_steps=0, cooldown_steps=0, optimizer_policy="reset"
    )
    guard = Guard(model, optimizer, config)
    for _ in range(2):
        nn.functional.mse_loss(model(x), y).backward()
        decision = guard.step()
        optimizer.zero_grad(set_to_none=True)
    moment = optimizer.state[model.qkv.weight]["exp_avg"].full_tensor()
    results["smoothed"] = list(decision.smoothed)
    results["moment_parts"] = [float(part.abs().sum()) for part in moment.chunk(3, 0)]

    # FSDP1, even with use_orig_params=True: refused at construction.
    wrapped = FullyShardedDataParallel(MLP(), use_orig_params=True, device_id=torch.device("cpu"))
    try:
        Guard(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1))
        results["fsdp1"] = "accepted"
    except GuardConfigError as error:
        results["fsdp1"] = str(error)
    Path(out, f"results{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def main(out: str) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(out,), nprocs=WORLD, join=True)


def test_dtensor_layouts(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    code = f"from tests.test_guard_dtensor import main; main({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=240, env=env, cwd=root)
    results = [json.loads((tmp_path / f"results{r}.json").read_text()) for r in range(WORLD)]
    assert results[0] == results[1]  # every rank agrees
    result = results[0]
    reference = _reference_norm()
    assert result["hsdp"] == pytest.approx(reference, rel=1e-5)  # before: x sqrt(2)
    assert result["tp"] == pytest.approx(reference, rel=1e-5)  # before: the bias counted twice
    assert result["smoothed"] and "qkv.weight[k]" not in result["smoothed"]
    q, k, v = result["moment_parts"]
    assert q == 0.0 and v == 0.0 and k > 0.0  # before: k's moments zeroed too
    assert "FSDP1" in result["fsdp1"]
