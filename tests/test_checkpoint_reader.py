"""TensorReader: lazy, mmap-backed reads; errors wrapped with file and tensor names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.errors import CorruptCheckpointError
from tests.safetensors_factory import write_index, write_tensors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_round_trip_every_float_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(5, 7, generator=gen).to(dtype),
        "conv": torch.randn(4, 3, 3, 3, generator=gen).to(dtype),
        "b": torch.randn(7, generator=gen).to(dtype),
    }
    layout = open_checkpoint(write_tensors(tmp_path / "m.safetensors", tensors))
    with TensorReader(layout) as reader:
        for entry in layout.entries:
            got = reader.read(entry)
            assert got.dtype == dtype
            assert torch.equal(got, tensors[entry.name])


def test_sharded_reads_each_file_once_and_closes(tmp_path: Path) -> None:
    write_tensors(tmp_path / "s1.safetensors", {"a": torch.ones(2, 2)})
    write_tensors(tmp_path / "s2.safetensors", {"b": torch.full((3, 2), 2.0)})
    write_index(
        tmp_path / "model.safetensors.index.json", {"a": "s1.safetensors", "b": "s2.safetensors"}
    )
    layout = open_checkpoint(tmp_path)
    reader = TensorReader(layout)
    with reader:
        assert reader._handles == {}  # lazy: nothing opened before the first read
        first = reader.read(layout.entries[0])
        reader.read(layout.entries[0])
        assert list(reader._handles) == [tmp_path / "s1.safetensors"]
        second = reader.read(layout.entries[1])
        assert len(reader._handles) == 2
    assert reader._handles == {}
    # Tensors keep their own reference to the mapping, so they outlive the reader.
    assert first.sum().item() == 4.0 and second.sum().item() == 12.0


def test_tensor_is_not_copied(tmp_path: Path) -> None:
    layout = open_checkpoint(write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(64, 64)}))
    with TensorReader(layout) as reader:
        a = reader.read(layout.entries[0])
        b = reader.read(layout.entries[0])
    # Both reads view the same mapped bytes: no per-read copy.
    assert a.data_ptr() == b.data_ptr()


def test_unknown_tensor_is_wrapped(tmp_path: Path) -> None:
    layout = open_checkpoint(write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(2, 2)}))
    ghost = dataclasses.replace(layout.entries[0], name="ghost")
    with TensorReader(layout) as reader, pytest.raises(CorruptCheckpointError) as info:
        reader.read(ghost)
    assert "tensor 'ghost'" in info.value.message
    assert str(tmp_path / "m.safetensors") in info.value.message


def test_file_replaced_after_scan_is_wrapped(tmp_path: Path) -> None:
    path = write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(2, 2)})
    layout = open_checkpoint(path)
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with TensorReader(layout) as reader, pytest.raises(CorruptCheckpointError) as info:
        reader.read(layout.entries[0])
    assert str(path) in info.value.message and "\n" not in info.value.message


def test_shape_changed_after_scan(tmp_path: Path) -> None:
    path = write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(2, 2)})
    layout = open_checkpoint(path)
    path.unlink()  # a new file at the same path, as a re-save would make
    write_tensors(path, {"w": torch.ones(4, 1)})
    with TensorReader(layout) as reader, pytest.raises(CorruptCheckpointError, match="shape"):
        reader.read(layout.entries[0])


def test_entry_from_another_checkpoint_is_a_programming_error(tmp_path: Path) -> None:
    mine = open_checkpoint(write_tensors(tmp_path / "a.safetensors", {"w": torch.ones(2, 2)}))
    other = open_checkpoint(write_tensors(tmp_path / "b.safetensors", {"w": torch.ones(2, 2)}))
    with TensorReader(mine) as reader, pytest.raises(ValueError, match="not part of"):
        reader.read(other.entries[0])


def test_a_file_made_unreadable_after_the_scan_says_permissions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod 000 mid-scan: the error named permissions, with the "changed or damaged since it
    # was scanned; re-download it" hint. (Simulated: root reads a 000 file all the same.)
    import builtins

    from pss_cli.checkpoint import reader as reader_module
    from pss_cli.checkpoint.formats.safetensors.header import read_header as real_read_header
    from pss_cli.errors import CheckpointError

    path = write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(2, 2)})
    layout = open_checkpoint(path)
    out = torch.empty(2, 2)

    real_open = builtins.open

    def denied_open(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("buffering") == 0:  # the reader's positional-read handle, not the header's
            raise PermissionError(13, "Permission denied")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied_open)
    with TensorReader(layout) as reader, pytest.raises(CheckpointError) as info:
        reader.read_into(layout.entries[0], out)
    monkeypatch.setattr(builtins, "open", real_open)
    assert type(info.value) is CheckpointError  # not "corrupt"
    assert "permission denied" in info.value.message
    assert info.value.hint is not None and "permissions" in info.value.hint

    def denied_header(file: Path):  # type: ignore[no-untyped-def]
        raise CheckpointError(f"cannot read '{file}': permission denied", hint="check perms")

    monkeypatch.setattr(reader_module, "read_header", denied_header)
    with TensorReader(layout) as reader, pytest.raises(CheckpointError) as info:
        reader.read_into(layout.entries[0], out)
    assert info.value.hint == "check perms"
    monkeypatch.setattr(reader_module, "read_header", real_read_header)
