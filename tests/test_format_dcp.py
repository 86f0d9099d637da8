"""PyTorch Distributed Checkpoint folders: scan, check and smooth like safetensors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.formats.dcp.dcp import load_metadata
from pss_cli.checkpoint.formats.dcp.format import DcpKind
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.config import OptimizerPolicy, ScanConfig
from pss_cli.core.smoothing import SmoothingMethod, SmoothingParams
from pss_cli.errors import CheckpointError
from pss_cli.pipeline import scan_checkpoint
from pss_cli.repair import SmoothConfig, smooth_checkpoint
from tests.format_factory import (
    COLLAPSED,
    HEALTHY,
    adam_state,
    load_dcp,
    model_state,
    safetensors_reference,
    save_dcp,
    save_dcp_chunked,
    stable_ranks,
)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _full_dcp(tmp_path: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, dict[str, Any]]:
    model = model_state(dtype)
    state = {
        "model": model,
        "optim": adam_state(model),
        "extra": {"step": 1234, "run": "pretrain-7b"},
        "blob": b"\x00\x01dataloader-state",
    }
    return save_dcp(tmp_path / "dcp", state), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scan_equals_safetensors_and_skips_optimizer_moments(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    folder, state = _full_dcp(tmp_path, dtype)
    layout = open_checkpoint(folder)
    assert layout.kind is DcpKind.FOLDER
    # Model weights only, under their FQN; Adam moments (2-D floats too) are not entries.
    assert sorted(e.name for e in layout.entries) == sorted(state["model"])
    assert all(e.key == (f"model.{e.name}",) for e in layout.entries)
    assert stable_ranks(folder) == safetensors_reference(tmp_path, state["model"])
    assert not any("exp_avg" in name for name in stable_ranks(folder))


def test_bare_fqn_layout_like_torchtitan(tmp_path: Path) -> None:
    # torchtitan flattens model weights to the top level and keeps the optimizer under
    # "optimizer" with flattened "state.<fqn>.exp_avg" keys.
    model = model_state()
    optimizer = {
        f"state.{name}.{moment}": torch.randn(t.shape)
        for name, t in model.items()
        if t.is_floating_point()
        for moment in ("exp_avg", "exp_avg_sq")
    }
    folder = save_dcp(tmp_path / "titan", {**model, "optimizer": optimizer, "train_state": b"x"})
    assert stable_ranks(folder) == safetensors_reference(tmp_path, model)


def test_multi_rank_chunks_read_like_one_tensor(tmp_path: Path) -> None:
    model = model_state()
    folder = save_dcp_chunked(tmp_path / "fsdp", model, ranks=2)
    # torch's own reader accepts the folder (the factory writes the real format).
    loaded = load_dcp(folder, {"model": model})
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.items())
    layout = open_checkpoint(folder)
    assert [p.name for p in layout.files] == ["__0_0.distcp", "__1_0.distcp"]
    with TensorReader(layout) as reader:
        for entry in layout.entries:
            assert torch.equal(reader.read(entry), model[entry.name])
    assert stable_ranks(folder) == safetensors_reference(tmp_path, model)


def test_check_flags_the_collapsed_matrix(tmp_path: Path, runner: CliRunner) -> None:
    folder, state = _full_dcp(tmp_path)
    reference = tmp_path / "ref.safetensors"
    save_file(state["model"], str(reference))
    result = runner.invoke(app, ["check", str(folder), "-f", "json", "-q"])
    expected = runner.invoke(app, ["check", str(reference), "-f", "json", "-q"])
    assert result.exit_code == expected.exit_code == 1, result.stderr
    findings = [(f["rule"], f["tensor"]) for f in json.loads(result.stdout)["findings"]]
    assert findings == [(f["rule"], f["tensor"]) for f in json.loads(expected.stdout)["findings"]]
    assert ("PSS003", COLLAPSED) in findings


def _smooth(
    folder: Path, out: Path, policy: OptimizerPolicy = OptimizerPolicy.RESET, target: float = 3.0
) -> Any:
    config = SmoothConfig(
        scan=ScanConfig(seed=5),
        params=SmoothingParams(target_stable_rank=target),
        optimizer_state=policy,
    )
    return smooth_checkpoint(folder, out, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smooth_round_trip_loads_with_torch_and_resets_exactly_the_modified_moments(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    folder, state = _full_dcp(tmp_path, dtype)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "out"
    report = _smooth(folder, out)
    assert [x.name for x in report.layers] == [COLLAPSED]
    assert report.layers[0].verified
    assert report.optimizer["reset_params"] == [COLLAPSED]
    assert report.optimizer["mapping"] == "exact"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # input untouched

    loaded = load_dcp(out, state)  # torch's own FileSystemReader
    assert set(load_metadata(out).state_dict_metadata) == set(
        load_metadata(folder).state_dict_metadata
    )
    for name, tensor in state["model"].items():
        got = loaded["model"][name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        if name != COLLAPSED:
            assert torch.equal(got, tensor), name
    repaired = loaded["model"][COLLAPSED].double()
    stable_rank = float(repaired.square().sum() / torch.linalg.matrix_norm(repaired, 2) ** 2)
    assert stable_rank == pytest.approx(3.0, rel=2e-2)
    for name, moments in state["optim"]["state"].items():
        got = loaded["optim"]["state"][name]
        assert torch.equal(got["step"], moments["step"])  # step kept
        for key in ("exp_avg", "exp_avg_sq"):
            if name == COLLAPSED:
                assert not got[key].any() and got[key].dtype == moments[key].dtype
            else:
                assert torch.equal(got[key], moments[key]), (name, key)
    # Non-tensor entries come back as they were.
    assert loaded["extra"] == {"step": 1234, "run": "pretrain-7b"}
    assert loaded["blob"] == state["blob"]
    assert loaded["optim"]["param_groups"] == state["optim"]["param_groups"]
    provenance = json.loads((out / "pss-provenance.json").read_text())
    assert provenance["pss.modified_tensors"] == COLLAPSED
    # The output scans like any DCP input, with the repaired matrix no longer flagged.
    rescanned = {x.name: x for x in scan_checkpoint(out, ScanConfig(seed=5)).layers}
    assert rescanned[COLLAPSED].stable_rank == pytest.approx(3.0, rel=2e-2)


def test_smooth_keep_and_drop_optimizer_state(tmp_path: Path) -> None:
    folder, state = _full_dcp(tmp_path)
    kept = _smooth(folder, tmp_path / "kept", OptimizerPolicy.KEEP)
    assert kept.optimizer["reset_params"] == []
    loaded = load_dcp(tmp_path / "kept", state)
    for name, moments in state["optim"]["state"].items():
        assert torch.equal(loaded["optim"]["state"][name]["exp_avg"], moments["exp_avg"])

    dropped = _smooth(folder, tmp_path / "dropped", OptimizerPolicy.DROP)
    assert dropped.optimizer["policy"] == "drop"
    keys = set(load_metadata(tmp_path / "dropped").state_dict_metadata)
    assert keys and not any(k.startswith("optim.") for k in keys)
    assert {k for k in keys if k.startswith("model.")} == {f"model.{k}" for k in state["model"]}
    without = load_dcp(tmp_path / "dropped", {k: v for k, v in state.items() if k != "optim"})
    assert torch.equal(without["model"][HEALTHY[0]], state["model"][HEALTHY[0]])
    # Dropped items' bytes are gone too, not just their keys.
    total = sum(p.stat().st_size for p in (tmp_path / "dropped").glob("*.distcp"))
    assert total < sum(p.stat().st_size for p in folder.glob("*.distcp")) / 2


def test_smooth_multi_rank_chunks(tmp_path: Path) -> None:
    model = model_state()
    folder = save_dcp_chunked(tmp_path / "fsdp", model, ranks=2)
    out = tmp_path / "out"
    report = _smooth(folder, out)
    assert [x.name for x in report.layers] == [COLLAPSED] and report.layers[0].verified
    loaded = load_dcp(out, {"model": model})["model"]
    for name, tensor in model.items():
        if name != COLLAPSED:
            assert torch.equal(loaded[name], tensor)
    # A file holding no modified chunk is copied byte for byte (here none: the collapsed
    # matrix is split across both), and every chunk stays in its rank's file.
    metadata = load_metadata(out)
    files = {info.relative_path for info in metadata.storage_data.values()}
    assert files == {"__0_0.distcp", "__1_0.distcp"}


def test_files_without_a_modified_chunk_are_copied_verbatim(tmp_path: Path) -> None:
    model = model_state()
    folder = save_dcp_chunked(tmp_path / "fsdp", model, ranks=3, whole=frozenset({COLLAPSED}))
    out = tmp_path / "out"
    report = _smooth(folder, out)
    assert report.layers[0].verified
    for rank in (1, 2):  # no chunk of the collapsed matrix: byte-identical
        name = f"__{rank}_0.distcp"
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    assert (out / "__0_0.distcp").read_bytes() != (folder / "__0_0.distcp").read_bytes()
    loaded = load_dcp(out, {"model": model})["model"]
    assert all(torch.equal(loaded[k], v) for k, v in model.items() if k != COLLAPSED)


def test_dry_run_and_no_change_write_nothing(tmp_path: Path) -> None:
    folder, _ = _full_dcp(tmp_path)
    config = SmoothConfig(scan=ScanConfig(seed=5), dry_run=True)
    report = smooth_checkpoint(folder, None, config)
    assert report.output is None and [x.name for x in report.layers] == [COLLAPSED]
    assert not list(tmp_path.glob(".out*"))


# --------------------------------------------------------------------------------------------
# Damaged and hostile inputs: one error line, a hint, exit 3, nothing written


def _assert_one_line_error(result: Any, *named: str) -> None:
    assert result.exit_code == 3, (result.exit_code, result.stderr, result.stdout)
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Hint: ")
    assert "Traceback" not in result.stderr
    for name in named:
        assert name in lines[0], (name, lines[0])


def _damage(tmp_path: Path, how: str) -> tuple[Path, str]:
    folder, _ = _full_dcp(tmp_path)
    distcp = next(folder.glob("*.distcp"))
    if how == "truncated-distcp":
        data = distcp.read_bytes()
        distcp.write_bytes(data[: len(data) // 2])
        return folder, distcp.name
    if how == "missing-distcp":
        distcp.unlink()
        return folder, distcp.name
    if how == "garbage-metadata":
        (folder / ".metadata").write_bytes(b"\x80\x04garbage, not a pickle" * 3)
        return folder, ".metadata"
    if how == "empty-metadata":
        (folder / ".metadata").write_bytes(b"")
        return folder, ".metadata"
    if how == "missing-metadata":
        (folder / ".metadata").unlink()
        return folder, ".metadata"
    if how == "not-metadata":
        (folder / ".metadata").write_bytes(pickle.dumps({"a": [1, 2]}))
        return folder, ".metadata"
    raise ValueError(how)


@pytest.mark.parametrize(
    "how",
    [
        "truncated-distcp",
        "missing-distcp",
        "garbage-metadata",
        "empty-metadata",
        "missing-metadata",
        "not-metadata",
    ],
)
def test_damaged_dcp_is_refused(tmp_path: Path, runner: CliRunner, how: str) -> None:
    folder, named = _damage(tmp_path, how)
    _assert_one_line_error(runner.invoke(app, ["scan", str(folder)]), named)
    out = tmp_path / "out"
    _assert_one_line_error(
        runner.invoke(app, ["smooth", str(folder), "--out", str(out), "-q"]), named
    )
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    check = runner.invoke(app, ["check", str(folder), "-q"])
    assert check.exit_code == 1 and "PSS002" in check.stdout and named in check.stdout


def test_metadata_pickle_that_runs_code_is_never_executed(
    tmp_path: Path, runner: CliRunner
) -> None:
    folder, _ = _full_dcp(tmp_path)
    marker = tmp_path / "pwned"
    command = f"touch '{marker}'".encode()
    # GLOBAL posix.system, a string argument, REDUCE: what a malicious .metadata would hold.
    (folder / ".metadata").write_bytes(
        b"\x80\x02cposix\nsystem\nU" + bytes([len(command)]) + command + b"\x85R."
    )
    result = runner.invoke(app, ["scan", str(folder)])
    _assert_one_line_error(result, ".metadata", "posix.system")
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        open_checkpoint(folder)
    assert not marker.exists()


def test_a_distcp_file_alone_points_at_the_folder(tmp_path: Path, runner: CliRunner) -> None:
    folder, _ = _full_dcp(tmp_path)
    distcp = next(folder.glob("*.distcp"))
    result = runner.invoke(app, ["scan", str(distcp), "-f", "json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["layout"] == "dcp"
    (folder / ".metadata").unlink()
    _assert_one_line_error(runner.invoke(app, ["scan", str(distcp)]), distcp.name)


def test_dcp_output_must_be_a_folder(tmp_path: Path, runner: CliRunner) -> None:
    folder, _ = _full_dcp(tmp_path)
    result = runner.invoke(app, ["smooth", str(folder), "--out", str(tmp_path / "x.pt"), "-q"])
    assert result.exit_code == 2 and "DCP folder" in result.stderr


def _save_sharded_with_process_group(rank: int, world: int, folder: str, port: int) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = model_state()
        sharded = {
            name: distribute_tensor(t, mesh, [Shard(0) if t.dim() == 2 else Replicate()])
            for name, t in model.items()
        }
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": sharded}, checkpoint_id=folder)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_real_two_rank_fsdp_style_save(tmp_path: Path) -> None:
    """What FSDP2/torchtitan write: DTensors sharded on dim 0 by two gloo ranks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path / "fsdp"
    mp.spawn(_save_sharded_with_process_group, args=(2, str(folder), port), nprocs=2)
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    model = model_state()
    assert stable_ranks(folder) == safetensors_reference(tmp_path, model)
    report = _smooth(folder, tmp_path / "out")
    assert [x.name for x in report.layers] == [COLLAPSED] and report.layers[0].verified
    loaded = load_dcp(tmp_path / "out", {"model": model})["model"]
    assert all(torch.equal(loaded[k], v) for k, v in model.items() if k != COLLAPSED)


def test_smoothing_one_copy_of_a_tied_embedding_is_noted(tmp_path: Path) -> None:
    # A DCP save of a model whose head is tied to its embedding stores the tensor under both
    # names; smoothing one by name leaves the other, which dcp.load then writes into the shared
    # parameter last: the repair is undone. pss says so, naming both.
    generator = torch.Generator().manual_seed(0)
    spike = torch.randn(100, 1, generator=generator) @ torch.randn(1, 32, generator=generator)
    embedding = torch.randn(100, 32, generator=generator) + 3 * spike
    folder = save_dcp(
        tmp_path / "dcp",
        {
            "emb.weight": embedding,
            "head.weight": embedding,  # the same parameter, as model.state_dict() gives it
            "fc.weight": torch.randn(32, 32, generator=generator),
        },
    )
    config = SmoothConfig(
        layers=("emb.weight",), params=SmoothingParams(method=SmoothingMethod.CLIP)
    )
    report = smooth_checkpoint(folder, tmp_path / "out", config)
    assert [layer.name for layer in report.layers] == ["emb.weight"]
    (note,) = [m for m in report.messages if "holds the same values" in m]
    assert note.startswith("'head.weight' holds the same values as 'emb.weight'")
    assert "--layers 'emb.weight' --layers 'head.weight'" in note
    both = smooth_checkpoint(
        folder,
        tmp_path / "both",
        SmoothConfig(
            layers=("emb.weight", "head.weight"),
            params=SmoothingParams(method=SmoothingMethod.CLIP),
        ),
    )
    assert not [m for m in both.messages if "holds the same values" in m]
