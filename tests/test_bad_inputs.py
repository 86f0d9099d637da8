"""The catalogue of bad and hostile inputs, driven through the real CLI.

Every case runs ``pss scan``, ``pss check`` and ``pss smooth --out`` (CliRunner on the real app)
and asserts what the table of docs/bad-input.md promises: for a refused input exactly two stderr
lines, ``Error: ...`` naming the file or tensor and ``Hint: ...``, the
documented exit code (``check`` turns it into a ``PSS002`` finding, exit 1), nothing written, no
traceback, no hang; for a handled input the documented JSON fields. ``test_readme_table_*`` parses
that table so that a row without a test, or a test without a row, fails.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

import pss_cli.checkpoint.formats.safetensors.header as header_mod
from pss_cli.app import app
from tests.format_factory import flip_bytes_in_largest_record
from tests.safetensors_factory import (
    encode_header,
    layout_header,
    write_empty,
    write_file,
    write_huge_header_claim,
    write_index,
    write_lfs_pointer,
    write_raw,
    write_short,
    write_tensors,
)

ROOT = Path(__file__).resolve().parent.parent
BAD_INPUT_DOC = ROOT / "docs" / "bad-input.md"
DIVERGED = ROOT / "sample_checkpoints" / "diverged" / "model.safetensors"
SECTION = "What pss does with bad input"
ERROR_EXIT = "3; check: 1"  # scan/smooth exit 3, check reports PSS002 and exits 1
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
# A wall-clock bound per test: a regression that blocks (open() on a FIFO, a read of /dev/zero)
# must fail the test, not hang the suite.
HANG_LIMIT_S = 60


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    def alarm(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"pss did not finish within {HANG_LIMIT_S} s (a hang)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


# ---------------------------------------------------------------------------------------------
# Builders: each makes one bad input under a folder and returns (path to pass, names the error
# must mention). Corrupt bytes are spelled out by the factory, not by the library under test.


def _valid_bytes(specs: list[tuple[str, str, tuple[int, ...]]] | None = None) -> bytes:
    header, data_len = layout_header(specs or [("a", "F32", (2, 3)), ("b", "F16", (4,))])
    raw = encode_header(header)
    return struct.pack("<Q", len(raw)) + raw + bytes(i % 251 for i in range(data_len))


def _cut(at: Callable[[bytes], int]) -> Callable[[Path], tuple[Path, list[str]]]:
    def build(tmp: Path) -> tuple[Path, list[str]]:
        whole = _valid_bytes()
        path = tmp / "model.safetensors"
        path.write_bytes(whole[: at(whole)])
        return path, [str(path)]

    return build


def _header_len(data: bytes) -> int:
    return int(struct.unpack("<Q", data[:8])[0])


def _raw(header: bytes, data: bytes = b"", declared: int | None = None) -> Callable[..., Any]:
    def build(tmp: Path) -> tuple[Path, list[str]]:
        path = write_raw(tmp / "model.safetensors", header, data, declared)
        return path, [str(path)]

    return build


def _edited(
    edit: Callable[[dict[str, Any]], None], *tensors: str, data_delta: int = 0
) -> Callable[[Path], tuple[Path, list[str]]]:
    def build(tmp: Path) -> tuple[Path, list[str]]:
        path = write_file(tmp / "model.safetensors", edit=edit, data_delta=data_delta)
        return path, [str(path), *(f"'{t}'" for t in tensors)]

    return build


def _with(path_fn: Callable[[Path], Path]) -> Callable[[Path], tuple[Path, list[str]]]:
    def build(tmp: Path) -> tuple[Path, list[str]]:
        path = path_fn(tmp / "model.safetensors")
        return path, [str(path)]

    return build


def _set(name: str, field: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header[name][field] = value

    return edit


def _sharded(tmp: Path, weight_map: dict[str, str] | None = None) -> Path:
    folder = tmp / "sharded"
    folder.mkdir()
    write_file(folder / SHARD1, [("h.0.w", "F32", (4, 3)), ("h.1.w", "F32", (4, 3))])
    write_file(folder / SHARD2, [("h.2.w", "F32", (4, 3))])
    write_index(
        folder / "model.safetensors.index.json",
        weight_map or {"h.0.w": SHARD1, "h.1.w": SHARD1, "h.2.w": SHARD2},
    )
    return folder


def _missing_shard(tmp: Path) -> tuple[Path, list[str]]:
    folder = _sharded(tmp)
    (folder / SHARD2).unlink()
    return folder, [str(folder / SHARD2)]


def _tensor_not_in_shard(tmp: Path) -> tuple[Path, list[str]]:
    folder = _sharded(tmp, {"h.0.w": SHARD1, "h.1.w": SHARD1, "h.2.w": SHARD2, "h.3.w": SHARD2})
    return folder, ["'h.3.w'", str(folder / SHARD2)]


def _tensor_in_two_shards(tmp: Path) -> tuple[Path, list[str]]:
    folder = _sharded(tmp)
    write_file(folder / SHARD2, [("h.2.w", "F32", (4, 3)), ("h.0.w", "F32", (4, 3))])
    return folder, ["'h.0.w'", str(folder / SHARD1), str(folder / SHARD2)]


def _same_tensor_in_two_files_of_a_folder(tmp: Path) -> tuple[Path, list[str]]:
    folder = tmp / "checkpoint-5"
    folder.mkdir()
    write_file(folder / "model.safetensors", [("w", "F32", (4, 3))])
    write_file(folder / "consolidated.safetensors", [("w", "F32", (4, 3))])
    return folder, ["'w'", str(folder / "model.safetensors")]


def _index_text(text: str) -> Callable[[Path], tuple[Path, list[str]]]:
    def build(tmp: Path) -> tuple[Path, list[str]]:
        folder = _sharded(tmp)
        index = folder / "model.safetensors.index.json"
        index.write_text(text)
        return folder, [str(index)]

    return build


def _index_outside(tmp: Path) -> tuple[Path, list[str]]:
    folder = _sharded(tmp, {"h.0.w": "../secret.safetensors"})
    write_file(tmp / "secret.safetensors", [("h.0.w", "F32", (4, 3))])
    return folder, ["../secret.safetensors", str(folder / "model.safetensors.index.json")]


def _empty_folder(tmp: Path) -> tuple[Path, list[str]]:
    folder = tmp / "empty"
    folder.mkdir()
    return folder, [str(folder)]


def _folder_with_other_files(tmp: Path) -> tuple[Path, list[str]]:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder, [str(folder), "config.json"]


def _runs_folder(tmp: Path) -> tuple[Path, list[str]]:
    runs = tmp / "runs"
    for step in (20, 100, 3):
        (runs / f"checkpoint-{step}").mkdir(parents=True)
        write_file(runs / f"checkpoint-{step}" / "model.safetensors")
    return runs, [str(runs)]


def _symlink_loop(tmp: Path) -> tuple[Path, list[str]]:
    a, b = tmp / "a.safetensors", tmp / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    return a, [str(a)]


def _shard_is_a_symlink_loop(tmp: Path) -> tuple[Path, list[str]]:
    folder = _sharded(tmp)
    (folder / SHARD2).unlink()
    (folder / SHARD2).symlink_to(folder / SHARD2)
    return folder, [str(folder / SHARD2)]


def _fifo(tmp: Path) -> tuple[Path, list[str]]:
    path = tmp / "model.safetensors"
    os.mkfifo(path)
    return path, [str(path)]


def _fifo_shard(tmp: Path) -> tuple[Path, list[str]]:
    folder = _sharded(tmp)
    (folder / SHARD2).unlink()
    os.mkfifo(folder / SHARD2)
    return folder, [str(folder / SHARD2)]


def _fifo_index(tmp: Path) -> tuple[Path, list[str]]:
    folder = _sharded(tmp)
    index = folder / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    return index, [str(index)]


def _socket(tmp: Path) -> tuple[Path, list[str]]:
    path = tmp / "s.safetensors"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))  # the socket file stays after close
    server.close()
    return path, [str(path)]


def _device(_tmp: Path) -> tuple[Path, list[str]]:
    return Path("/dev/zero"), ["/dev/zero"]


def _duplicate_name(tmp: Path) -> tuple[Path, list[str]]:
    entry = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    raw = f'{{"a":{entry},"a":{entry}}}'.encode()
    path = write_raw(tmp / "model.safetensors", raw + b" " * (-len(raw) % 8), b"\0")
    return path, [str(path), "'a'"]


def _control_characters_in_name(tmp: Path) -> tuple[Path, list[str]]:
    name = "evil\nError: forged line\x1b[2J"
    path = write_file(
        tmp / "model.safetensors", [(name, "F32", (2, 2))], edit=_set(name, "dtype", "F99")
    )
    return path, [str(path), "'evil\\nError: forged line\\x1b[2J'"]


def _lone_surrogate_name(tmp: Path) -> tuple[Path, list[str]]:
    raw = b'{"w\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    path = write_raw(tmp / "model.safetensors", raw + b" " * (-len(raw) % 8), b"\0")
    return path, [str(path), "w\\ud800"]


def _permission_denied(tmp: Path) -> tuple[Path, list[str]]:
    path = write_file(tmp / "model.safetensors")
    path.chmod(0)
    return path, [str(path)]


@dataclass(frozen=True)
class Case:
    id: str
    row: str  # the docs/bad-input.md table row (first column) this case documents
    build: Callable[[Path], tuple[Path, list[str]]]
    phrase: str  # a distinctive part of the error message
    hint: str = ""  # a part of the hint, where the hint is the point


ERROR_CASES = [
    Case("empty-file", "empty file (0 bytes)", _with(write_empty), "file is empty"),
    Case(
        "shorter-than-8",
        "file shorter than its 8-byte length field",
        _with(write_short),
        "too short",
    ),
    Case(
        "cut-in-header",
        "truncated file, cut in the header",
        _cut(lambda b: 8 + _header_len(b) // 2),
        "but only",
    ),
    Case(
        "cut-in-data",
        "truncated file, cut in the data",
        _cut(lambda b: len(b) - 3),
        "file is truncated",
    ),
    Case(
        "cut-after-header",
        "truncated file, cut in the data",
        _cut(lambda b: 8 + _header_len(b)),
        "file is truncated",
    ),
    Case(
        "header-past-eof",
        "header length larger than the file",
        _raw(b'{"a":', declared=4096),
        "claims 4096 bytes but only",
    ),
    Case(
        "header-over-100mb",
        "header length over 100 MB claimed",
        _with(write_huge_header_claim),
        "over the 100 MB",
    ),
    Case("header-not-json", "header not UTF-8, or not JSON", _raw(b"not json"), "not valid JSON"),
    Case(
        "header-not-utf8", "header not UTF-8, or not JSON", _raw(b'{"\xff\xfe":1}  '), "not UTF-8"
    ),
    Case(
        "header-array",
        "header JSON that is not an object",
        _raw(b"[1,2,3] "),
        "JSON array, expected an object",
    ),
    Case(
        "header-string",
        "header JSON that is not an object",
        _raw(b'"abc"   '),
        "JSON string, expected an object",
    ),
    Case(
        "header-deep",
        "header nested thousands deep, or an integer of thousands of digits",
        _raw(b"[" * 100_000 + b"]" * 100_000),
        "nested too deeply",
    ),
    Case(
        "header-huge-int",
        "header nested thousands deep, or an integer of thousands of digits",
        _raw(b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,1]}}'),
        "thousands of digits",
    ),
    Case(
        "lone-surrogate",
        "tensor name or metadata that is not valid Unicode",
        _lone_surrogate_name,
        "not valid Unicode",
    ),
    Case(
        "control-characters",
        "control characters (newline, ANSI escape) in a tensor name",
        _control_characters_in_name,
        "unknown dtype 'F99'",
    ),
    Case(
        "unknown-dtype",
        "unknown dtype",
        _edited(_set("a", "dtype", "F128"), "a"),
        "unknown dtype 'F128'",
    ),
    Case(
        "shape-vs-bytes",
        "shape and byte range that disagree",
        _edited(_set("a", "shape", [3, 3]), "a"),
        "but F32 with shape [3, 3] needs 36",
    ),
    Case(
        "negative-dim",
        "malformed tensor entry (missing field, negative or non-integer dimension, bad offsets)",
        _edited(_set("a", "shape", [-2, -3]), "a"),
        "negative dimension",
    ),
    Case(
        "float-dim",
        "malformed tensor entry (missing field, negative or non-integer dimension, bad offsets)",
        _edited(_set("a", "shape", [2.0, 3]), "a"),
        "invalid shape",
    ),
    Case(
        "no-offsets",
        "malformed tensor entry (missing field, negative or non-integer dimension, bad offsets)",
        _edited(lambda h: h["b"].pop("data_offsets"), "b"),
        "has no 'data_offsets'",
    ),
    Case(
        "reversed-offsets",
        "malformed tensor entry (missing field, negative or non-integer dimension, bad offsets)",
        _edited(_set("b", "data_offsets", [32, 24]), "b"),
        "end < begin",
    ),
    Case(
        "overlap",
        "overlapping data offsets",
        _edited(_set("b", "data_offsets", [20, 28]), "a", "b", data_delta=-4),
        "overlap",
    ),
    Case(
        "gap",
        "gapped data offsets, or trailing bytes after the last tensor",
        _edited(_set("b", "data_offsets", [28, 36]), "b", data_delta=4),
        "gap",
    ),
    Case(
        "trailing-bytes",
        "gapped data offsets, or trailing bytes after the last tensor",
        _edited(lambda h: None, "b", data_delta=16),
        "16 trailing bytes",
    ),
    Case("duplicate-name", "the same tensor twice in one header", _duplicate_name, "twice"),
    Case(
        "metadata-not-strings",
        "`__metadata__` that is not string to string",
        _edited(lambda h: h.__setitem__("__metadata__", {"step": 100})),
        "__metadata__",
    ),
    Case(
        "lfs-pointer",
        "a Git LFS pointer file instead of weights",
        _with(write_lfs_pointer),
        "Git LFS pointer",
        hint="git lfs pull",
    ),
    Case(
        "missing-path",
        "a path that does not exist",
        lambda tmp: (tmp / "nope.safetensors", [str(tmp / "nope.safetensors")]),
        "does not exist",
    ),
    Case("empty-folder", "a folder with no checkpoint", _empty_folder, "holds no .safetensors"),
    Case(
        "folder-other-files",
        "a folder with no checkpoint",
        _folder_with_other_files,
        "holds no .safetensors",
    ),
    Case(
        "runs-folder",
        "a folder with no checkpoint",
        _runs_folder,
        "holds no .safetensors",
        hint="/checkpoint-100'",  # the latest step, not the first or last listed
    ),
    Case("missing-shard", "an index naming a missing shard", _missing_shard, "does not exist"),
    Case(
        "tensor-not-in-shard",
        "an index naming a tensor missing from its shard",
        _tensor_not_in_shard,
        "does not hold it",
    ),
    Case(
        "tensor-in-two-shards",
        "the same tensor in two shards (or two files of a folder)",
        _tensor_in_two_shards,
        "appears in both",
    ),
    Case(
        "tensor-in-two-files",
        "the same tensor in two shards (or two files of a folder)",
        _same_tensor_in_two_files_of_a_folder,
        "appears in both",
    ),
    Case(
        "index-not-json",
        "an index that is not JSON, has no `weight_map` or points outside its folder",
        _index_text("{oops"),
        "not valid JSON",
    ),
    Case(
        "index-no-weight-map",
        "an index that is not JSON, has no `weight_map` or points outside its folder",
        _index_text('{"metadata": {}}'),
        "no 'weight_map'",
    ),
    Case(
        "index-deep",
        "an index that is not JSON, has no `weight_map` or points outside its folder",
        _index_text("[" * 100_000 + "]" * 100_000),
        "not a usable JSON",
    ),
    Case(
        "index-outside",
        "an index that is not JSON, has no `weight_map` or points outside its folder",
        _index_outside,
        "outside the index's folder",
    ),
    Case("permission-denied", "unreadable permissions", _permission_denied, "permission denied"),
    Case("symlink-loop", "a symlink loop", _symlink_loop, "symbolic link loop"),
    Case("shard-symlink-loop", "a symlink loop", _shard_is_a_symlink_loop, "symbolic link loop"),
    Case(
        "fifo",
        "a FIFO (named pipe), socket or device instead of a file",
        _fifo,
        "not a regular file",
    ),
    Case(
        "fifo-shard",
        "a FIFO (named pipe), socket or device instead of a file",
        _fifo_shard,
        "not a regular file",
    ),
    Case(
        "fifo-index",
        "a FIFO (named pipe), socket or device instead of a file",
        _fifo_index,
        "not a regular file",
    ),
    Case(
        "socket",
        "a FIFO (named pipe), socket or device instead of a file",
        _socket,
        "not a regular file",
    ),
    Case(
        "device",
        "a FIFO (named pipe), socket or device instead of a file",
        _device,
        "not a regular file",
    ),
]


def _deny_reads_as_root(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Root ignores file modes, so a chmod 000 file stays readable: make opening that one file
    fail as the kernel would for an ordinary user (tests here run as root; users do not)."""
    real_open = open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(header_mod, "open", guarded_open, raising=False)


def _assert_refused(
    result: Result, exit_code: int, named: list[str], phrase: str, hint_phrase: str = ""
) -> None:
    assert result.exit_code == exit_code, (result.exit_code, result.stderr, result.stdout)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    error, hint = lines
    assert error.startswith("Error: ") and hint.startswith("Hint: ") and len(hint) > 10
    assert phrase in error, error
    assert hint_phrase in hint, hint
    for name in named:
        assert name in error, (name, error)
    assert "internal error" not in error and "Traceback" not in result.stderr
    assert error.isprintable() and hint.isprintable()


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.id for c in ERROR_CASES])
def test_refused_with_one_error_line_and_a_hint(
    case: Case, runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "in"
    work.mkdir()
    path, named = case.build(work)
    if case.id == "permission-denied" and os.geteuid() == 0:
        _deny_reads_as_root(monkeypatch, path)
    before = _snapshot(work)

    scan = runner.invoke(app, ["scan", str(path)])
    _assert_refused(scan, 3, named, case.phrase, case.hint)
    _assert_refused(runner.invoke(app, ["scan", str(path), "-f", "json"]), 3, named, case.phrase)
    out = tmp_path / "out"
    smooth = runner.invoke(app, ["smooth", str(path), "--out", str(out), "-q"])
    _assert_refused(smooth, 3, named, case.phrase)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    _assert_refused(
        runner.invoke(app, ["smooth", str(path), "--dry-run", "-q"]), 3, named, case.phrase
    )

    check = runner.invoke(app, ["check", str(path)])
    assert check.exit_code == 1, (check.stdout, check.stderr)
    finding, verdict = check.stdout.splitlines()
    assert "PSS002 [error]" in finding and case.phrase in finding
    assert all(name in finding for name in named)
    assert finding.isprintable() and verdict.startswith("pss check failed")
    assert "Traceback" not in check.stderr + check.stdout
    check_json = runner.invoke(app, ["check", str(path), "-f", "json", "-q"])
    assert check_json.exit_code == 1
    assert [f["rule"] for f in json.loads(check_json.stdout)["findings"]] == ["PSS002"]

    assert _snapshot(work) == before  # the input is never modified, whatever happened


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file bytes, or what a special file or link is."""
    seen: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            seen[key] = "link -> " + os.readlink(path)
        elif path.is_dir():
            seen[key] = "dir"
        elif path.is_file():
            try:
                seen[key] = path.read_bytes()
            except PermissionError:
                seen[key] = "unreadable"
        else:
            seen[key] = "special"
    return seen


# ---------------------------------------------------------------------------------------------
# Inputs that are handled: analysed, or listed under `skipped` with the reason.


def _scan_json(runner: CliRunner, path: Path) -> dict[str, Any]:
    result = runner.invoke(app, ["scan", str(path), "-f", "json", "-q"])
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _layer(report: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [x for x in report["layers"] if x["name"] == name]
    assert len(matches) == 1, [x["name"] for x in report["layers"]]
    return matches[0]


def _skip_reason(report: dict[str, Any], name: str) -> str:
    reasons = [s["reason"] for s in report["skipped"] if s["name"] == name]
    assert len(reasons) == 1, report["skipped"]
    reason: str = reasons[0]
    return reason


def _check_exit(runner: CliRunner, path: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["check", str(path), "--ignore", "PSS005", "--ignore", "PSS006"])
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout


def _top_singular(matrix: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(matrix.double())[0])


def test_nan_and_inf_weights(runner: CliRunner, tmp_path: Path) -> None:
    torch.manual_seed(0)
    nan, inf = torch.randn(24, 40), torch.randn(24, 40, dtype=torch.float64)
    nan[3, 7] = float("nan")
    inf[0, 0], inf[1, 1] = float("inf"), float("-inf")
    path = write_tensors(
        tmp_path / "m.safetensors",
        {"nan.weight": nan, "inf.weight": inf, "ok.weight": torch.randn(24, 40)},
    )
    report = _scan_json(runner, path)
    for name, count in (("nan.weight", 1), ("inf.weight", 2)):
        layer = _layer(report, name)
        assert layer["flags"] == ["nonfinite"] and layer["nonfinite_count"] == count
        assert layer["sigma_max"] is None and layer["stable_rank"] is None
    assert _layer(report, "ok.weight")["stable_rank"] is not None
    assert report["summary"]["nonfinite_matrices"] == 2
    code, text = _check_exit(runner, path)
    assert code == 1 and text.count("PSS001") == 2
    dry = runner.invoke(app, ["smooth", str(path), "--dry-run", "--all", "-f", "json", "-q"])
    assert dry.exit_code == 0, dry.stderr
    left = {x["name"]: x["reason"] for x in json.loads(dry.stdout)["not_smoothed"]}
    assert "NaN/Inf" in left["nan.weight"] and "NaN/Inf" in left["inf.weight"]


def test_all_zero_matrix(runner: CliRunner, tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = write_tensors(
        tmp_path / "m.safetensors",
        {
            "zero_init.weight": torch.zeros(64, 8),
            "zero16.weight": torch.zeros(600, 700, dtype=torch.float16),  # the Krylov path
            "ok.weight": torch.randn(64, 48),
        },
    )
    report = _scan_json(runner, path)
    for name in ("zero_init.weight", "zero16.weight"):
        layer = _layer(report, name)
        # sigma_max = 0: SR = ||W||_F^2 / sigma_max^2 is 0/0, so null and a flag, never a
        # division by zero or a made-up number
        assert layer["sigma_max"] == 0.0 and layer["frobenius_norm"] == 0.0
        assert layer["stable_rank"] is None and layer["flags"] == ["zero_matrix"]
        assert layer["sigma1_over_sigma2"] is None and layer["topk_energy_share"] is None
    assert report["summary"]["flag_counts"] == {"zero_matrix": 2}
    code, text = _check_exit(runner, path)
    assert code == 0, text  # an undefined stable rank is not a PSS003 finding
    dry = runner.invoke(
        app, ["smooth", str(path), "--dry-run", "--layers", "*", "-f", "json", "-q"]
    )
    assert dry.exit_code == 0, dry.stderr
    left = {x["name"]: x["reason"] for x in json.loads(dry.stdout)["not_smoothed"]}
    assert "all-zero" in left["zero_init.weight"]


def test_one_by_n_and_n_by_one(runner: CliRunner, tmp_path: Path) -> None:
    path = write_tensors(
        tmp_path / "m.safetensors",
        {
            "row.weight": torch.randn(1, 100_000),
            "col.weight": torch.randn(100_000, 1),
            "one.weight": torch.randn(1, 1),
            "stack.weight": torch.randn(4, 1, 30),  # 3-D stack of 1 x 30 matrices
            "ok.weight": torch.randn(30, 20),
        },
    )
    report = _scan_json(runner, path)
    assert [x["name"] for x in report["layers"]] == ["ok.weight"]
    for name in ("row.weight", "col.weight", "one.weight", "stack.weight"):
        # a rank-1 matrix always has stable rank 1: a number, but no information
        assert "dimension of 1" in _skip_reason(report, name)
    code, text = _check_exit(runner, path)
    assert code == 0, text


def test_extreme_aspect_ratios(runner: CliRunner, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {
        "wide.weight": torch.randn(2, 100_000),
        "tall.weight": torch.randn(100_000, 2) * torch.tensor([3.0, 0.5]),
        "thin.weight": torch.randn(3, 40_000, dtype=torch.float16),
        "long.weight": torch.randn(6_000, 600),  # short side > 512: block Krylov
    }
    path = write_tensors(tmp_path / "m.safetensors", tensors)
    report = _scan_json(runner, path)
    for name, tensor in tensors.items():
        layer = _layer(report, name)
        assert layer["matrix_shape"] == list(tensor.shape)
        assert layer["sigma_max"] == pytest.approx(_top_singular(tensor), rel=1e-3)
        assert 1.0 <= layer["stable_rank"] <= min(tensor.shape) * (1 + 1e-6)
    assert _layer(report, "tall.weight")["stable_rank"] == pytest.approx(
        1 + (0.5 / 3.0) ** 2, rel=0.02
    )
    code, _ = _check_exit(runner, path)
    assert code in (0, 1)


def test_integer_tensors_without_a_scale_are_skipped(runner: CliRunner, tmp_path: Path) -> None:
    path = write_tensors(
        tmp_path / "m.safetensors",
        {
            "q.weight": torch.randint(-128, 127, (32, 16), dtype=torch.int8),
            "u.weight": torch.randint(0, 255, (32, 16), dtype=torch.uint8),
            "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
            "ok.weight": torch.randn(32, 16),
        },
    )
    report = _scan_json(runner, path)
    assert "I8" in _skip_reason(report, "q.weight")
    assert "U8" in _skip_reason(report, "u.weight")
    assert "I64" in _skip_reason(report, "ids")
    assert [x["name"] for x in report["layers"]] == ["ok.weight"]


FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def test_bool_and_fp8_without_a_scale_are_skipped(runner: CliRunner, tmp_path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {"mask": torch.ones(8, 8, dtype=torch.bool)}
    for code, dtype in FP8.items():
        tensors[f"{code}.weight"] = torch.randn(16, 8).to(dtype)
    path = write_tensors(tmp_path / "m.safetensors", tensors)
    report = _scan_json(runner, path)
    assert report["layers"] == []
    assert "BOOL" in _skip_reason(report, "mask")
    for code in FP8:
        assert f"{code} (8-bit float without a scale" in _skip_reason(report, f"{code}.weight")


@pytest.mark.parametrize("qdtype", ["I8", "U8", *FP8])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_quantized_with_a_scale_is_dequantized(
    runner: CliRunner, tmp_path: Path, qdtype: str, per_channel: bool
) -> None:
    torch.manual_seed(1)
    m, n = 48, 40
    if qdtype == "I8":
        q = torch.randint(-127, 128, (m, n), dtype=torch.int8)
    elif qdtype == "U8":
        q = torch.randint(0, 256, (m, n), dtype=torch.uint8)
    else:
        q = (torch.randn(m, n) * 4).to(FP8[qdtype])
    scale = torch.rand(m, 1) + 0.01 if per_channel else torch.tensor(0.02)
    path = write_tensors(tmp_path / "m.safetensors", {"l.weight": q, "l.weight_scale": scale})
    layer = _layer(_scan_json(runner, path), "l.weight")
    assert layer["scale_tensor"] == "l.weight_scale" and layer["dtype"] == qdtype
    dequantized = q.to(torch.float64) * scale.to(torch.float64)
    assert layer["sigma_max"] == pytest.approx(_top_singular(dequantized), rel=1e-4)
    raw = _top_singular(q.to(torch.float64))
    assert layer["sigma_max"] != pytest.approx(raw, rel=1e-2)  # not the raw integers'


def test_asymmetric_quantization_uses_its_zero_point(runner: CliRunner, tmp_path: Path) -> None:
    torch.manual_seed(2)
    q = torch.randint(0, 256, (48, 40), dtype=torch.uint8)
    scale, zero = torch.rand(48, 1) * 0.02 + 0.01, torch.full((48, 1), 128, dtype=torch.uint8)
    path = write_tensors(
        tmp_path / "m.safetensors",
        {"l.weight": q, "l.weight_scale": scale, "l.weight_zero_point": zero},
    )
    report = _scan_json(runner, path)
    dequantized = (q.double() - zero.double()) * scale.double()
    assert _layer(report, "l.weight")["sigma_max"] == pytest.approx(
        _top_singular(dequantized), rel=1e-4
    )
    assert _skip_reason(report, "l.weight_zero_point").startswith("zero point of quantized")


def test_block_wise_fp8_scales_are_tiled_never_guessed(runner: CliRunner, tmp_path: Path) -> None:
    torch.manual_seed(3)
    q = (torch.randn(256, 384) * 4).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3) + 0.1  # one per 128 x 128 block
    odd = (torch.randn(300, 200) * 4).to(torch.float8_e4m3fn)
    odd_scale = torch.rand(7, 3) + 0.1  # no 128 block, and no exact division: ambiguous
    path = write_tensors(
        tmp_path / "m.safetensors",
        {
            "a.weight": q,
            "a.weight_scale_inv": scale,
            "b.weight": odd,
            "b.weight_scale_inv": odd_scale,
        },
    )
    report = _scan_json(runner, path)
    tiled = scale.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert _layer(report, "a.weight")["sigma_max"] == pytest.approx(
        _top_singular(q.double() * tiled), rel=1e-4
    )
    assert "neither broadcasts nor tiles" in _skip_reason(report, "b.weight")  # names its scale
    assert _skip_reason(report, "b.weight_scale_inv").startswith("quantization metadata")


def test_quantization_metadata_is_skipped(runner: CliRunner, tmp_path: Path) -> None:
    torch.manual_seed(4)
    n = "model.layers.0.mlp.up_proj"
    path = write_tensors(
        tmp_path / "m.safetensors",
        {
            f"{n}.qweight": torch.randint(-(2**31), 2**31 - 1, (32, 128)).int(),
            f"{n}.qzeros": torch.randint(0, 2**31 - 1, (2, 16)).int(),
            f"{n}.scales": (torch.rand(2, 128) * 0.01 + 0.01).half(),
            f"{n}.g_idx": torch.arange(256, dtype=torch.int32) // 128,
            "x.weight.absmax": torch.rand(8, 8),
            "x.input_scale": torch.rand(4, 4),
            "ok.weight": torch.randn(16, 12),
        },
    )
    report = _scan_json(runner, path)
    assert [x["name"] for x in report["layers"]] == ["ok.weight"]
    for name in (f"{n}.scales", f"{n}.qzeros", "x.weight.absmax", "x.input_scale"):
        assert _skip_reason(report, name).startswith("quantization metadata"), name
    assert _skip_reason(report, f"{n}.qweight").startswith("packed quantized weights")


def test_empty_tensor_is_skipped(runner: CliRunner, tmp_path: Path) -> None:
    path = write_tensors(
        tmp_path / "m.safetensors",
        {"e.weight": torch.zeros(0, 16), "ok.weight": torch.randn(16, 8)},
    )
    report = _scan_json(runner, path)
    assert "empty tensor" in _skip_reason(report, "e.weight")


def test_control_characters_in_a_valid_name(runner: CliRunner, tmp_path: Path) -> None:
    name = "h.0\n::error::forged\r\x1b[2J.weight"
    collapsed = torch.outer(torch.linspace(1, 2, 40), torch.linspace(-1, 1, 30))
    path = write_tensors(tmp_path / "m.safetensors", {name: collapsed + 1e-3})
    report = _scan_json(runner, path)
    assert _layer(report, name)["flags"] == ["low_stable_rank"]  # the exact name, via JSON
    result = runner.invoke(app, ["check", str(path), "--ignore", "PSS005", "--ignore", "PSS006"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].count("PSS003") == 1, lines
    assert "\\n::error::forged\\r\\x1b[2J" in lines[0]
    assert all(line.isprintable() and not line.startswith("::") for line in lines)


def test_header_without_tensors(runner: CliRunner, tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", encode_header({"__metadata__": {"a": "b"}}))
    report = _scan_json(runner, path)
    assert report["layers"] == [] and report["skipped"] == []
    assert report["summary"]["matrices"] == 0
    code, text = _check_exit(runner, path)
    assert code == 1 and "PSS002" in text


# ---------------------------------------------------------------------------------------------
# Pickles in a training folder: the optimizer state is the only one pss ever loads, and only
# through torch.load(weights_only=True); everything else is copied as bytes.


class _RunsCode:
    """Unpickling calls ``func(*args)``: any callable a pickle names can be run this way."""

    def __init__(self, func: Callable[..., object], *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.func, self.args


def _zip_reduce_open(path: Path, marker: Path) -> None:
    state = {"state": {}, "param_groups": [], "x": _RunsCode(open, str(marker), "w")}
    torch.save(state, path)


def _zip_os_system(path: Path, marker: Path) -> None:
    torch.save({"state": {0: _RunsCode(os.system, f"touch '{marker}'")}}, path)


def _legacy_global_os_system(path: Path, marker: Path) -> None:
    # Protocol-0 pickle written by hand (no torch zip container): GLOBAL os.system, then call.
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")


def _legacy_reduce(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_RunsCode(open, str(marker), "w"), protocol=2))


PICKLES = {
    "zip-reduce-open": _zip_reduce_open,
    "zip-global-os-system": _zip_os_system,
    "legacy-global-os-system": _legacy_global_os_system,
    "legacy-reduce-open": _legacy_reduce,
}


def _trainer_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoint-100"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(DIVERGED.read_bytes())
    (folder / "trainer_state.json").write_text('{"global_step": 100}')
    return folder


def _payload_is_live(make: Callable[[Path, Path], None], tmp_path: Path) -> None:
    """The crafted file really runs code when unpickled without restrictions (else the test
    below could pass for the wrong reason)."""
    probe, marker = tmp_path / "probe.pt", tmp_path / "probe-marker"
    make(probe, marker)
    if zipfile.is_zipfile(probe):
        torch.load(probe, weights_only=False)
    else:
        pickle.loads(probe.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", list(PICKLES))
def test_optimizer_pickle_that_runs_code_is_refused(
    runner: CliRunner, tmp_path: Path, kind: str
) -> None:
    _payload_is_live(PICKLES[kind], tmp_path)
    folder = _trainer_folder(tmp_path)
    marker = tmp_path / "PWNED"
    PICKLES[kind](folder / "optimizer.pt", marker)
    before = _snapshot(folder)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["smooth", str(folder), "--out", str(out), "-q", "--optimizer-state", "reset"]
    )
    _assert_refused(result, 3, [str(folder / "optimizer.pt")], "cannot be loaded safely")
    assert "--optimizer-state keep" in result.stderr and "drop" in result.stderr
    assert not marker.exists()
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    assert _snapshot(folder) == before
    # keep / drop never load it: keep copies its bytes, drop leaves it out
    for policy in ("keep", "drop"):
        target = tmp_path / f"out-{policy}"
        done = runner.invoke(
            app,
            ["smooth", str(folder), "--out", str(target), "-q", "--optimizer-state", policy],
        )
        assert done.exit_code == 0, done.stderr
        copied = target / "optimizer.pt"
        if policy == "keep":
            assert copied.read_bytes() == (folder / "optimizer.pt").read_bytes()
        else:
            assert not copied.exists()
    assert not marker.exists()


def test_other_pickles_in_the_folder_are_copied_never_loaded(
    runner: CliRunner, tmp_path: Path
) -> None:
    folder = _trainer_folder(tmp_path)
    marker = tmp_path / "PWNED"
    for name in ("scheduler.pt", "rng_state.pth", "training_args.bin"):
        _zip_os_system(folder / name, marker)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["smooth", str(folder), "--out", str(out), "-q", "--optimizer-state", "reset"]
    )
    assert result.exit_code == 0, result.stderr
    for name in ("scheduler.pt", "rng_state.pth", "training_args.bin"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    assert _scan_json(runner, folder)["summary"]["matrices"] > 0
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
def _invoke(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_pickle_with_plain_data_hyperparameters_needs_the_opt_in(tmp_path: Path) -> None:
    """A Lightning-style .ckpt whose hyperparameters hold a pathlib.Path: refused with the
    opt-in named; read with --allow-pickle-types; check reports PSS002 without it."""
    import argparse
    import pathlib

    path = tmp_path / "epoch=0-step=5.ckpt"
    weights = {"w": torch.randn(8, 6, generator=torch.Generator().manual_seed(0))}
    extra = {"data": pathlib.Path("/d"), "args": argparse.Namespace(a=1)}
    torch.save({"state_dict": weights, "hyper_parameters": extra}, path)
    refused = _invoke("scan", path, "-q")
    assert refused.exit_code == 3 and "--allow-pickle-types" in refused.stderr
    assert _invoke("check", path, "-q").exit_code == 1
    assert _invoke("scan", path, "-q", "--allow-pickle-types").exit_code == 0


def _spiked_file(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    from tests.spectra_factory import spiky, with_spectrum

    path = tmp_path / "in" / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"h.0.mlp.c_fc.weight": with_spectrum(24, 48, spiky(24), 0).float()}, str(path))
    return path


def test_smooth_out_in_an_unwritable_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pss_cli.checkpoint.out_checks as out_checks

    def read_only(*_a: object, **_k: object) -> tuple[int, str]:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(out_checks.tempfile, "mkstemp", read_only)
    result = _invoke("smooth", _spiked_file(tmp_path), "--out", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "is not writable" in result.stderr


def test_smooth_out_that_another_run_is_writing(tmp_path: Path) -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".o.safetensors.pss-tmp-{child.pid}-x.safetensors").write_bytes(b"")
        result = _invoke("smooth", _spiked_file(tmp_path), "--out", tmp_path / "o.safetensors")
    finally:
        child.kill()
        child.wait()
    assert result.exit_code == 2 and "another pss process is writing" in result.stderr


def test_smooth_file_out_inside_a_checkpoint_folder(tmp_path: Path) -> None:
    source = _spiked_file(tmp_path)
    (source.parent / "config.json").write_text("{}")
    result = _invoke("smooth", source, "--out", source.parent / "smoothed.safetensors")
    assert result.exit_code == 2 and "second weights file" in result.stderr


def test_smooth_out_names_a_file_of_another_format(tmp_path: Path) -> None:
    source = _spiked_file(tmp_path)
    for name in ("o.pt", "o.bin", "o.ckpt"):
        result = _invoke("smooth", source, "--out", tmp_path / name)
        assert result.exit_code == 2 and "keeps the input's format" in result.stderr, name
        assert "'o.safetensors'" in result.stderr and not (tmp_path / name).exists()
    folder = tmp_path / "ck"
    folder.mkdir()
    source.rename(folder / "model.safetensors")
    result = _invoke("smooth", folder, "--out", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "names a .safetensors file" in result.stderr


def test_stale_staging_from_a_killed_smooth(tmp_path: Path) -> None:
    stale = tmp_path / ".old.pss-tmp-x"  # no live PID: a killed run's (or an old version's)
    stale.mkdir()
    result = _invoke(
        "smooth", _spiked_file(tmp_path), "--out", tmp_path / "o.safetensors", "--clean-stale"
    )
    assert result.exit_code == 0 and "removed 1 stale staging entry" in result.stdout
    assert not stale.exists()


def test_lr_scale_without_optimizer_state(tmp_path: Path) -> None:
    result = _invoke(
        "smooth", _spiked_file(tmp_path), "--lr-scale", "0.5", "--out", tmp_path / "o.safetensors"
    )
    assert result.exit_code == 2 and "nothing to scale" in result.stderr


def test_check_output_in_an_unwritable_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pss_cli.report.files as files

    def read_only(*_a: object, **_k: object) -> tuple[int, str]:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    result = _invoke("check", _spiked_file(tmp_path), "-o", tmp_path / "r.txt", "-q")
    assert result.exit_code == 2 and "not writable" in result.stderr


# The docs/bad-input.md table mirrors this module.


def test_damaged_zip_record(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.manual_seed(5)
    torch.save({"a.weight": torch.randn(64, 48), "b.weight": torch.randn(32, 32)}, path)
    flip_bytes_in_largest_record(path)
    result = runner.invoke(app, ["scan", str(path)])
    assert result.exit_code == 3 and "CRC-32" in result.stderr
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1 and "PSS002" in result.stdout


@pytest.mark.parametrize("content", ["tensor", "list"])
def test_a_pt_without_names(runner: CliRunner, tmp_path: Path, content: str) -> None:
    path = tmp_path / "weights.pt"
    weights = torch.randn(32, 16)
    torch.save(weights if content == "tensor" else [{"w": weights}], path)
    result = runner.invoke(app, ["scan", str(path)])
    assert result.exit_code == 3 and "not a state dict" in result.stderr
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1 and "PSS002" in result.stdout


@pytest.mark.parametrize(
    ("name", "saver", "says"),
    [
        ("weights.pt", "safetensors", "is a safetensors file, whatever its name"),
        ("weights.safetensors", "torch", "is a torch checkpoint (torch.save), whatever its name"),
        ("weights", "torch", "is a torch checkpoint (torch.save), whatever its name"),
        ("legacy.safetensors", "legacy", "is a torch checkpoint (torch.save), whatever its name"),
    ],
)
def test_a_checkpoint_named_for_another_format_says_what_it_is(
    tmp_path: Path, name: str, saver: str, says: str
) -> None:
    # pss picks the format by name; a file of the other format said only "header length field
    # claims 578712552184433488 bytes" or "Unsupported operand 160".
    import torch
    from safetensors.torch import save_file

    path = tmp_path / name
    tensors = {"w": torch.randn(8, 8)}
    if saver == "safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path, _use_new_zipfile_serialization=saver == "torch")
    result = CliRunner().invoke(app, ["scan", str(path)])
    assert result.exit_code == 3
    error, hint = result.stderr.strip().splitlines()
    assert error.startswith("Error: ") and "not a" in error
    suffix = ".safetensors" if saver == "safetensors" else ".pt"
    assert hint == f"Hint: '{name}' {says}: name it {suffix}"
    check = CliRunner().invoke(app, ["check", str(path)])
    assert check.exit_code == 1 and "PSS002" in check.stdout


HANDLED_ROWS = {
    "NaN or Inf weights": ("0; check: 1", test_nan_and_inf_weights),
    "a checkpoint named for another format (torch.save output named .safetensors or with no "
    "suffix, a safetensors file named .pt)": (
        "3; check: 1",
        test_a_checkpoint_named_for_another_format_says_what_it_is,
    ),
    "an all-zero matrix (sigma_max = 0)": ("0", test_all_zero_matrix),
    "1 x N and N x 1 matrices": ("0", test_one_by_n_and_n_by_one),
    "extreme aspect ratios (2 x 100000, 100000 x 2)": ("0", test_extreme_aspect_ratios),
    "int8/uint8 (or other integer) tensors without a scale": (
        "0",
        test_integer_tensors_without_a_scale_are_skipped,
    ),
    "bool, F8_E4M3 and F8_E5M2 tensors without a scale": (
        "0",
        test_bool_and_fp8_without_a_scale_are_skipped,
    ),
    "int8/uint8/fp8 tensors with a scale tensor": ("0", test_quantized_with_a_scale_is_dequantized),
    "uint8/int8 with a `W_zero_point` beside the scale (asymmetric)": (
        "0",
        test_asymmetric_quantization_uses_its_zero_point,
    ),
    "fp8 with a block-wise `W_scale_inv` (DeepSeek-V3)": (
        "0",
        test_block_wise_fp8_scales_are_tiled_never_guessed,
    ),
    "GPTQ/AWQ `qweight`/`qzeros`/`scales`/`g_idx`, bitsandbytes `absmax`/`quant_map`, stray "
    "`*_scale`": ("0", test_quantization_metadata_is_skipped),
    "a `.pt` holding a bare tensor or a list of state dicts": (
        "3; check: 1",
        test_a_pt_without_names,
    ),
    "a zip `.pt`/`.bin`/`.ckpt` whose tensor data was damaged (bytes flipped inside a record)": (
        "3; check: 1",
        test_damaged_zip_record,
    ),
    "an empty tensor (a zero-sized dimension)": ("0", test_empty_tensor_is_skipped),
    "a header with no tensors": ("0; check: 1", test_header_without_tensors),
    "control characters in the name of a valid tensor": (
        "0; check: 1",
        test_control_characters_in_a_valid_name,
    ),
    "an `optimizer.pt` that runs code when unpickled": (
        "3",
        test_optimizer_pickle_that_runs_code_is_refused,
    ),
    "other pickles of a training folder (`scheduler.pt`, `rng_state.pth`, ...)": (
        "0",
        test_other_pickles_in_the_folder_are_copied_never_loaded,
    ),
    "a `.pt`/`.ckpt` whose hyperparameters hold a `pathlib` path or an `argparse.Namespace`": (
        "3; check: 1",
        test_pickle_with_plain_data_hyperparameters_needs_the_opt_in,
    ),
    "`smooth --out` in a folder that cannot be written": (
        "2",
        test_smooth_out_in_an_unwritable_folder,
    ),
    "`smooth --out` that another pss run is writing now": (
        "2",
        test_smooth_out_that_another_run_is_writing,
    ),
    "`smooth --out FILE` beside a one-file input inside a checkpoint folder": (
        "2",
        test_smooth_file_out_inside_a_checkpoint_folder,
    ),
    "`smooth --out` naming a file of another format, or a file for a folder input": (
        "2",
        test_smooth_out_names_a_file_of_another_format,
    ),
    "staging entries left by a killed `smooth` (`.*.pss-tmp-*`)": (
        "0",
        test_stale_staging_from_a_killed_smooth,
    ),
    "`smooth --lr-scale` on a checkpoint without optimizer or scheduler state": (
        "2",
        test_lr_scale_without_optimizer_state,
    ),
    "`check -o` into a folder that cannot be written": (
        "2",
        test_check_output_in_an_unwritable_folder,
    ),
}


def _readme_rows() -> dict[str, str]:
    text = BAD_INPUT_DOC.read_text(encoding="utf-8")
    match = re.search(rf"^# {re.escape(SECTION)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/bad-input.md has no section '# {SECTION}'"
    rows: dict[str, str] = {}
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("case", "") or set(cells[0]) <= {"-"}:
            continue
        assert len(cells) == 3, line
        assert cells[0] not in rows, f"docs/bad-input.md row listed twice: {cells[0]}"
        rows[cells[0]] = cells[2]
    return rows


def _expected_rows() -> dict[str, str]:
    expected = {case.row: ERROR_EXIT for case in ERROR_CASES}
    expected.update({row: exit_text for row, (exit_text, _test) in HANDLED_ROWS.items()})
    return expected


def test_readme_table_has_a_test_for_every_row() -> None:
    readme, expected = _readme_rows(), _expected_rows()
    assert sorted(set(readme) - set(expected)) == [], "docs/bad-input.md rows without a test"
    assert sorted(set(expected) - set(readme)) == [], "tests without a docs/bad-input.md row"
    for row, exit_text in expected.items():
        assert readme[row] == exit_text, row


def test_handled_rows_name_tests_of_this_module() -> None:
    for _row, (_exit, test) in HANDLED_ROWS.items():
        assert globals()[test.__name__] is test and test.__name__.startswith("test_")
