"""The committed sample checkpoints: deterministic generator, expected stable ranks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.formats.safetensors.format import SafetensorsKind as LayoutKind
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.checkpoint.selection import select

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
FLAGGED = {
    "transformer.h.2.mlp.c_fc.weight",
    "transformer.h.3.mlp.c_fc.weight",
    "transformer.h.3.attn.c_attn.weight",
}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stable_ranks(path: Path) -> dict[str, float]:
    """Exact SR = ||W||_F^2 / sigma_1^2 of every analysed matrix, in float64."""
    layout = open_checkpoint(path)
    targets, _ = select(layout.entries)
    ranks = {}
    with TensorReader(layout) as reader:
        for target in targets:
            sigma = torch.linalg.svdvals(target.as_matrices(reader.read(target.entry)).double())
            ranks[target.entry.name] = float((sigma**2).sum() / sigma[0, 0] ** 2)
    return ranks


def test_generator_is_deterministic(tmp_path: Path) -> None:
    make_samples = load_generator()
    make_samples.main(tmp_path / "a")
    make_samples.main(tmp_path / "b")
    files_a = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    files_b = sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert files_a == files_b and len(files_a) == 8
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_samples_are_small() -> None:
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 5_000_000


@pytest.mark.parametrize(
    ("rel", "kind"),
    [
        ("healthy/model.safetensors", LayoutKind.SINGLE_FILE),
        ("diverged/model.safetensors", LayoutKind.SINGLE_FILE),
        ("sharded", LayoutKind.SHARDED),
        ("trainer/checkpoint-100", LayoutKind.DIRECTORY),
    ],
)
def test_samples_open(rel: str, kind: LayoutKind) -> None:
    layout = open_checkpoint(SAMPLES / rel)
    assert layout.kind is kind
    assert len(layout.entries) == 2 + 4 * 12 + 2
    assert all(meta == {"format": "pt"} for meta in layout.metadata.values())


@pytest.mark.parametrize("rel", ["healthy/model.safetensors", "sharded"])
def test_healthy_stable_ranks(rel: str) -> None:
    ranks = stable_ranks(SAMPLES / rel)
    assert len(ranks) == 18
    assert min(ranks.values()) > 5
    assert max(ranks.values()) < 30


@pytest.mark.parametrize("rel", ["diverged/model.safetensors", "trainer/checkpoint-100"])
def test_diverged_stable_ranks(rel: str) -> None:
    ranks = stable_ranks(SAMPLES / rel)
    assert {name for name, sr in ranks.items() if sr < 3} == FLAGGED
    assert min(sr for name, sr in ranks.items() if name not in FLAGGED) > 5


def test_trainer_state_shows_the_spike() -> None:
    state = json.loads((SAMPLES / "trainer/checkpoint-100/trainer_state.json").read_text())
    assert state["global_step"] == 100
    grad_norms = [row["grad_norm"] for row in state["log_history"]]
    assert max(grad_norms) > 50 and min(grad_norms) < 10
