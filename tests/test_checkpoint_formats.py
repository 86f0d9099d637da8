"""The format registry (pss_cli/checkpoint/formats/): every layout kind has one owner, discovery
hands each real format to its owner, and the registry imports without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pss_cli.checkpoint.digest import tensor_digests
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.formats.registry import FORMATS, format_of
from pss_cli.checkpoint.reader import TensorReader
from tests.format_factory import save_dcp


def test_every_layout_kind_has_exactly_one_format() -> None:
    kinds = [kind for fmt in FORMATS for kind in fmt.kinds]
    assert len(set(kinds)) == len(kinds), f"a kind owned twice: {kinds}"
    for kind in kinds:
        assert format_of(kind) is next(f for f in FORMATS if kind in f.kinds)
    suffixes = [s for fmt in FORMATS for s in fmt.file_suffixes]
    assert len(set(suffixes)) == len(suffixes), f"a file suffix claimed twice: {suffixes}"
    assert len({f.name for f in FORMATS}) == len(FORMATS)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(6, 4, generator=g), "b.weight": torch.randn(3, 5, generator=g)}


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("safetensors-file", "safetensors"),
        ("safetensors-folder", "safetensors"),
        ("dcp-folder", "dcp"),
        ("dcp-metadata-file", "dcp"),
        ("torch-file", "torch"),
        ("torch-folder", "torch"),
        ("both-folder", "safetensors"),  # as transformers: safetensors wins over .bin
    ],
)
def test_discovery_hands_each_format_to_its_owner(
    tmp_path: Path, variant: str, expected: str
) -> None:
    state = _state()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder
    if variant.startswith("safetensors"):
        save_file(state, str(folder / "model.safetensors"))
        path = folder / "model.safetensors" if variant == "safetensors-file" else folder
    elif variant.startswith("dcp"):
        save_dcp(folder, dict(state))
        path = folder / ".metadata" if variant == "dcp-metadata-file" else folder
    elif variant.startswith("torch"):
        torch.save(state, folder / "pytorch_model.bin")
        path = folder / "pytorch_model.bin" if variant == "torch-file" else folder
    else:
        save_file(state, str(folder / "model.safetensors"))
        torch.save(state, folder / "pytorch_model.bin")
    layout = open_checkpoint(path)
    fmt = format_of(layout.kind)
    assert fmt.name == expected
    assert layout.one_file is (variant.endswith("-file") and not variant.startswith("dcp"))
    assert sorted(e.name for e in layout.entries) == sorted(state)
    with TensorReader(layout) as reader:
        for entry in layout.entries:
            assert torch.equal(reader.read(entry), state[entry.name])
    digests = tensor_digests(layout)
    assert set(digests) == set(state)
    assert len(set(digests.values())) == len(state)  # different tensors, different digests


def test_registry_and_discovery_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import pss_cli.checkpoint.discover, pss_cli.checkpoint.formats.registry\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
