"""open_checkpoint: single files, sharded indexes, trainer-style folders and their failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.formats.safetensors.format import SafetensorsKind as LayoutKind
from pss_cli.errors import CheckpointNotFoundError, CorruptCheckpointError, UsageError
from tests.safetensors_factory import write_file, write_index

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def make_sharded(folder: Path, index_name: str = "model.safetensors.index.json") -> Path:
    write_file(folder / SHARD1, [("emb", "F32", (4, 2)), ("h.0.w", "F16", (2, 2))], {"k": "1"})
    write_file(folder / SHARD2, [("h.1.w", "BF16", (2, 2))], {"k": "2"})
    weight_map = {"emb": SHARD1, "h.0.w": SHARD1, "h.1.w": SHARD2}
    return write_index(folder / index_name, weight_map)


def fails(exc_type: type[Exception], path: Path, *phrases: str) -> str:
    with pytest.raises(exc_type) as info:
        open_checkpoint(path)
    message: str = info.value.message  # type: ignore[attr-defined]
    for phrase in phrases:
        assert phrase in message, message
    assert "\n" not in message
    return message


def test_single_file(tmp_path: Path) -> None:
    path = write_file(tmp_path / "model.safetensors", metadata={"format": "pt"})
    layout = open_checkpoint(path)
    assert layout.kind is LayoutKind.SINGLE_FILE
    assert layout.root == path and layout.files == (path,) and layout.index_file is None
    assert [e.name for e in layout.entries] == ["a", "b"]
    assert layout.metadata == {path: {"format": "pt"}}


def test_missing_path(tmp_path: Path) -> None:
    message = fails(CheckpointNotFoundError, tmp_path / "gone", "path '", "does not exist")
    assert str(tmp_path / "gone") in message


def test_damaged_pickle_file_is_refused_clearly(tmp_path: Path) -> None:
    # .bin/.pt are read (weights_only, tests/test_format_torch.py); a damaged one is named.
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"PK\x03\x04")
    fails(CorruptCheckpointError, path, str(path), "not a readable torch checkpoint")


def test_sharded_folder(tmp_path: Path) -> None:
    index = make_sharded(tmp_path)
    layout = open_checkpoint(tmp_path)
    assert layout.kind is LayoutKind.SHARDED
    assert layout.index_file == index and layout.root == tmp_path
    assert layout.files == (tmp_path / SHARD1, tmp_path / SHARD2)
    assert [e.name for e in layout.entries] == ["emb", "h.0.w", "h.1.w"]
    assert layout.metadata == {tmp_path / SHARD1: {"k": "1"}, tmp_path / SHARD2: {"k": "2"}}


def test_sharded_index_file_given_directly(tmp_path: Path) -> None:
    index = make_sharded(tmp_path)
    layout = open_checkpoint(index)
    assert layout.kind is LayoutKind.SHARDED and layout.root == index


def test_folder_with_one_non_default_index(tmp_path: Path) -> None:
    index = make_sharded(tmp_path, "pytorch_model.safetensors.index.json")
    assert open_checkpoint(tmp_path).index_file == index


def test_folder_with_two_non_default_indexes(tmp_path: Path) -> None:
    make_sharded(tmp_path, "a.safetensors.index.json")
    make_sharded(tmp_path, "b.safetensors.index.json")
    fails(UsageError, tmp_path, "several safetensors indexes", str(tmp_path))


def test_index_wins_over_loose_files(tmp_path: Path) -> None:
    # Mistral ships consolidated.safetensors next to the HF shards: the index decides.
    make_sharded(tmp_path)
    write_file(tmp_path / "consolidated.safetensors", [("emb", "F32", (4, 2))])
    assert open_checkpoint(tmp_path).files == (tmp_path / SHARD1, tmp_path / SHARD2)


def test_missing_shard(tmp_path: Path) -> None:
    index = make_sharded(tmp_path)
    (tmp_path / SHARD2).unlink()
    fails(CorruptCheckpointError, tmp_path, f"shard '{tmp_path / SHARD2}'", f"index '{index}'")


def test_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    index = make_sharded(tmp_path)
    write_index(index, {"emb": SHARD1, "h.0.w": SHARD1, "h.1.w": SHARD2, "ghost": SHARD2})
    fails(
        CorruptCheckpointError, tmp_path, "tensor 'ghost'", str(tmp_path / SHARD2), "does not hold"
    )


def test_tensor_mapped_to_the_wrong_shard(tmp_path: Path) -> None:
    index = make_sharded(tmp_path)
    write_index(index, {"emb": SHARD1, "h.0.w": SHARD2, "h.1.w": SHARD2})
    fails(CorruptCheckpointError, tmp_path, "tensor 'h.0.w'", f"(it is in '{tmp_path / SHARD1}')")


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    make_sharded(tmp_path)
    write_file(tmp_path / SHARD2, [("h.1.w", "BF16", (2, 2)), ("emb", "F32", (4, 2))])
    fails(
        CorruptCheckpointError,
        tmp_path,
        "tensor 'emb' appears in both",
        str(tmp_path / SHARD1),
        str(tmp_path / SHARD2),
    )


def test_tensor_in_shard_but_not_in_weight_map_is_kept(tmp_path: Path) -> None:
    make_sharded(tmp_path)
    write_file(tmp_path / SHARD2, [("h.1.w", "BF16", (2, 2)), ("extra", "F32", (2, 2))])
    names = [e.name for e in open_checkpoint(tmp_path).entries]
    assert "extra" in names


def test_corrupt_shard_error_names_the_shard(tmp_path: Path) -> None:
    make_sharded(tmp_path)
    write_file(tmp_path / SHARD2, [("h.1.w", "BF16", (2, 2))], data_delta=-1)
    fails(CorruptCheckpointError, tmp_path, str(tmp_path / SHARD2), "truncated")


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "has no 'weight_map' object"),
        ('{"metadata": {}}', "has no 'weight_map' object"),
        ('{"weight_map": {"a": 3}}', "maps tensor 'a' to 3"),
    ],
)
def test_bad_index(tmp_path: Path, content: str, phrase: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    fails(CorruptCheckpointError, index, str(index), phrase)


def test_config_json_is_not_an_index(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "gpt2"}')
    fails(CorruptCheckpointError, config, "is not a safetensors index")


def test_trainer_directory(tmp_path: Path) -> None:
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (tmp_path / name).write_bytes(b"x")
    write_file(tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "sub").mkdir()
    write_file(tmp_path / "sub" / "inner.safetensors", [("deep", "F32", (2, 2))])
    layout = open_checkpoint(tmp_path)
    assert layout.kind is LayoutKind.DIRECTORY
    assert layout.files == (tmp_path / "model.safetensors",)  # non-recursive, others ignored
    assert [e.name for e in layout.entries] == ["a", "b"]
    assert layout.metadata == {tmp_path / "model.safetensors": {"format": "pt"}}


def test_directory_files_sorted_by_name(tmp_path: Path) -> None:
    write_file(tmp_path / "z.safetensors", [("z", "F32", (2, 2))])
    write_file(tmp_path / "a.safetensors", [("a", "F32", (2, 2))])
    layout = open_checkpoint(tmp_path)
    assert layout.files == (tmp_path / "a.safetensors", tmp_path / "z.safetensors")
    assert [e.name for e in layout.entries] == ["a", "z"]


def test_directory_duplicate_tensor(tmp_path: Path) -> None:
    write_file(tmp_path / "a.safetensors", [("w", "F32", (2, 2))])
    write_file(tmp_path / "b.safetensors", [("w", "F32", (2, 2))])
    fails(
        CorruptCheckpointError,
        tmp_path,
        "tensor 'w' appears in both",
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.safetensors"),
    )


def test_directory_without_safetensors(tmp_path: Path) -> None:
    # optimizer.pt is never taken for weights; with no weights file the folder is refused.
    (tmp_path / "optimizer.pt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    message = fails(
        CheckpointNotFoundError,
        tmp_path,
        f"folder '{tmp_path}' holds no .safetensors files",
        "optimizer.pt",
        "notes.txt",
    )
    assert message.count("found:") == 1
    # A weights file there is read as a torch checkpoint (here a damaged one, named).
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    fails(CorruptCheckpointError, tmp_path, "pytorch_model.bin", "not a readable torch checkpoint")


def test_empty_directory(tmp_path: Path) -> None:
    fails(CheckpointNotFoundError, tmp_path, "holds no .safetensors files (found: nothing)")


def test_runs_folder_hints_latest_checkpoint(tmp_path: Path) -> None:
    for step in (200, 1000, 50):
        (tmp_path / f"checkpoint-{step}").mkdir()
    with pytest.raises(CheckpointNotFoundError) as info:
        open_checkpoint(tmp_path)
    assert info.value.hint is not None
    assert str(tmp_path / "checkpoint-1000") in info.value.hint


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/etc/passwd", "a/../../b.safetensors"]
)
def test_index_cannot_point_outside_its_folder(tmp_path: Path, shard: str) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_index(folder / "model.safetensors.index.json", {"w": shard})
    with pytest.raises(CorruptCheckpointError, match="outside the index's folder"):
        open_checkpoint(folder)
