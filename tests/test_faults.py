"""Faults during `pss smooth`: SIGKILL, a full disk, and two writers racing for one OUT.

The guarantee under test (docs/bad-input.md, "Faults during smooth"): whatever happens, OUT is
either absent or a complete, valid, verified repair (never a partial checkpoint under the final
name), the input's bytes never change, leftovers are only hidden ``.OUT.pss-tmp-*`` staging
entries, and a rerun succeeds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import pss_cli.checkpoint.formats.safetensors.writer as writer_mod
import pss_cli.checkpoint.staging as staging_mod
from pss_cli.app import app
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.formats.safetensors.writer import write_repaired_checkpoint
from pss_cli.errors import UsageError
from tests.safetensors_factory import write_index, write_tensors
from tests.spectra_factory import power_law, with_spectrum

ROOT = Path(__file__).resolve().parent.parent
STAGING_TAG = ".pss-tmp-"
_RESET = ("--optimizer-state", "reset")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): _sha(p) for p in files}


def _collapsed(m: int, n: int, seed: int) -> torch.Tensor:
    spectrum = power_law(min(m, n), 0.3).clone()
    spectrum[0] = 10.0  # one dominant direction: stable rank ~1, flagged
    return with_spectrum(m, n, spectrum, seed=seed).float()


def _sharded_input(folder: Path, filler_elements: int) -> Path:
    """Three shards, each one collapsed matrix (smoothed) and a large 1-D tensor (copied),
    an index, a config and an Adam optimizer state."""
    folder.mkdir()
    weight_map = {}
    for shard in range(3):
        name = f"model-0000{shard + 1}-of-00003.safetensors"
        tensors = {
            f"h.{shard}.mlp.c_fc.weight": _collapsed(96, 128, seed=shard),
            f"h.{shard}.ln.weight": torch.linspace(-1, 1, filler_elements) + shard,
        }
        write_tensors(folder / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    write_index(folder / "model.safetensors.index.json", weight_map)
    (folder / "config.json").write_text('{"model_type": "test"}')
    state = {
        "state": {
            0: {
                "step": torch.tensor(3.0),
                "exp_avg": torch.ones(96, 128),
                "exp_avg_sq": torch.ones(96, 128),
            }
        },
        "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}],
    }
    torch.save(state, folder / "optimizer.pt")
    return folder


def _assert_valid_output(out: Path, source: Path) -> None:
    """OUT is a complete repair of ``source``: every file of the input is there, every
    safetensors file opens with the library, carries pss provenance, and every tensor other
    than the smoothed ones holds the input's bytes."""
    layout_in, layout_out = open_checkpoint(source), open_checkpoint(out)
    assert {p.name for p in layout_out.files} == {p.name for p in layout_in.files}
    modified: set[str] = set()
    for file in layout_out.files:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
            assert metadata["pss.command"] == "smooth"
            modified |= set(metadata["pss.modified_tensors"].split(","))
            src = source / file.name if source.is_dir() else source
            with safe_open(str(src), framework="pt") as g:
                assert set(f.keys()) == set(g.keys())
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if key not in modified:
                        assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key
    assert modified
    if source.is_dir():
        others = {p.name for p in source.iterdir()} - {p.name for p in layout_in.files}
        assert others <= {p.name for p in out.iterdir()}
        if (source / "model.safetensors.index.json").exists():
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert index["weight_map"] == layout_in_map(source)


def layout_in_map(source: Path) -> dict[str, str]:
    weight_map: dict[str, str] = json.loads((source / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    return weight_map


def _leftovers(parent: Path, out: Path, *others: str) -> list[str]:
    """Entries beside OUT other than OUT, the input and ``others``: only staging may remain."""
    names = sorted(p.name for p in parent.iterdir() if p.name not in (out.name, "in", *others))
    assert all(n.startswith(f".{out.name}{STAGING_TAG}") for n in names), names
    return names


def _smooth_cmd(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pss_cli", "smooth", str(source), "--out", str(out), "-q", *extra]


# ---------------------------------------------------------------------------------------------
# SIGKILL at random moments


def _wait_for_staging(parent: Path, out: Path, proc: subprocess.Popen[bytes]) -> bool:
    prefix = f".{out.name}{STAGING_TAG}"
    while proc.poll() is None:
        if any(p.name.startswith(prefix) for p in parent.iterdir()):
            return True
        time.sleep(0.001)
    return False


def test_sigkill_while_writing_leaves_out_complete_or_absent(tmp_path: Path) -> None:
    source = _sharded_input(tmp_path / "in", filler_elements=700_000)  # ~8 MB of shards
    before = _hashes(source)
    out = tmp_path / "out"

    # A clean run first: how long the write phase (staging visible -> exit) takes.
    proc = subprocess.Popen(_smooth_cmd(source, out), stderr=subprocess.PIPE)
    assert _wait_for_staging(tmp_path, out, proc)
    staged_at = time.perf_counter()
    _, stderr = proc.communicate(timeout=300)
    write_seconds = time.perf_counter() - staged_at
    assert proc.returncode == 0, stderr.decode()
    _assert_valid_output(out, source)
    reference = _hashes(out)
    shutil.rmtree(out)

    rng = random.Random(20261124)
    outcomes = []
    for attempt in range(3):
        proc = subprocess.Popen(_smooth_cmd(source, out), stderr=subprocess.DEVNULL)
        if attempt == 0:  # once anywhere in the run, startup and scan included
            time.sleep(rng.uniform(0.0, 2.0))
        else:  # otherwise while the output is being staged, written, verified, renamed
            _wait_for_staging(tmp_path, out, proc)
            time.sleep(rng.uniform(0.0, write_seconds))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        outcomes.append("finished" if proc.returncode == 0 else "killed")
        outcomes.append("out-present" if os.path.lexists(out) else "out-absent")
        outcomes.extend(_leftovers(tmp_path, out)[:1] and ["staging-left"])

        assert _hashes(source) == before  # the input never changes
        if os.path.lexists(out):
            _assert_valid_output(out, source)  # complete, never partial
            assert {k.replace("out/", "", 1): v for k, v in _hashes(out).items()} == {
                k.replace("out/", "", 1): v for k, v in reference.items()
            }
        _leftovers(tmp_path, out)
        rerun = subprocess.run(
            _smooth_cmd(source, out, *(["--force"] if os.path.lexists(out) else [])),
            capture_output=True,
            timeout=300,
        )
        assert rerun.returncode == 0, rerun.stderr.decode()
        _assert_valid_output(out, source)
        assert _hashes(out) == reference  # the rerun is the same repair, byte for byte
        shutil.rmtree(out)
    print("sigkill outcomes:", outcomes, f"write phase {write_seconds:.2f} s")
    assert "killed" in outcomes


def test_sigterm_while_writing_cleans_up(tmp_path: Path) -> None:
    """SIGTERM (a cancelled CI job) unwinds like Ctrl-C: no OUT, no staging left, exit 130."""
    source = _sharded_input(tmp_path / "in", filler_elements=1_000_000)
    before = _hashes(source)
    out = tmp_path / "out"
    proc = subprocess.Popen(_smooth_cmd(source, out), stderr=subprocess.PIPE, text=True)
    assert _wait_for_staging(tmp_path, out, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.splitlines() == ["Error: interrupted"]
    assert not os.path.lexists(out) and _leftovers(tmp_path, out) == []
    assert _hashes(source) == before


# ---------------------------------------------------------------------------------------------
# A full disk


def _small_model() -> dict[str, torch.Tensor]:
    """Four 64 x 96 matrices (two collapsed, so smooth writes something) and their biases."""
    tensors: dict[str, torch.Tensor] = {}
    for block in range(2):
        healthy = with_spectrum(64, 96, power_law(64, 0.3), seed=10 + block).float()
        tensors[f"h.{block}.attn.c_proj.weight"] = healthy
        tensors[f"h.{block}.mlp.c_fc.weight"] = _collapsed(64, 96, seed=20 + block)
        tensors[f"h.{block}.mlp.c_fc.bias"] = torch.linspace(0, 1, 96)
    return tensors


def _trainer_input(folder: Path, sharded: bool) -> Path:
    """A Trainer-like folder (optionally with two shards + index) with config and optimizer."""
    folder.mkdir()
    tensors = _small_model()
    if sharded:
        names = sorted(tensors)
        halves = {
            "model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2 :],
        }
        weight_map = {}
        for shard, keys in halves.items():
            write_tensors(folder / shard, {k: tensors[k] for k in keys})
            weight_map.update(dict.fromkeys(keys, shard))
        write_index(folder / "model.safetensors.index.json", weight_map)
    else:
        write_tensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    state = {
        "state": {
            0: {
                "step": torch.tensor(1.0),
                "exp_avg": torch.ones(64, 96),
                "exp_avg_sq": torch.ones(64, 96),
            }
        },
        "param_groups": [{"params": [0], "betas": (0.9, 0.999)}],
    }
    torch.save(state, folder / "optimizer.pt")
    return folder


def _enospc(path: str = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or None)


class _DiskFillsAfter:
    """Replacement for writer._write_chunk: writes normally until ``limit`` bytes, then ENOSPC
    (what write(2) returns when the file system fills up)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.written = limit, 0
        self.real = writer_mod._write_chunk

    def __call__(self, fout: Any, chunk: bytes | memoryview) -> None:
        room = self.limit - self.written
        if len(chunk) > room:
            if room > 0:
                self.real(fout, chunk[:room])
                self.written += room
            raise _enospc(fout.name)
        self.real(fout, chunk)
        self.written += len(chunk)


def _fail_nth_call(real: Callable[..., Any], n: int) -> Callable[..., Any]:
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise _enospc(str(args[0]) if args and isinstance(args[0], (str, Path)) else "")
        return real(*args, **kwargs)

    return wrapper


def _disk_fills(fraction: float, extra: int = 0) -> Callable[[pytest.MonkeyPatch, int], None]:
    def install(mp: pytest.MonkeyPatch, total: int) -> None:
        mp.setattr(writer_mod, "_write_chunk", _DiskFillsAfter(int(total * fraction) + extra))

    return install


# Where the disk fills, as a share of the safetensors bytes to write (the input's size): in the
# sharded input the first shard is about half, so 0.75 lands in the second one.
FAULTS: dict[str, Callable[[pytest.MonkeyPatch, int], None]] = {
    "first-byte": _disk_fills(0.0),
    "in-header": _disk_fills(0.0, 100),
    "mid-data": _disk_fills(0.3),
    "later-file": _disk_fills(0.75),
    "last-byte": _disk_fills(1.0, -1),
    # delayed allocation: the error can surface only at fsync
    "at-fsync": lambda mp, _total: mp.setattr(os, "fsync", _fail_nth_call(os.fsync, 1)),
    "copying-config": lambda mp, _total: mp.setattr(
        shutil, "copy2", _fail_nth_call(shutil.copy2, 1)
    ),
    "writing-optimizer": lambda mp, _total: mp.setattr(  # with --optimizer-state reset
        torch, "save", _fail_nth_call(torch.save, 1)
    ),
}


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "two-shards"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_full_disk_leaves_nothing_and_a_rerun_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, sharded: bool
) -> None:
    source = _trainer_input(tmp_path / "in", sharded)
    before = _hashes(source)
    out = tmp_path / "out"
    runner = CliRunner()
    with monkeypatch.context() as mp:
        FAULTS[fault](mp, sum(p.stat().st_size for p in source.glob("*.safetensors")))
        # reset: the policy that rewrites optimizer.pt (keep, the default, copies it)
        result = runner.invoke(app, ["smooth", str(source), "--out", str(out), "-q", *_RESET])
    assert result.exit_code == 3, (result.stderr, result.stdout)
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Hint: ")
    assert "no space left on the device" in lines[0] and str(out) in lines[0]
    assert "free at least" in lines[1]
    assert not os.path.lexists(out) and _leftovers(tmp_path, out) == []  # staging cleaned
    assert _hashes(source) == before
    rerun = runner.invoke(app, ["smooth", str(source), "--out", str(out), "-q", *_RESET])
    assert rerun.exit_code == 0, rerun.stderr
    _assert_valid_output(out, source)


def test_full_disk_single_file_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _trainer_input(tmp_path / "in", sharded=False)
    before = _hashes(source)
    out = tmp_path / "out.safetensors"
    monkeypatch.setattr(writer_mod, "_write_chunk", _DiskFillsAfter(50_000))
    result = CliRunner().invoke(
        app, ["smooth", str(source / "model.safetensors"), "--out", str(out), "-q"]
    )
    assert result.exit_code == 3 and "no space left" in result.stderr
    assert not os.path.lexists(out) and _leftovers(tmp_path, out) == []
    assert _hashes(source) == before


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB file system (tmpfs), where the kernel itself answers ENOSPC; skipped where
    mounting is not allowed (not root, or no CAP_SYS_ADMIN in the container)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_real_full_disk(tmp_path: Path, small_tmpfs: Path) -> None:
    source = _trainer_input(tmp_path / "in", sharded=True)  # ~100 KB of weights: does not fit
    before = _hashes(source)
    out = small_tmpfs / "out"
    done = subprocess.run(_smooth_cmd(source, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and "no space left on the device" in lines[0], done.stderr
    assert list(small_tmpfs.iterdir()) == []  # nothing published, staging removed
    assert _hashes(source) == before
    rerun = subprocess.run(_smooth_cmd(source, tmp_path / "out"), capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    _assert_valid_output(tmp_path / "out", source)


@pytest.mark.parametrize("command", ["scan", "check"])
def test_full_disk_while_writing_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """-o FILE on a full disk: exit 3, one error line, no report and no temp file left."""
    source = _trainer_input(tmp_path / "in", sharded=False)
    report = tmp_path / "report.json"
    monkeypatch.setattr(os, "fsync", _fail_nth_call(os.fsync, 1))
    argv = [command, str(source), "-f", "json", "-o", str(report), "-q"]
    if command == "check":
        argv.append("--exit-zero")
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 3, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and str(report) in lines[0] and "No space left" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ---------------------------------------------------------------------------------------------
# Two writers, one OUT


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "single-file"])
def test_two_writers_racing_to_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_file: bool
) -> None:
    """Both stage completely, then both commit at the same instant (a barrier in front of the
    commit): exactly one wins, the other gets "already exists", and OUT holds one writer's
    files only."""
    source = _trainer_input(tmp_path / "in", sharded=not as_file)
    layout = open_checkpoint(source / "model.safetensors" if as_file else source)
    out = tmp_path / ("out.safetensors" if as_file else "out")
    name = next(e.name for e in layout.entries if e.name.endswith("c_fc.weight"))
    entry = next(e for e in layout.entries if e.name == name)
    barrier = threading.Barrier(2, timeout=60)
    commit_name = "_commit_file" if as_file else "_commit_dir"
    real_commit = getattr(staging_mod, commit_name)

    def commit_together(*args: Any, **kwargs: Any) -> None:
        barrier.wait()
        real_commit(*args, **kwargs)

    monkeypatch.setattr(staging_mod, commit_name, commit_together)
    results: dict[str, object] = {}

    def write(tag: str) -> None:
        value = torch.full(entry.shape, float(len(tag)), dtype=torch.float32)
        try:
            results[tag] = write_repaired_checkpoint(
                layout, out, {name: value}, {"pss.writer": tag}
            )
        except Exception as exc:  # the test inspects what each writer got
            results[tag] = exc

    threads = [threading.Thread(target=write, args=(tag,)) for tag in ("a", "bb")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    errors = [r for r in results.values() if isinstance(r, Exception)]
    assert len(results) == 2 and len(errors) == 1, results
    assert isinstance(errors[0], UsageError) and "already exists" in errors[0].message
    winner = next(tag for tag, r in results.items() if not isinstance(r, Exception))
    files = [out] if as_file else sorted(out.glob("*.safetensors"))
    for file in files:  # every file comes from the winner: no mix of the two
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata()["pss.writer"] == winner
            if name in f.keys():  # noqa: SIM118
                assert float(f.get_tensor(name)[0, 0]) == float(len(winner))
    assert _leftovers(tmp_path, out) == []


def test_two_concurrent_smooth_processes(tmp_path: Path) -> None:
    """The same race end to end: two `pss smooth` processes (different methods, so that their
    outputs differ) to one OUT; one exits 0, the other 2, OUT is exactly the winner's repair."""
    source = _trainer_input(tmp_path / "in", sharded=True)
    out = tmp_path / "out"
    methods = ("cap", "clip")
    procs = [
        subprocess.Popen(
            _smooth_cmd(source, out, "--method", method), stderr=subprocess.PIPE, text=True
        )
        for method in methods
    ]
    outcomes = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    winner = methods[[code for code, _ in outcomes].index(0)]
    loser_err = next(err for code, err in outcomes if code == 2)
    # the loser sees the winner's staging before computing, or loses the race to commit
    assert "already exists" in loser_err or "another pss process is writing" in loser_err
    assert loser_err.count("\n") == 2
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata()["pss.method"] == winner
    reference = tmp_path / "reference"
    subprocess.run(_smooth_cmd(source, reference, "--method", winner), check=True, timeout=300)
    assert {p.name: _sha(p) for p in out.iterdir()} == {
        p.name: _sha(p) for p in reference.iterdir()
    }
    assert _leftovers(tmp_path, out, "reference") == []
