"""write_repaired_checkpoint: round trips per layout and dtype, refusals, force, atomicity."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pss_cli.checkpoint import staging
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.formats.safetensors import writer
from pss_cli.checkpoint.formats.safetensors.header import read_header
from pss_cli.checkpoint.formats.safetensors.writer import (
    WrittenCheckpoint,
    write_repaired_checkpoint,
)
from pss_cli.checkpoint.model import CheckpointLayout
from pss_cli.errors import CheckpointError, UsageError
from tests.safetensors_factory import write_index, write_tensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PROVENANCE = {"pss_version": "0.0-test", "pss_smoothed": "fc1.weight"}
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


def net_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().to(dtype).contiguous() for k, v in TinyNet().state_dict().items()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_hashes(layout: CheckpointLayout) -> dict[str, str]:
    """sha256 of each tensor's raw byte range, read from the file itself."""
    out = {}
    for file in layout.files:
        raw = file.read_bytes()
        start = 8 + int.from_bytes(raw[:8], "little")
        for entry in read_header(file)[0]:
            begin, end = entry.data_offsets
            out[entry.name] = hashlib.sha256(raw[start + begin : start + end]).hexdigest()
    return out


def input_hashes(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): sha(p) for p in files}


def new_value(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return (tensors[name].float() * -2.0 + 0.5).to(tensors[name].dtype)


def check_round_trip(
    layout: CheckpointLayout, result: WrittenCheckpoint, replacements: dict[str, torch.Tensor]
) -> None:
    out_layout = open_checkpoint(result.out)
    assert out_layout.files == result.files
    if result.out.is_dir():
        assert [p.name for p in out_layout.files] == [p.name for p in layout.files]
    # same entries (names, dtypes, shapes, offsets), file by file
    assert [(e.name, e.dtype, e.shape, e.data_offsets) for e in out_layout.entries] == [
        (e.name, e.dtype, e.shape, e.data_offsets) for e in layout.entries
    ]
    before, after = tensor_hashes(layout), tensor_hashes(out_layout)
    for name in before:
        if name in replacements:
            assert before[name] != after[name]
        else:
            assert before[name] == after[name], name
    loaded: dict[str, torch.Tensor] = {}
    for old_file, file in zip(layout.files, out_layout.files, strict=True):
        loaded.update(load_file(str(file)))
        assert out_layout.metadata[file] == {**layout.metadata[old_file], **PROVENANCE}
    for name, value in replacements.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        assert torch.equal(loaded[name].view(torch.uint8), value.view(torch.uint8))
    assert result.replaced == tuple(sorted(replacements))
    net = TinyNet().to(next(iter(loaded.values())).dtype)
    net.load_state_dict(loaded)
    y = net(torch.ones(2, 6, dtype=net.fc1.weight.dtype))
    assert y.shape == (2, 4) and torch.isfinite(y.float()).all()
    assert not list(result.out.parent.glob(".*pss-tmp-*"))


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_file_to_file(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = net_tensors(dtype)
    src = write_tensors(tmp_path / "model.safetensors", tensors, {"format": "pt", "k": "v"})
    before = input_hashes(src)
    layout = open_checkpoint(src)
    replacements = {"fc1.weight": new_value(tensors, "fc1.weight")}
    out = tmp_path / "fixed.safetensors"
    result = write_repaired_checkpoint(layout, out, replacements, PROVENANCE)
    assert result.out == out and result.files == (out,) and result.copied == ()
    assert out.stat().st_mode == src.stat().st_mode
    check_round_trip(layout, result, replacements)
    assert input_hashes(src) == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_file_to_folder(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = net_tensors(dtype)
    (tmp_path / "in").mkdir()
    src = write_tensors(tmp_path / "in" / "model.safetensors", tensors)
    (tmp_path / "in" / "config.json").write_text("{}")  # a sibling is NOT copied for one file
    layout = open_checkpoint(src)
    replacements = {"fc2.bias": new_value(tensors, "fc2.bias")}
    out = tmp_path / "out"
    result = write_repaired_checkpoint(layout, out, replacements, PROVENANCE)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert result.files == (out / "model.safetensors",)
    check_round_trip(layout, result, replacements)


def make_sharded(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    folder.mkdir()
    tensors = net_tensors(dtype)
    first = {k: v for k, v in tensors.items() if k.startswith("fc1")}
    second = {k: v for k, v in tensors.items() if k.startswith("fc2")}
    write_tensors(folder / SHARD1, first, {"format": "pt", "shard": "1"})
    write_tensors(folder / SHARD2, second, {"format": "pt", "shard": "2"})
    weight_map = {k: SHARD1 for k in first} | {k: SHARD2 for k in second}
    write_index(folder / "model.safetensors.index.json", weight_map, {"extra_key": [1, 2]})
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    return tensors


@pytest.mark.parametrize("dtype", DTYPES)
def test_sharded(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = make_sharded(tmp_path / "in", dtype)
    before = input_hashes(tmp_path / "in")
    layout = open_checkpoint(tmp_path / "in")
    replacements = {n: new_value(tensors, n) for n in ("fc1.weight", "fc2.weight")}
    out = tmp_path / "out"
    result = write_repaired_checkpoint(layout, out, replacements, PROVENANCE)
    check_round_trip(layout, result, replacements)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    old_index = json.loads((tmp_path / "in" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == old_index["weight_map"]
    assert index["extra_key"] == [1, 2]
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in tensors.values()
    )
    assert index["metadata"]["pss_provenance"] == PROVENANCE
    assert sorted(p.name for p in result.copied) == ["config.json", "tokenizer.json"]
    for name in ("config.json", "tokenizer.json"):
        assert sha(out / name) == sha(tmp_path / "in" / name)
    assert input_hashes(tmp_path / "in") == before


def make_trainer_folder(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    folder.mkdir()
    tensors = net_tensors(dtype)
    write_tensors(folder / "model.safetensors", tensors, {"format": "pt"})
    (folder / "optimizer.pt").write_bytes(os.urandom(300))
    (folder / "scheduler.pt").write_bytes(os.urandom(100))
    (folder / "trainer_state.json").write_text('{"global_step": 10}')
    (folder / "rng_state.pth").write_bytes(os.urandom(50))
    (folder / "sub").mkdir()
    (folder / "sub" / "nested.txt").write_text("nested")
    (folder / "sub" / "skipme.bin").write_bytes(b"x")
    os.symlink("trainer_state.json", folder / "link.json")
    return tensors


@pytest.mark.parametrize("dtype", DTYPES)
def test_trainer_folder(tmp_path: Path, dtype: torch.dtype) -> None:
    src = tmp_path / "checkpoint-10"
    tensors = make_trainer_folder(src, dtype)
    before = input_hashes(src)
    layout = open_checkpoint(src)
    replacements = {"fc1.weight": new_value(tensors, "fc1.weight")}
    out = tmp_path / "checkpoint-10-fixed"
    result = write_repaired_checkpoint(layout, out, replacements, PROVENANCE)
    check_round_trip(layout, result, replacements)
    for rel in (
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state.pth",
        "sub/nested.txt",
        "sub/skipme.bin",
    ):
        assert sha(out / rel) == sha(src / rel), rel
    assert (out / "link.json").is_symlink()
    assert os.readlink(out / "link.json") == "trainer_state.json"
    assert {p.name for p in result.copied} == {
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state.pth",
        "sub",
        "link.json",
    }
    assert input_hashes(src) == before


def test_skip_copy_and_extra_files(tmp_path: Path) -> None:
    src = tmp_path / "checkpoint-10"
    tensors = make_trainer_folder(src, torch.float32)
    layout = open_checkpoint(src)
    seen: list[tuple[Path, Path]] = []

    def extra(input_root: Path, staging: Path) -> None:
        seen.append((input_root, staging))
        assert (staging / "model.safetensors").is_file()
        (staging / "optimizer.pt").write_bytes(b"new optimizer")

    def skip(path: Path) -> bool:
        return path.name in {"optimizer.pt", "skipme.bin"}

    out = tmp_path / "out"
    result = write_repaired_checkpoint(
        layout,
        out,
        {"fc1.bias": new_value(tensors, "fc1.bias")},
        PROVENANCE,
        extra_files=extra,
        skip_copy=skip,
    )
    assert seen and seen[0][0] == src and seen[0][1].parent == tmp_path
    assert (out / "optimizer.pt").read_bytes() == b"new optimizer"
    assert not (out / "sub" / "skipme.bin").exists() and (out / "sub" / "nested.txt").exists()
    assert out / "optimizer.pt" not in result.copied


def test_no_replacements_is_a_byte_copy_apart_from_metadata(tmp_path: Path) -> None:
    tensors = net_tensors(torch.float32)
    src = write_tensors(tmp_path / "m.safetensors", tensors)
    layout = open_checkpoint(src)
    out = tmp_path / "o.safetensors"
    write_repaired_checkpoint(layout, out, {}, {})
    assert tensor_hashes(open_checkpoint(out)) == tensor_hashes(layout)
    assert read_header(out)[1] == read_header(src)[1]


def test_small_chunks_stream_correctly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 7-byte chunk forces every copy and tensor write to span many chunks.
    monkeypatch.setattr(writer, "CHUNK_BYTES", 7)
    tensors = net_tensors(torch.bfloat16)
    src = write_tensors(tmp_path / "m.safetensors", tensors)
    layout = open_checkpoint(src)
    replacements = {n: new_value(tensors, n) for n in ("fc1.weight", "fc2.bias")}
    result = write_repaired_checkpoint(layout, tmp_path / "o.safetensors", replacements, PROVENANCE)
    check_round_trip(layout, result, replacements)


# ---------------------------------------------------------------------------------------------
# Refusals


def fails(exc_type: type[Exception], call: Callable[[], object], *phrases: str) -> str:
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    # phrases may be in the message or in the hint (PssError only)
    text = f"{message} | hint: {getattr(info.value, 'hint', None)}"
    for phrase in phrases:
        assert phrase in text, text
    return message


def test_refuses_out_equal_to_input(tmp_path: Path) -> None:
    src = write_tensors(tmp_path / "m.safetensors", net_tensors(torch.float32))
    layout = open_checkpoint(src)
    fails(
        UsageError,
        lambda: write_repaired_checkpoint(layout, src, {}, {}, force=True),
        "is the input checkpoint",
        str(src),
    )
    make_trainer_folder(tmp_path / "ck", torch.float32)
    layout = open_checkpoint(tmp_path / "ck")
    fails(
        UsageError,
        lambda: write_repaired_checkpoint(layout, tmp_path / "ck", {}, {}, force=True),
        "is the input checkpoint",
    )
    # the same folder spelled differently still resolves to the input
    fails(
        UsageError,
        lambda: write_repaired_checkpoint(
            layout, tmp_path / "ck" / ".." / "ck", {}, {}, force=True
        ),
        "is the input",
    )


def test_refuses_out_inside_input(tmp_path: Path) -> None:
    make_trainer_folder(tmp_path / "ck", torch.float32)
    layout = open_checkpoint(tmp_path / "ck")
    fails(
        UsageError,
        lambda: write_repaired_checkpoint(layout, tmp_path / "ck" / "fixed", {}, {}),
        "inside the input folder",
        str(tmp_path / "ck"),
    )


def test_refuses_input_inside_out(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    make_trainer_folder(tmp_path / "runs" / "ck", torch.float32)
    layout = open_checkpoint(tmp_path / "runs" / "ck")
    fails(
        UsageError,
        lambda: write_repaired_checkpoint(layout, tmp_path / "runs", {}, {}, force=True),
        "is inside the output",
    )
    src = write_tensors(tmp_path / "m.safetensors", net_tensors(torch.float32))
    single = open_checkpoint(src)
    fails(
        UsageError,
        lambda: write_repaired_checkpoint(single, tmp_path, {}, {}, force=True),
        "is inside the output",
    )
    assert src.exists()


def test_refuses_existing_out_without_force(tmp_path: Path) -> None:
    src = write_tensors(tmp_path / "m.safetensors", net_tensors(torch.float32))
    layout = open_checkpoint(src)
    (tmp_path / "o.safetensors").write_bytes(b"keep me")
    (tmp_path / "d").mkdir()
    fails(
        UsageError,
        lambda: write_repaired_checkpoint(layout, tmp_path / "o.safetensors", {}, {}),
        "already exists",
        "--force",
    )
    fails(
        UsageError,
        lambda: write_repaired_checkpoint(layout, tmp_path / "d", {}, {}),
        "already exists",
    )
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep me"


def test_refuses_missing_parent(tmp_path: Path) -> None:
    src = write_tensors(tmp_path / "m.safetensors", net_tensors(torch.float32))
    layout = open_checkpoint(src)
    fails(
        UsageError,
        lambda: write_repaired_checkpoint(layout, tmp_path / "no" / "o", {}, {}),
        "does not exist",
        str(tmp_path / "no"),
    )


def test_refuses_file_out_for_folder_input(tmp_path: Path) -> None:
    make_trainer_folder(tmp_path / "ck", torch.float32)
    layout = open_checkpoint(tmp_path / "ck")
    fails(
        UsageError,
        lambda: write_repaired_checkpoint(layout, tmp_path / "o.safetensors", {}, {}),
        "names a .safetensors file",
        "pass a folder",
    )


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        (torch.zeros(8, 6, dtype=torch.float16), "dtype"),
        (torch.zeros(6, 8), "shape"),
        (torch.zeros(8, 6).T.contiguous().T, None),  # non-contiguous but right: accepted
    ],
)
def test_replacement_checks(tmp_path: Path, value: torch.Tensor, phrase: str | None) -> None:
    src = write_tensors(tmp_path / "m.safetensors", net_tensors(torch.float32))
    layout = open_checkpoint(src)
    out = tmp_path / "o.safetensors"

    def call() -> WrittenCheckpoint:
        return write_repaired_checkpoint(layout, out, {"fc1.weight": value}, {})

    if phrase is None:
        call()
        assert torch.equal(load_file(str(out))["fc1.weight"], value)
    else:
        fails(ValueError, call, "fc1.weight", phrase)
        assert not out.exists()


def test_unknown_replacement_name(tmp_path: Path) -> None:
    src = write_tensors(tmp_path / "m.safetensors", net_tensors(torch.float32))
    layout = open_checkpoint(src)
    fails(
        ValueError,
        lambda: write_repaired_checkpoint(layout, tmp_path / "o", {"x": torch.ones(1)}, {}),
        "'x'",
    )


# ---------------------------------------------------------------------------------------------
# force, failures, concurrency


@pytest.mark.parametrize("as_file", [True, False])
def test_force_replaces(tmp_path: Path, as_file: bool) -> None:
    tensors = net_tensors(torch.float32)
    src = write_tensors(tmp_path / "m.safetensors", tensors)
    layout = open_checkpoint(src)
    out = tmp_path / ("o.safetensors" if as_file else "o")
    if as_file:
        out.write_bytes(b"old")
    else:
        out.mkdir()
        (out / "stale.txt").write_text("old")
    replacements = {"fc1.weight": new_value(tensors, "fc1.weight")}
    result = write_repaired_checkpoint(layout, out, replacements, PROVENANCE, force=True)
    check_round_trip(layout, result, replacements)
    if not as_file:
        assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.safetensors", out.name])


def test_force_restores_old_out_when_final_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_trainer_folder(tmp_path / "ck", torch.float32)
    layout = open_checkpoint(tmp_path / "ck")
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = os.rename

    def flaky(src: str | Path, dst: str | Path) -> None:
        if ".pss-tmp-" in str(src):
            raise OSError(errno.EIO, "I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    fails(
        CheckpointError,
        lambda: write_repaired_checkpoint(layout, out, {}, {}, force=True),
        "I/O error",
    )
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "o"]


@pytest.mark.parametrize("to_file", [True, False])
@pytest.mark.parametrize(
    "failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]
)
def test_failure_mid_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to_file: bool, failure: BaseException
) -> None:
    src_folder = tmp_path / "ck"
    tensors = make_trainer_folder(src_folder, torch.float32)
    layout = open_checkpoint(src_folder / "model.safetensors" if to_file else src_folder)
    before = input_hashes(src_folder)
    calls = {"n": 0}
    real = writer._write_chunk

    def failing(fout: object, chunk: bytes | memoryview) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise failure
        real(fout, chunk)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "_write_chunk", failing)
    monkeypatch.setattr(writer, "CHUNK_BYTES", 64)
    out = tmp_path / ("o.safetensors" if to_file else "o")

    def call() -> WrittenCheckpoint:
        replacements = {"fc1.weight": new_value(tensors, "fc1.weight")}
        return write_repaired_checkpoint(layout, out, replacements, PROVENANCE)

    if isinstance(failure, OSError):
        with pytest.raises(CheckpointError) as info:
            call()
        assert "no space left" in info.value.message and str(out) in info.value.message
        assert info.value.hint is not None and "free at least" in info.value.hint
    else:
        with pytest.raises(KeyboardInterrupt):
            call()
    assert not os.path.lexists(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert input_hashes(src_folder) == before


def test_concurrent_writer_finished_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer publishes `out` while we stage: our rename fails, we report "exists" and
    leave its complete output untouched."""
    make_trainer_folder(tmp_path / "ck", torch.float32)
    layout = open_checkpoint(tmp_path / "ck")
    out = tmp_path / "o"
    real_commit = staging._commit_dir

    def other_writer_first(staging: Path, target: Path, force: bool) -> None:
        target.mkdir()
        (target / "theirs.txt").write_text("complete")
        real_commit(staging, target, force)

    monkeypatch.setattr(staging, "_commit_dir", other_writer_first)
    fails(UsageError, lambda: write_repaired_checkpoint(layout, out, {}, {}), "already exists")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "o"]


def test_input_changed_since_opened(tmp_path: Path) -> None:
    src = write_tensors(tmp_path / "m.safetensors", net_tensors(torch.float32))
    layout = open_checkpoint(src)
    write_tensors(src, {"other": torch.zeros(3)})
    fails(
        CheckpointError,
        lambda: write_repaired_checkpoint(layout, tmp_path / "o", {}, {}),
        "changed since it was opened",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_safe_open_reads_metadata(tmp_path: Path) -> None:
    src = write_tensors(tmp_path / "m.safetensors", net_tensors(torch.float32), {"format": "pt"})
    out = tmp_path / "o.safetensors"
    write_repaired_checkpoint(open_checkpoint(src), out, {}, PROVENANCE)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", **PROVENANCE}
