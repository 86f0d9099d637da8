"""Distributed scans: share assignment, the torchrun environment, failure transport, and real
2-process runs over gloo on the CPU compared with a single-process scan.

The multi-process tests spawn real processes (torchrun, or the two ranks by hand with the
variables torchrun would set) under a subprocess timeout, so a hang fails instead of blocking.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pss_cli.distributed import (
    KRYLOV_COST_WIDTH,
    Launch,
    _Failure,
    assign_shares,
    launch_from_env,
    open_session,
    rank_device,
)
from pss_cli.errors import ComputeError, CorruptCheckpointError, ExitCode, PssError, UsageError
from tests.safetensors_factory import write_tensors
from tests.spectra_factory import flat_bulk, power_law, spiky, with_spectrum

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds; a 2-process scan of the checkpoint below takes ~10 s on 2 quiet cores


# --------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------


def test_shares_are_balanced_deterministic_and_complete() -> None:
    costs = [100, 1, 1, 50, 50, 1, 1, 1, 30, 20]
    shares = assign_shares(costs, 3)
    assert shares == assign_shares(costs, 3)
    assert sorted(p for share in shares for p in share) == list(range(len(costs)))
    assert all(share == sorted(share) for share in shares)
    # LPT by hand: 100 -> r0; 50 -> r1; 50 -> r2; 30 -> r1 (80); 20 -> r2 (70); then the five
    # 1s go to the least-loaded r2 one by one (71..75), never reaching r1's 80.
    assert shares == [[0], [3, 8], [1, 2, 4, 5, 6, 7, 9]]


@given(
    costs=st.lists(st.integers(0, 10**12), min_size=0, max_size=60),
    world=st.integers(1, 9),
)
def test_lpt_bound_for_any_costs(costs: list[int], world: int) -> None:
    shares = assign_shares(costs, world)
    assert len(shares) == world
    assert sorted(p for share in shares for p in share) == list(range(len(costs)))
    loads = [sum(costs[p] for p in share) for share in shares]
    if costs:
        # List scheduling: no rank ends later than the average load plus one item.
        assert max(loads) <= sum(costs) / world + max(costs)


def test_more_ranks_than_matrices_leaves_some_idle() -> None:
    assert assign_shares([5, 7], 4) == [[1], [0], [], []]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, None),
        ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, Launch(4, 3, 1)),
        ({"WORLD_SIZE": "2", "RANK": "1"}, None),  # not torchrun: LOCAL_RANK missing
    ],
)
def test_launch_from_env(env: dict[str, str], expected: Launch | None) -> None:
    assert launch_from_env(env) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"},
        {"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"},
        {"WORLD_SIZE": "0", "RANK": "0", "LOCAL_RANK": "0"},
        {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"},
    ],
)
def test_bad_launch_variables_are_usage_errors(env: dict[str, str]) -> None:
    with pytest.raises(UsageError) as info:
        launch_from_env(env)
    assert "torchrun" in (info.value.hint or "")


def test_plain_runs_get_a_passthrough_session() -> None:
    session = open_session({})
    assert type(session).__name__ == "Session" and session.world_size == 1
    with session:
        assert session.run(lambda: 3) == 3
        assert session.rank0(lambda: 4) == 4


@pytest.mark.parametrize("command", ["smooth", "trend"])
def test_single_process_commands_refuse_torchrun(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from pss_cli.app import app

    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    args = [command, str(tmp_path)] + (
        ["--out", str(tmp_path / "o")] if command == "smooth" else []
    )
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"Error: pss {command} runs in one process" in result.output
    assert not (tmp_path / "o").exists()


def test_rank_device() -> None:
    assert rank_device("cpu", 5) == torch.device("cpu")
    with pytest.raises(UsageError) as info:
        rank_device("cuda:1", 0)
    assert "LOCAL_RANK" in (info.value.hint or "")
    if not torch.cuda.is_available():
        assert rank_device("auto", 3) == torch.device("cpu")
        with pytest.raises(UsageError):
            rank_device("cuda", 0)


def test_failures_cross_processes_with_class_hint_and_exit_code() -> None:
    import pickle

    corrupt = CorruptCheckpointError("cannot read tensor 'w' from 'a.safetensors'", "re-download")
    rebuilt = pickle.loads(pickle.dumps(_Failure.of(1, corrupt))).rebuild()
    assert type(rebuilt) is CorruptCheckpointError
    assert (rebuilt.message, rebuilt.hint) == (corrupt.message, "re-download")

    class Odd(PssError):
        exit_code = ExitCode.USAGE

        def __init__(self) -> None:
            super().__init__("odd failure", "odd hint")

    generic = _Failure(2, Odd, "odd failure", "odd hint", int(ExitCode.USAGE)).rebuild()
    assert isinstance(generic, ComputeError) and generic.exit_code == ExitCode.USAGE
    bug = _Failure.of(3, KeyError("x")).rebuild()
    assert isinstance(bug, ComputeError) and "rank 3" in bug.message and "KeyError" in bug.message
    assert isinstance(_Failure.of(1, MemoryError()).rebuild(), MemoryError)


def test_krylov_cost_width_is_below_the_exact_cost_of_big_matrices() -> None:
    # Balancing assumes a Krylov solve costs less per entry than a full SVD of a large matrix.
    assert KRYLOV_COST_WIDTH < 4096


# --------------------------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------------------------


def _checkpoint(folder: Path) -> Path:
    """Matrices for both solver paths: 600x700 ones take the Krylov path (short side > 512),
    the small ones an exact SVD; BF16 and F32, wide and tall, and a stack of experts."""
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for i, spectrum in enumerate([flat_bulk(600), power_law(600), spiky(600)]):
        tensors[f"layers.{i}.mlp.up_proj.weight"] = with_spectrum(700, 600, spectrum, i).float()
        wide = with_spectrum(600, 700, spectrum, 10 + i).bfloat16()
        tensors[f"layers.{i}.mlp.down_proj.weight"] = wide
        tensors[f"layers.{i}.attn.q_proj.weight"] = torch.randn(64, 48, generator=g)
        tensors[f"layers.{i}.input_layernorm.weight"] = torch.ones(64)
    tensors["layers.3.experts.w1"] = torch.randn(3, 96, 80, generator=g).half()
    return write_tensors(folder / "model.safetensors", tensors)


# Pinned, not measured: `auto` measures in each process, and two processes on a loaded machine
# must not be able to choose differently (docs/scan.md "Reproducibility").
PINNED = ("--precision", "fp32")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # torchrun gives every process one thread; the reference gets one too, so that these
    # tests check the distribution itself (thread-count invariance is tested on its own).
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _without_run_fields(path: Path) -> dict:
    data = json.loads(path.read_text())
    del data["timings"]
    world = data["settings"].pop("world_size")
    assert isinstance(world, int)
    return data


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _single(ckpt: Path, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pss_cli", "scan", str(ckpt), "--format", "json"]
    command += ["-o", str(out), *PINNED]
    return subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=True
    )


def test_two_process_torchrun_scan_equals_single_process(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    single = _single(ckpt, tmp_path / "single.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += ["--standalone", "-m", "pss_cli", "scan", str(ckpt), "--format", "json"]
    command += ["-o", str(tmp_path / "dist.json"), *PINNED]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    reference = _without_run_fields(tmp_path / "single.json")
    assert _without_run_fields(tmp_path / "dist.json") == reference
    assert json.loads(done.stdout) == json.loads(single.stdout) | {
        "settings": json.loads(done.stdout)["settings"],
        "timings": json.loads(done.stdout)["timings"],
    }  # rank 1 printed nothing: stdout is exactly one report
    assert json.loads((tmp_path / "dist.json").read_text())["settings"]["world_size"] == 2
    solvers = {layer["solver"] for layer in reference["layers"]}
    assert {"krylov", "exact"} <= solvers  # both paths were exercised
    assert "Error" not in done.stderr


def _readme_commands() -> list[str]:
    section = (ROOT / "docs" / "distributed.md").read_text()
    return [line.strip() for line in section.splitlines() if line.strip().startswith("torchrun")]


def test_readme_cpu_command_runs_as_written(tmp_path: Path) -> None:
    commands = [c for c in _readme_commands() if "--device cpu" in c]
    assert commands, "docs/distributed.md shows a CPU torchrun command"
    ckpt = _checkpoint(tmp_path)
    words = shlex.split(commands[0])
    # The module form is torchrun itself; use it where no `torchrun` script is on PATH.
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else []
    launcher = launcher or [sys.executable, "-m", "torch.distributed.run"]
    words = [str(ckpt) if w == "CKPT" else w for w in words[1:]]
    done = subprocess.run(
        [*launcher, *words],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    written = [p for p in tmp_path.glob("*.json")]
    assert len(written) == 1
    _single(ckpt, tmp_path / "single.out")
    assert _without_run_fields(written[0]) == _without_run_fields(tmp_path / "single.out")
    assert all(re.search(r"--nproc_per_node[= ]\d", c) for c in _readme_commands())


# A rank started by hand, as torchrun would start it; on rank FAIL_RANK, reading tensor data
# fails as it would on a damaged disk (the corruption only that rank's share would meet).
_RANK_SCRIPT = """
import sys
from pss_cli import pipeline
from pss_cli.errors import CorruptCheckpointError
fail_rank = int(sys.argv[1])
if fail_rank >= 0 and int(__import__("os").environ["RANK"]) == fail_rank:
    def broken(self, batch):
        raise CorruptCheckpointError(
            f"cannot read tensor '{batch.items[0].target.entry.name}': I/O error", "re-download"
        )
    pipeline._Loader.load = broken
sys.argv = ["pss", *sys.argv[2:]]
from pss_cli.app import main
main()
"""


def _spawn_ranks(args: list[str], fail_rank: int, cwd: Path) -> list[subprocess.Popen[str]]:
    port = str(_free_port())
    ranks = []
    for rank in range(2):
        env = _env(
            WORLD_SIZE="2",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        command = [sys.executable, "-c", _RANK_SCRIPT, str(fail_rank), *args]
        ranks.append(
            subprocess.Popen(
                command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return ranks


def _finish(ranks: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    results = []
    try:
        for process in ranks:
            out, err = process.communicate(timeout=TIMEOUT)
            results.append((process.returncode, out, err))
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    return results


@pytest.mark.parametrize("fail_rank", [1, 0])
def test_an_error_on_one_rank_is_one_error_and_exit_3_everywhere(
    tmp_path: Path, fail_rank: int
) -> None:
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "report.json"
    ranks = _spawn_ranks(["scan", str(ckpt), "-o", str(out)], fail_rank, tmp_path)
    (code0, out0, err0), (code1, out1, err1) = _finish(ranks)
    assert (code0, code1) == (3, 3)
    assert out0 == "" and out1 == ""
    assert err1 == ""  # only rank 0 speaks
    assert err0.count("Error: ") == 1 and "I/O error" in err0 and "Hint: re-download" in err0
    assert not out.exists()  # no report from a failed scan


def test_a_corrupt_checkpoint_fails_on_every_rank_with_one_message(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    data = bytearray(ckpt.read_bytes())
    ckpt.write_bytes(bytes(data[:-10]))  # truncated: the header no longer tiles the file
    ranks = _spawn_ranks(["scan", str(ckpt)], -1, tmp_path)
    (code0, out0, err0), (code1, out1, err1) = _finish(ranks)
    assert (code0, code1) == (3, 3)
    assert out0 == out1 == "" and err1 == ""
    assert err0.count("Error: ") == 1 and str(ckpt) in err0


def test_usage_errors_are_reported_once(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    ranks = _spawn_ranks(["scan", str(ckpt), "--top-k", "0"], -1, tmp_path)
    (code0, _, err0), (code1, _, err1) = _finish(ranks)
    assert (code0, code1) == (2, 2)
    assert err0.count("Error: --top-k must be at least 1") == 1 and err1 == ""


def test_check_under_torchrun_gates_once_like_one_process(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    args = ["check", str(ckpt), "--format", "json", "--max-sigma-ratio", "1.5", *PINNED]
    single = subprocess.run(
        [sys.executable, "-m", "pss_cli", *args],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert single.returncode == 1  # the spiky matrices break the sigma ratio limit
    (code0, out0, err0), (code1, out1, err1) = _finish(_spawn_ranks(args, -1, tmp_path))
    assert (code0, code1) == (1, 1)
    assert out0 == single.stdout and out1 == "" and err1 == ""
    assert err0 == single.stderr  # the verdict line, once


def test_check_of_a_corrupt_checkpoint_under_torchrun_is_one_pss002(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    args = ["check", str(ckpt), "--format", "json"]
    (code0, out0, err0), (code1, out1, err1) = _finish(_spawn_ranks(args, -1, tmp_path))
    assert (code0, code1) == (1, 1)
    findings = json.loads(out0)["findings"]
    assert [f["rule"] for f in findings] == ["PSS002"]
    assert out1 == "" and err1 == "" and "Error" not in err0
