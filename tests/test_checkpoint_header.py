"""read_header: valid files and one test per kind of bad input (exact key phrases)."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from pss_cli.checkpoint.formats.safetensors import header as header_mod
from pss_cli.checkpoint.formats.safetensors.header import read_header
from pss_cli.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from tests.safetensors_factory import (
    encode_header,
    layout_header,
    write_empty,
    write_file,
    write_header_past_eof,
    write_huge_header_claim,
    write_lfs_pointer,
    write_raw,
    write_short,
    write_tensors,
    write_truncated,
)


def corrupt(path: Path, *phrases: str) -> CorruptCheckpointError:
    """read_header(path) must raise CorruptCheckpointError naming the file and every phrase."""
    with pytest.raises(CorruptCheckpointError) as info:
        read_header(path)
    err = info.value
    assert str(path) in err.message
    for phrase in phrases:
        assert phrase in err.message
    assert "\n" not in err.message
    assert err.hint
    return err


def test_valid_file_entries_in_offset_order_with_metadata(tmp_path: Path) -> None:
    specs = [("z.weight", "F32", (2, 3)), ("a.bias", "BF16", (3,)), ("m", "I8", (5, 1))]
    path = write_file(tmp_path / "m.safetensors", specs, metadata={"format": "pt"})
    entries, metadata = read_header(path)
    assert [e.name for e in entries] == ["z.weight", "a.bias", "m"]
    assert entries[0].shape == (2, 3) and entries[0].data_offsets == (0, 24)
    assert entries[1].dtype == "BF16" and entries[1].data_offsets == (24, 30)
    assert all(e.file == path for e in entries)
    assert metadata == {"format": "pt"}


def test_no_metadata_and_no_tensors(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "e.safetensors", encode_header({}))
    assert read_header(path) == ([], {})


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.bool]
)
def test_agrees_with_safetensors_on_real_files(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"w": torch.ones(3, 5, dtype=dtype), "b": torch.zeros(7, dtype=dtype)}
    path = write_tensors(tmp_path / "r.safetensors", tensors)
    entries, metadata = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        assert metadata == f.metadata()
    assert {e.name: e.shape for e in entries} == expected


def test_sub_byte_f4(tmp_path: Path) -> None:
    def f4(shape: list[int], nbytes: int) -> Any:
        return lambda h: h.update(
            {"a": {"dtype": "F4", "shape": shape, "data_offsets": [0, nbytes]}}
        )

    ok = write_file(tmp_path / "ok.safetensors", [("a", "U8", (2,))], edit=f4([4], 2))
    assert read_header(ok)[0][0].dtype == "F4"
    odd = write_file(tmp_path / "odd.safetensors", [("a", "U8", (2,))], edit=f4([3], 2))
    corrupt(odd, "tensor 'a'", "does not fill whole bytes")


def test_reads_only_the_header(tmp_path: Path) -> None:
    # A 1 GB sparse data area: reading it would take seconds and gigabytes; parsing must not.
    path = tmp_path / "big.safetensors"
    header, _ = layout_header([("big", "F32", (1 << 18, 1 << 10))])
    write_raw(path, encode_header(header))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) + (1 << 30))
    start = time.perf_counter()
    entries, _ = read_header(path)
    assert entries[0].shape == (1 << 18, 1 << 10)
    assert time.perf_counter() - start < 1.0


# ---- bad inputs, one per case -------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as info:
        read_header(tmp_path / "nope.safetensors")
    assert str(tmp_path / "nope.safetensors") in info.value.message


def test_empty_file(tmp_path: Path) -> None:
    corrupt(write_empty(tmp_path / "x.safetensors"), "file is empty (0 bytes)")


def test_shorter_than_8_bytes(tmp_path: Path) -> None:
    corrupt(write_short(tmp_path / "x.safetensors", 5), "too short", "5 bytes")


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    corrupt(write_header_past_eof(tmp_path / "x.safetensors"), "claims 4096 bytes but only 5")


def test_header_length_over_100_mb(tmp_path: Path) -> None:
    corrupt(write_huge_header_claim(tmp_path / "x.safetensors"), "over the 100 MB")


def test_git_lfs_pointer(tmp_path: Path) -> None:
    err = corrupt(write_lfs_pointer(tmp_path / "x.safetensors"), "Git LFS pointer")
    assert err.hint is not None and "git lfs pull" in err.hint


def test_header_not_utf8(tmp_path: Path) -> None:
    corrupt(write_raw(tmp_path / "x.safetensors", b'{"\xff":1}  '), "not UTF-8")


def test_header_not_json(tmp_path: Path) -> None:
    corrupt(write_raw(tmp_path / "x.safetensors", b"{not json"), "not valid JSON")


def test_header_not_an_object(tmp_path: Path) -> None:
    corrupt(write_raw(tmp_path / "x.safetensors", b"[1, 2]  "), "header is a JSON array")


def test_duplicate_tensor_name(tmp_path: Path) -> None:
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
    raw += b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    corrupt(write_raw(tmp_path / "x.safetensors", raw, b"\0"), "tensor 'a' twice")


@pytest.mark.parametrize("metadata", [{"step": 5}, {"a": None}, ["format"], "pt"])
def test_metadata_not_str_to_str(tmp_path: Path, metadata: object) -> None:
    path = write_file(tmp_path / "x.safetensors", edit=lambda h: h.update(__metadata__=metadata))
    corrupt(path, "__metadata__")


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
def test_entry_missing_field(tmp_path: Path, field: str) -> None:
    path = write_file(tmp_path / "x.safetensors", edit=lambda h: h["a"].pop(field))
    corrupt(path, "tensor 'a'", f"has no '{field}'")


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("dtype", 32, "non-string dtype"),
        ("shape", "2x3", "invalid shape"),
        ("shape", [2.0, 3], "invalid shape"),
        ("shape", [True, 3], "invalid shape"),
        ("data_offsets", [0], "invalid data_offsets"),
        ("data_offsets", [0, "24"], "invalid data_offsets"),
        ("data_offsets", [24, 0], "end < begin"),
    ],
)
def test_entry_wrong_types(tmp_path: Path, field: str, value: object, phrase: str) -> None:
    path = write_file(tmp_path / "x.safetensors", edit=lambda h: h["a"].update({field: value}))
    corrupt(path, "tensor 'a'", phrase)


def test_entry_not_an_object(tmp_path: Path) -> None:
    path = write_file(tmp_path / "x.safetensors", edit=lambda h: h.update(a=[1, 2]))
    corrupt(path, "tensor 'a' is a JSON array")


def test_unknown_dtype(tmp_path: Path) -> None:
    path = write_file(tmp_path / "x.safetensors", edit=lambda h: h["a"].update(dtype="F12"))
    err = corrupt(path, "tensor 'a'", "unknown dtype 'F12'")
    assert err.hint is not None and "BF16" in err.hint


def test_negative_dimension(tmp_path: Path) -> None:
    path = write_file(tmp_path / "x.safetensors", edit=lambda h: h["a"].update(shape=[-2, -3]))
    corrupt(path, "tensor 'a'", "negative dimension")


def test_byte_range_does_not_match_shape(tmp_path: Path) -> None:
    path = write_file(tmp_path / "x.safetensors", edit=lambda h: h["a"].update(shape=[2, 2]))
    corrupt(path, "tensor 'a' spans 24 bytes but F32 with shape [2, 2] needs 16")


def test_overlapping_offsets(tmp_path: Path) -> None:
    specs = [("a", "U8", (4,)), ("b", "U8", (4,))]
    path = write_file(
        tmp_path / "x.safetensors", specs, edit=lambda h: h["b"].update(data_offsets=[2, 6])
    )
    corrupt(path, "tensors 'a' and 'b' overlap")


def test_gap_between_tensors(tmp_path: Path) -> None:
    specs = [("a", "U8", (4,)), ("b", "U8", (4,))]
    path = write_file(
        tmp_path / "x.safetensors",
        specs,
        edit=lambda h: h["b"].update(data_offsets=[6, 10]),
        data_delta=2,
    )
    corrupt(path, "2 unused bytes (a gap)", "tensor 'b'")


def test_first_tensor_not_at_zero_is_a_gap(tmp_path: Path) -> None:
    edit = lambda h: h["a"].update(data_offsets=[1, 25])  # noqa: E731
    path = write_file(tmp_path / "x.safetensors", [("a", "F32", (2, 3))], edit=edit, data_delta=1)
    corrupt(path, "gap", "tensor 'a'")


def test_truncated_data_area(tmp_path: Path) -> None:
    corrupt(write_truncated(tmp_path / "x.safetensors", missing=4), "file is truncated", "'b'")


def test_trailing_bytes_after_last_tensor(tmp_path: Path) -> None:
    path = write_file(tmp_path / "x.safetensors", data_delta=3)
    corrupt(path, "3 trailing bytes", "'b'")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a folder"):
        read_header(tmp_path)


def test_fifo_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file") as info:
        read_header(fifo)
    assert str(fifo) in info.value.message


def test_device_refused() -> None:
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_header(Path("/dev/zero"))


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_file(tmp_path / "x.safetensors")

    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # Monkeypatched rather than chmod: tests may run as root, which ignores file modes.
    monkeypatch.setattr(header_mod, "open", deny, raising=False)
    with pytest.raises(CheckpointError, match="permission denied") as info:
        read_header(path)
    assert str(path) in info.value.message
    assert info.value.hint is not None and "permission" in info.value.hint


def test_symlink_loop(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(CheckpointError, match="symbolic link loop") as info:
        read_header(a)
    assert str(a) in info.value.message


def test_header_length_field_is_little_endian(tmp_path: Path) -> None:
    header = encode_header(layout_header([("a", "U8", (1,))])[0])
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack(">Q", len(header)) + header + b"\0")
    corrupt(path, "over the 100 MB")
