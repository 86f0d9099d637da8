"""TensorReader.read_into: positional reads of byte ranges into caller buffers (no mmap), with the
header re-validated when a file is opened, and errors that name the file and tensor."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.errors import CorruptCheckpointError
from tests.safetensors_factory import write_index, write_tensors

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8]


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_tensors_and_slices_come_back_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": (torch.randn(7, 5, generator=g) * 50).to(dtype),
        "stack": (torch.randn(3, 4, 6, generator=g) * 50).to(dtype),
        "b": (torch.randn(9, generator=g) * 50).to(dtype),
    }
    layout = open_checkpoint(write_tensors(tmp_path / "m.safetensors", tensors))
    with TensorReader(layout) as reader:
        for entry in layout.entries:
            assert reader.can_read_into(entry)
            out = torch.empty(entry.shape, dtype=dtype)
            reader.read_into(entry, out)
            assert torch.equal(out, tensors[entry.name])
        stack = next(e for e in layout.entries if e.name == "stack")
        item = torch.empty(4, 6, dtype=dtype).element_size() * 24
        for index in range(3):
            out = torch.empty(4, 6, dtype=dtype)
            reader.read_into(stack, out, index * item)
            assert torch.equal(out, tensors["stack"][index])
        # Row ranges, as the scan streams them through its staging buffer.
        rows = torch.empty(2, 6, dtype=dtype)
        reader.read_into(stack, rows, item + 2 * 6 * rows.element_size())
        assert torch.equal(rows, tensors["stack"][1, 2:4])


def test_bytes_land_in_any_buffer_dtype(tmp_path: Path) -> None:
    weight = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    layout = open_checkpoint(write_tensors(tmp_path / "m.safetensors", {"w": weight}))
    raw = torch.empty(24, dtype=torch.uint8)
    with TensorReader(layout) as reader:
        reader.read_into(layout.entries[0], raw)
    assert torch.equal(raw.view(torch.bfloat16).view(3, 4), weight)


def test_ranges_outside_the_tensor_and_bad_buffers_are_refused(tmp_path: Path) -> None:
    layout = open_checkpoint(write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(4, 4)}))
    entry = layout.entries[0]
    with TensorReader(layout) as reader:
        with pytest.raises(ValueError, match="outside tensor 'w'"):
            reader.read_into(entry, torch.empty(5, 4))
        with pytest.raises(ValueError, match="outside tensor 'w'"):
            reader.read_into(entry, torch.empty(4), byte_offset=60)
        with pytest.raises(ValueError, match="outside tensor 'w'"):
            reader.read_into(entry, torch.empty(1), byte_offset=-4)
        with pytest.raises(ValueError, match="contiguous"):
            reader.read_into(entry, torch.empty(4, 4).mT)
        reader.read_into(entry, torch.empty(0))  # nothing to read is fine


def test_a_file_replaced_after_opening_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(4, 4), "v": torch.ones(2)})
    layout = open_checkpoint(path)
    # Same size, other layout: a plain offset read would return the wrong bytes silently.
    write_tensors(path, {"v": torch.ones(2, 4, 2), "w": torch.ones(2)})
    entry = next(e for e in layout.entries if e.name == "w")
    with TensorReader(layout) as reader, pytest.raises(CorruptCheckpointError) as info:
        reader.read_into(entry, torch.empty(4, 4))
    assert str(path) in info.value.message and "changed since it was opened" in info.value.message
    assert info.value.hint


def test_a_file_garbled_after_opening_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(4, 4)})
    layout = open_checkpoint(path)
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with TensorReader(layout) as reader, pytest.raises(CorruptCheckpointError) as info:
        reader.read_into(layout.entries[0], torch.empty(4, 4))
    assert str(path) in info.value.message and "\n" not in info.value.message


def test_a_file_truncated_while_open_is_an_error_naming_tensor_and_file(tmp_path: Path) -> None:
    path = write_tensors(tmp_path / "m.safetensors", {"a": torch.ones(64), "b": torch.ones(64)})
    layout = open_checkpoint(path)
    with TensorReader(layout) as reader:
        reader.read_into(layout.entries[0], torch.empty(64))  # opened and validated here
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size - 100)
        with pytest.raises(CorruptCheckpointError) as info:
            reader.read_into(layout.entries[1], torch.empty(64))
    assert "tensor 'b'" in info.value.message and str(path) in info.value.message
    assert "ends 100 bytes early" in info.value.message


def test_shards_are_opened_lazily_and_closed(tmp_path: Path) -> None:
    write_tensors(tmp_path / "s1.safetensors", {"a": torch.ones(2, 2)})
    write_tensors(tmp_path / "s2.safetensors", {"b": torch.full((3, 2), 2.0)})
    write_index(
        tmp_path / "model.safetensors.index.json", {"a": "s1.safetensors", "b": "s2.safetensors"}
    )
    layout = open_checkpoint(tmp_path)
    reader = TensorReader(layout)
    with reader:
        assert reader._raw == {}
        out = torch.empty(3, 2)
        reader.read_into(layout.entries[1], out)
        assert list(reader._raw) == [tmp_path / "s2.safetensors"]
    assert reader._raw == {}
    assert out.sum().item() == 12.0  # the caller's buffer outlives the reader


def test_release_mappings_keeps_returned_tensors_valid(tmp_path: Path) -> None:
    layout = open_checkpoint(write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(8, 8)}))
    with TensorReader(layout) as reader:
        mapped = reader.read(layout.entries[0])
        reader.release_mappings()
        assert reader._handles == {}
        assert mapped.sum().item() == 64.0
        again = reader.read(layout.entries[0])  # reopened on demand
        assert again.sum().item() == 64.0


def test_concurrent_reads_from_two_threads(tmp_path: Path) -> None:
    """The scan's loader thread and a fallback read may share a file: positions must not mix."""
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(256, 64, generator=g) for i in range(8)}
    layout = open_checkpoint(write_tensors(tmp_path / "m.safetensors", tensors))
    errors: list[str] = []
    with TensorReader(layout) as reader:

        def work(offset: int) -> None:
            for round_ in range(30):
                entry = layout.entries[(offset + round_) % len(layout.entries)]
                out = torch.empty(entry.shape)
                reader.read_into(entry, out)
                if not torch.equal(out, tensors[entry.name]):
                    errors.append(entry.name)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []


def test_non_safetensors_files_are_not_served(tmp_path: Path) -> None:
    import dataclasses

    layout = open_checkpoint(write_tensors(tmp_path / "m.safetensors", {"w": torch.ones(2, 2)}))
    other = dataclasses.replace(layout.entries[0], file=tmp_path / "elsewhere.safetensors")
    with TensorReader(layout) as reader:
        assert not reader.can_read_into(other)
        with pytest.raises(ValueError, match="not part of the checkpoint"):
            reader.read_into(other, torch.empty(2, 2))
