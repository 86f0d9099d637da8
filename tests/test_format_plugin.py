"""A new checkpoint format is one module (tests/toy_format.py) plus one registry line: with that
line added, discovery, scan, check and smooth (plan, write, verification, provenance) work on it
with no other change, and the one-file suffix rules cover it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.formats import registry
from pss_cli.checkpoint.formats.registry import format_of
from tests.toy_format import ToyFormat, _load, save_toy


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[ToyFormat]:
    toy = ToyFormat()
    monkeypatch.setattr(registry, "FORMATS", (*registry.FORMATS, toy))  # the one line
    yield toy


def stable_rank(w: torch.Tensor) -> float:
    """The exact reference: ||W||_F^2 / sigma_1^2 from a float64 SVD."""
    s = torch.linalg.svdvals(w.double())
    return float((s**2).sum() / s[0] ** 2)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(48, 32, generator=g) / 32**0.5
    u, v = torch.randn(48, 1, generator=g), torch.randn(1, 32, generator=g)
    collapsed = healthy + 40.0 * (u / u.norm()) @ (v / v.norm())  # one dominant direction
    return {
        "block.attn.q.weight": healthy.clone(),
        "block.mlp.up.weight": collapsed,
        "block.norm.weight": torch.ones(32),
    }


def test_unregistered_format_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "m.tjson"
    save_toy(path, _tensors(), {})
    result = CliRunner().invoke(app, ["scan", str(path), "-f", "json", "-q"])
    assert result.exit_code == 3  # tried as safetensors, refused as a damaged checkpoint
    assert "m.tjson" in result.stderr and "Traceback" not in result.stderr


def test_scan_check_and_smooth_a_registered_format(
    tmp_path: Path, toy_registered: ToyFormat
) -> None:
    tensors = _tensors()
    src = tmp_path / "m.tjson"
    save_toy(src, tensors, {"origin": "test"})
    layout = open_checkpoint(src)
    assert format_of(layout.kind) is toy_registered and layout.one_file

    runner = CliRunner()
    scan = runner.invoke(app, ["scan", str(src), "-f", "json", "-q"])
    assert scan.exit_code == 0, scan.stderr
    layers = {x["name"]: x for x in json.loads(scan.stdout)["layers"]}
    assert set(layers) == {"block.attn.q.weight", "block.mlp.up.weight"}
    expected = stable_rank(tensors["block.mlp.up.weight"].double())
    assert layers["block.mlp.up.weight"]["stable_rank"] == pytest.approx(expected, rel=1e-4)

    check = runner.invoke(app, ["check", str(src), "-q"])
    assert check.exit_code == 1, check.stderr  # the collapsed matrix fails the gate

    out = tmp_path / "fixed.tjson"
    smooth = runner.invoke(app, ["smooth", str(src), "--out", str(out), "-q"])
    assert smooth.exit_code == 0, smooth.stderr
    assert src.read_text() == json.dumps(_load(src))  # the input is untouched
    fixed = open_checkpoint(out)
    assert format_of(fixed.kind) is toy_registered
    blob = _load(out)
    assert {"pss.version", "pss.method"} <= set(blob["__metadata__"])  # provenance
    for name in ("block.attn.q.weight", "block.norm.weight"):
        assert blob[name] == _load(src)[name]  # untouched tensors identical
    after = torch.tensor(blob["block.mlp.up.weight"]["data"]).reshape(48, 32)
    assert stable_rank(after.double()) > 1.5 * expected


def test_one_file_suffixes_follow_the_registry(tmp_path: Path, toy_registered: ToyFormat) -> None:
    runner = CliRunner()
    toy = tmp_path / "m.tjson"
    save_toy(toy, _tensors(), {})
    st = tmp_path / "m.safetensors"
    save_file(_tensors(), str(st))
    cases = [
        (toy, tmp_path / "o.safetensors", "'o.tjson'"),  # a toy file stays a toy file
        (toy, tmp_path / "o.pt", "'o.tjson'"),
        (st, tmp_path / "o.tjson", "'o.safetensors'"),  # and the reverse
        (st, tmp_path / "o.pt", "'o.safetensors'"),
    ]
    for src, out, hint in cases:
        result = runner.invoke(app, ["smooth", str(src), "--out", str(out), "-q"])
        assert result.exit_code == 2, (src, out, result.stderr)
        assert "keeps the input's format" in result.stderr and hint in result.stderr
        assert not out.exists()
