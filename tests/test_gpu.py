"""CUDA paths: pinned staging, device-side upcast, batches sized from free memory, torchrun ranks
on GPUs. Every test here is marked `gpu` and skipped without CUDA (no GPU was available when
they were written: they have not run yet, see docs/distributed.md).

Tolerances: the GPU's float32 products round differently from MKL's, so singular values agree
with the CPU scan to the solver's own accuracy (1e-3 on sigma_max, 1e-2 on each top-k value),
while the Frobenius norm, accumulated in float64 from the same stored values, agrees to 1e-12.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pss_cli.config import ComputeDtype, ScanConfig
from pss_cli.errors import UsageError
from pss_cli.pipeline import batch_budget_bytes, resolve_device, scan_checkpoint
from pss_cli.pipeline import loader as pipeline_loader
from pss_cli.pipeline import memory as pipeline_memory
from tests.safetensors_factory import write_tensors
from tests.spectra_factory import flat_bulk, power_law, spiky, with_spectrum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
ROOT = Path(__file__).resolve().parent.parent
KRYLOV = ScanConfig(exact_max_dim=0)


def _checkpoint(folder: Path, dtype: torch.dtype) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, spectrum in enumerate([flat_bulk(600), power_law(600), spiky(600)]):
        tensors[f"layers.{i}.up.weight"] = with_spectrum(700, 600, spectrum, i).to(dtype)
        tensors[f"layers.{i}.down.weight"] = with_spectrum(600, 700, spectrum, 9 + i).to(dtype)
    tensors["layers.3.experts.w1"] = torch.randn(4, 300, 260, generator=g).to(dtype)
    tensors["layers.3.conv.weight"] = torch.randn(64, 32, 3, 3, generator=g).to(dtype)
    return write_tensors(folder / "model.safetensors", tensors)


def _compare(cpu, gpu) -> None:
    assert gpu.device.startswith("cuda")
    for a, b in zip(cpu.layers, gpu.layers, strict=True):
        assert (a.name, a.index) == (b.name, b.index)
        assert b.frobenius_norm == pytest.approx(a.frobenius_norm, rel=1e-12)
        assert b.sigma_max == pytest.approx(a.sigma_max, rel=1e-3)
        top_a = torch.tensor(a.top_singular_values)
        top_b = torch.tensor(b.top_singular_values)
        assert ((top_a - top_b).abs() / top_a).max() <= 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_cuda_scan_matches_cpu_for_every_stored_dtype(
    tmp_path: Path, monkeypatch, dtype: torch.dtype
) -> None:
    path = _checkpoint(tmp_path, dtype)
    # A tiny staging buffer: every matrix crosses the pinned buffers in many chunks, in turn.
    monkeypatch.setattr(pipeline_loader, "STAGING_BUFFER_BYTES", 64 * 1024)
    cpu = scan_checkpoint(path, replace(KRYLOV, device="cpu"))
    gpu = scan_checkpoint(path, replace(KRYLOV, device="cuda"))
    _compare(cpu, gpu)


def test_cuda_float64_compute(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, torch.bfloat16)
    config = replace(KRYLOV, compute_dtype=ComputeDtype.FLOAT64)
    _compare(
        scan_checkpoint(path, replace(config, device="cpu")),
        scan_checkpoint(path, replace(config, device="cuda")),
    )


def test_small_device_budget_gives_the_same_results(tmp_path: Path, monkeypatch) -> None:
    """Batches of one (budget squeezed) and batches sized from free memory agree."""
    path = _checkpoint(tmp_path, torch.bfloat16)
    wide = scan_checkpoint(path, replace(KRYLOV, device="cuda"))
    monkeypatch.setattr(pipeline_memory, "CUDA_FREE_MEMORY_FRACTION", 1e-9)
    narrow = scan_checkpoint(path, replace(KRYLOV, device="cuda"))
    for a, b in zip(wide.layers, narrow.layers, strict=True):
        assert b.sigma_max == pytest.approx(a.sigma_max, rel=1e-5)


def test_budget_comes_from_free_device_memory() -> None:
    device = torch.device("cuda", 0)
    free, _total = torch.cuda.mem_get_info(device)
    budget = batch_budget_bytes(device, ScanConfig())
    assert 0 < budget <= free


def test_device_index_is_validated() -> None:
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UsageError) as info:
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert "does not exist" in info.value.message


def test_cli_scan_on_a_named_gpu(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, torch.bfloat16)
    done = subprocess.run(
        [sys.executable, "-m", "pss_cli", "scan", str(path), "--device", "cuda:0", "-f", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["device"] == "cuda:0"


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_torchrun_on_two_gpus_matches_one_gpu(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, torch.bfloat16)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    single = subprocess.run(
        [sys.executable, "-m", "pss_cli", "scan", str(path), "--device", "cuda", "-f", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", "-m", "pss_cli", "scan", str(path), "--device", "cuda"]
    command += ["-f", "json"]
    dist = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0 and dist.returncode == 0, dist.stderr
    one, two = json.loads(single.stdout), json.loads(dist.stdout)
    assert two["device"] == "cuda" and two["settings"]["world_size"] == 2
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert a["name"] == b["name"]
        assert b["sigma_max"] == pytest.approx(a["sigma_max"], rel=1e-5)
