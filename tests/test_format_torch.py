""".pt/.bin/.pth state dicts: scan, check and smooth like safetensors, and never unpickle code."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.formats.torch.format import TorchKind
from pss_cli.config import OptimizerPolicy, ScanConfig
from pss_cli.core.smoothing import SmoothingParams
from pss_cli.errors import CheckpointError, UsageError
from pss_cli.pipeline import scan_checkpoint
from pss_cli.repair import SmoothConfig, smooth_checkpoint
from tests.format_factory import (
    COLLAPSED,
    adam_state,
    flip_bytes_in_largest_record,
    hostile_torch_file,
    model_state,
    safetensors_reference,
    stable_ranks,
)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _sr(matrix: torch.Tensor) -> float:
    matrix = matrix.double()
    return float(matrix.square().sum() / torch.linalg.matrix_norm(matrix, 2) ** 2)


# Wrappers the model state dict is found in, and the key path to it.
WRAPPERS = {
    "plain": (lambda sd: sd, ()),
    "lightning": (lambda sd: {"state_dict": sd, "epoch": 3, "global_step": 900}, ("state_dict",)),
    "training-loop": (
        lambda sd: {"model": sd, "optimizer": adam_state(sd), "step": 10},
        ("model",),
    ),
    "deepspeed": (lambda sd: {"module": sd, "buffer_names": ["x"]}, ("module",)),
    "model-state-dict": (
        lambda sd: {"model_state_dict": sd, "optimizer_state_dict": adam_state(sd)},
        ("model_state_dict",),
    ),
}


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_scan_equals_safetensors(tmp_path: Path, suffix: str, wrapper: str) -> None:
    model = model_state()
    wrap, _ = WRAPPERS[wrapper]
    path = tmp_path / f"weights{suffix}"
    torch.save(wrap(model), path)
    layout = open_checkpoint(path)
    assert layout.kind is TorchKind.FILE
    # Optimizer moments beside the model (2-D float tensors) are not entries.
    assert sorted(e.name for e in layout.entries) == sorted(model)
    assert stable_ranks(path) == safetensors_reference(tmp_path, model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_and_legacy_format(tmp_path: Path, dtype: torch.dtype) -> None:
    model = model_state(dtype)
    path = tmp_path / "legacy.bin"
    torch.save(model, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert stable_ranks(path) == safetensors_reference(tmp_path, model)
    assert {e.name: e.dtype for e in open_checkpoint(path).entries}[COLLAPSED] == {
        torch.bfloat16: "BF16",
        torch.float16: "F16",
        torch.float64: "F64",
    }[dtype]


def test_nested_dicts_are_flattened_with_dotted_names(tmp_path: Path) -> None:
    nested = {"encoder": {"layers": {"0": {"mlp": {"up_proj": {"weight": torch.randn(8, 6)}}}}}}
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": nested, "hparams": {"lr": 0.1}}, path)
    entries = open_checkpoint(path).entries
    assert [(e.name, e.key) for e in entries] == [
        (
            "encoder.layers.0.mlp.up_proj.weight",
            ("state_dict", "encoder", "layers", "0", "mlp", "up_proj", "weight"),
        )
    ]


def _hf_sharded(folder: Path, model: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    names = sorted(model)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:3],
        "pytorch_model-00002-of-00002.bin": names[3:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({k: model[k] for k in keys}, folder / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text("{}")
    return folder


def test_sharded_bin_index_and_folders(tmp_path: Path) -> None:
    model = model_state()
    folder = _hf_sharded(tmp_path / "hf", model)
    layout = open_checkpoint(folder)
    assert layout.kind is TorchKind.SHARDED and len(layout.files) == 2
    assert stable_ranks(folder) == safetensors_reference(tmp_path, model)
    assert stable_ranks(folder / "pytorch_model.bin.index.json") == stable_ranks(folder)
    # A missing shard is named.
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    result = CliRunner().invoke(app, ["scan", str(folder)])
    assert result.exit_code == 3 and "pytorch_model-00002-of-00002.bin" in result.stderr


def test_trainer_folder_reads_the_weights_not_the_optimizer(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-100"
    folder.mkdir()
    model = model_state()
    torch.save(model, folder / "pytorch_model.bin")
    torch.save(adam_state(model), folder / "optimizer.pt")
    torch.save({"lr": 1.0}, folder / "scheduler.pt")
    torch.save(torch.get_rng_state(), folder / "rng_state.pth")
    (folder / "training_args.bin").write_bytes(b"not even a pickle")
    layout = open_checkpoint(folder)
    assert layout.kind is TorchKind.DIRECTORY
    assert [p.name for p in layout.files] == ["pytorch_model.bin"]
    assert stable_ranks(folder) == safetensors_reference(tmp_path, model)


def test_safetensors_preferred_and_bin_reported_as_not_scanned(tmp_path: Path) -> None:
    folder = tmp_path / "both"
    folder.mkdir()
    model = model_state()
    save_file(model, str(folder / "model.safetensors"))
    torch.save(model, folder / "pytorch_model.bin")
    report = scan_checkpoint(folder, ScanConfig(seed=5))
    assert report.layout == "directory"
    assert [s.file for s in report.skipped if not s.name] == ["pytorch_model.bin"]
    assert "not scanned" in next(s.reason for s in report.skipped if not s.name)


def test_check_flags_the_collapsed_matrix(tmp_path: Path, runner: CliRunner) -> None:
    model = model_state()
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model}, path)
    result = runner.invoke(app, ["check", str(path), "-f", "json", "-q"])
    assert result.exit_code == 1, result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert ("PSS003", COLLAPSED) in [(f["rule"], f["tensor"]) for f in findings]


def _smooth(path: Path, out: Path, **kwargs: Any) -> Any:
    # These tests follow the optimizer reset path; the default policy is keep.
    kwargs.setdefault("optimizer_state", OptimizerPolicy.RESET)
    config = SmoothConfig(
        scan=ScanConfig(seed=5), params=SmoothingParams(target_stable_rank=3.0), **kwargs
    )
    return smooth_checkpoint(path, out, config)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smooth_writes_the_same_structure_back(
    tmp_path: Path, dtype: torch.dtype, legacy: bool
) -> None:
    model = model_state(dtype)
    original = {"model": model, "optimizer": adam_state(model), "step": 10, "note": "run-7"}
    path = tmp_path / "ckpt.pt"
    torch.save(original, path, _use_new_zipfile_serialization=not legacy)
    before = path.read_bytes()
    out = tmp_path / "repaired.pt"
    report = _smooth(path, out)
    assert [x.name for x in report.layers] == [COLLAPSED] and report.layers[0].verified
    assert path.read_bytes() == before
    assert zipfile.is_zipfile(out) is not legacy  # the input's own format
    loaded = _load(out)
    assert set(loaded) == set(original) and loaded["step"] == 10 and loaded["note"] == "run-7"
    assert list(loaded["model"]) == list(model)  # same keys, same order
    for name, tensor in model.items():
        assert loaded["model"][name].dtype == tensor.dtype
        if name != COLLAPSED:
            assert torch.equal(loaded["model"][name], tensor), name
    assert _sr(loaded["model"][COLLAPSED]) == pytest.approx(3.0, rel=2e-2)
    # The optimizer state in the same file follows --optimizer-state (reset by default): the
    # FQN-keyed moments of exactly the repaired matrix are zeroed, step counters kept.
    assert report.optimizer["reset_params"] == [COLLAPSED]
    for name, state in original["optimizer"]["state"].items():
        got = loaded["optimizer"]["state"][name]
        assert torch.equal(got["step"], state["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            if name == COLLAPSED:
                assert not got[key].any()
            else:
                assert torch.equal(got[key], state[key]), (name, key)
    sidecar = json.loads((tmp_path / "repaired.pt.pss-provenance.json").read_text())
    assert sidecar["pss.modified_tensors"] == COLLAPSED
    # --force replaces a previous pss output (recognised by its sidecar).
    again = _smooth(path, out, force=True)
    assert again.layers[0].verified


def test_tied_weights_stay_shared_and_are_smoothed_once(tmp_path: Path) -> None:
    model = model_state()
    model["lm_head.weight"] = model["model.embed_tokens.weight"]  # tied, like GPT-2
    model["model.layers.0.mlp.down_proj_alias.weight"] = model[COLLAPSED]
    path = tmp_path / "tied.bin"
    torch.save(model, path)
    names = [e.name for e in open_checkpoint(path).entries]
    assert (
        "lm_head.weight" not in names and "model.layers.0.mlp.down_proj_alias.weight" not in names
    )
    out = tmp_path / "out"
    report = _smooth(path, out)
    assert [x.name for x in report.layers] == [COLLAPSED]
    loaded = _load(out / "tied.bin")
    repaired = loaded[COLLAPSED]
    alias = loaded["model.layers.0.mlp.down_proj_alias.weight"]
    assert repaired.untyped_storage().data_ptr() == alias.untyped_storage().data_ptr()
    assert _sr(alias) == pytest.approx(3.0, rel=2e-2)
    head, embed = loaded["lm_head.weight"], loaded["model.embed_tokens.weight"]
    assert head.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()
    assert (out / "pss-provenance.json").is_file()
    # The aliases are reported (they were absent from the report), and naming one in
    # --layers points at the name it is analysed under.
    reasons = {x.name: x.reason for x in scan_checkpoint(path, ScanConfig()).skipped}
    assert reasons["model.layers.0.mlp.down_proj_alias.weight"] == (
        f"the same tensor as '{COLLAPSED}' (tied): analysed under that name"
    )
    assert "lm_head.weight" in reasons
    # A tie to a tensor that is itself skipped (a 1-D bias) is not "analysed under that name".
    bias = torch.ones(8)
    torch.save({"cls.bias": bias, "cls.decoder.bias": bias}, tmp_path / "bias.pt")
    bias_reasons = {
        x.name: x.reason for x in scan_checkpoint(tmp_path / "bias.pt", ScanConfig()).skipped
    }
    assert bias_reasons["cls.decoder.bias"] == (
        "the same tensor as 'cls.bias' (tied): listed under that name"
    )
    with pytest.raises(UsageError, match=rf"tied to '{re.escape(COLLAPSED)}'"):
        _smooth(path, tmp_path / "o2", layers=("model.layers.0.mlp.down_proj_alias.weight",))


@pytest.mark.parametrize("view", ["rows", "transpose"])
def test_names_that_are_views_of_each_other_keep_their_own_values(
    tmp_path: Path, view: str
) -> None:
    # q = qkv[:d] (or w_t = w.t()) in one storage: smoothing one wrote through to the other,
    # and the verification then failed as "a bug in pss" with nothing written.
    model = model_state()
    fused = model[COLLAPSED]  # the collapsed matrix, smoothed by the plan
    alias = "model.layers.0.mlp.down_proj_part.weight"
    model[alias] = fused[: fused.shape[0] // 2] if view == "rows" else fused.t()
    path = tmp_path / "views.pt"
    torch.save(model, path)
    before = {name: tensor.clone() for name, tensor in _load(path).items()}
    out = tmp_path / "out"
    report = _smooth(path, out)
    smoothed = {x.name for x in report.layers}
    assert COLLAPSED in smoothed
    loaded = _load(out / "views.pt")
    assert _sr(loaded[COLLAPSED]) == pytest.approx(3.0, rel=2e-2)
    for name, tensor in loaded.items():
        if name not in smoothed:
            assert torch.equal(tensor, before[name]), name
    if alias in smoothed:  # analysed as a matrix of its own: smoothed on its own
        assert _sr(loaded[alias]) == pytest.approx(3.0, rel=2e-2)


def test_a_tied_name_that_is_also_viewed_is_refused(tmp_path: Path) -> None:
    # torch.load gives a tensor saved under two names back as one object: that tie once went
    # unnoticed, the smoothed name got a storage of its own and its tied twin kept old values.
    model = model_state()
    model["lm_head_alias.weight"] = model[COLLAPSED]
    model["down_rows.weight"] = model[COLLAPSED][:4]
    path = tmp_path / "tied_and_viewed.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match=r"is tied to 'lm_head_alias\.weight'"):
        _smooth(path, tmp_path / "out")


def test_a_file_saved_without_crcs_is_read(tmp_path: Path) -> None:
    # torch.serialization.set_crc32_options(False) stores 0 for every record's CRC: nothing to
    # check, and torch.load reads it, so pss does too.
    path = tmp_path / "no_crc.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(model_state(), path)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as archive:
        assert all(info.CRC == 0 for info in archive.infolist() if info.file_size)
    reference = tmp_path / "with_crc.pt"
    torch.save(model_state(), reference)
    names = [x.name for x in scan_checkpoint(reference, ScanConfig()).layers]
    assert [x.name for x in scan_checkpoint(path, ScanConfig()).layers] == names


def test_a_view_inside_a_tuple_is_refused_with_the_names(tmp_path: Path) -> None:
    model = model_state()
    fused = model.pop(COLLAPSED)
    container = {"layers": (fused, fused[:4]), "rest": model}
    path = tmp_path / "tuple.pt"
    torch.save(container, path)
    names = [e.name for e in open_checkpoint(path).entries]
    if "layers.0" not in names:
        pytest.skip("this layout's tuple is not read as a state dict")
    with pytest.raises(CheckpointError, match=r"shares memory with 'layers\.1'"):
        smooth_checkpoint(
            path,
            tmp_path / "out",
            SmoothConfig(
                scan=ScanConfig(seed=5),
                params=SmoothingParams(target_stable_rank=3.0),
                layers=("layers.0",),
            ),
        )


def test_smooth_sharded_copies_untouched_shards_and_resets_hf_optimizer(tmp_path: Path) -> None:
    model = model_state()
    folder = _hf_sharded(tmp_path / "hf", model)
    torch.save(adam_state_by_id(model), folder / "optimizer.pt")
    torch.save({"last_epoch": 3}, folder / "scheduler.pt")
    out = tmp_path / "out"
    report = _smooth(folder, out)
    assert report.layers[0].verified
    shard_of = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    modified_shard = shard_of[COLLAPSED]
    for shard in set(shard_of.values()) - {modified_shard}:
        assert (out / shard).read_bytes() == (folder / shard).read_bytes()
    assert (out / "config.json").read_text() == "{}"
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    assert index["weight_map"] == shard_of and "pss_provenance" in index["metadata"]
    assert report.optimizer["policy"] == "reset"
    optimizer = _load(out / "optimizer.pt")
    reset = report.optimizer["reset_param_ids"]
    assert reset and all(not optimizer["state"][i]["exp_avg"].any() for i in reset)
    assert _sr(_load(out / modified_shard)[COLLAPSED]) == pytest.approx(3.0, rel=2e-2)


@pytest.mark.parametrize("policy", [OptimizerPolicy.KEEP, OptimizerPolicy.DROP])
def test_in_file_optimizer_keep_and_drop(tmp_path: Path, policy: OptimizerPolicy) -> None:
    model = model_state()
    original = {"model": model, "optimizer": adam_state_by_id(model), "epoch": 2}
    path = tmp_path / "ckpt.pth"
    torch.save(original, path)
    report = _smooth(path, tmp_path / "out.pth", optimizer_state=policy)
    loaded = _load(tmp_path / "out.pth")
    assert report.optimizer["policy"] == str(policy)
    if policy is OptimizerPolicy.DROP:
        assert set(loaded) == {"model", "epoch"}
    else:
        for pid, state in original["optimizer"]["state"].items():
            assert torch.equal(loaded["optimizer"]["state"][pid]["exp_avg"], state["exp_avg"])


def test_in_file_optimizer_reset_by_param_names(tmp_path: Path) -> None:
    model = model_state()
    optimizer = adam_state_by_id(model)
    names = sorted(adam_state(model)["state"])
    optimizer["param_groups"][0]["param_names"] = names
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model, "optimizer": optimizer}, path)
    report = _smooth(path, tmp_path / "out.pt")
    target = names.index(COLLAPSED)
    assert report.optimizer["reset_param_ids"] == [target]
    assert report.optimizer["mapping"] == "exact"
    state = _load(tmp_path / "out.pt")["optimizer"]["state"]
    assert not state[target]["exp_avg"].any()
    assert all(state[i]["exp_avg"].any() for i in state if i != target)


def adam_state_by_id(model: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An HF Trainer optimizer.pt: states keyed by integer ids in parameter order."""
    by_name = adam_state(model)
    names = sorted(by_name["state"])
    return {
        "state": {i: by_name["state"][name] for i, name in enumerate(names)},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(len(names)))}],
    }


# --------------------------------------------------------------------------------------------
# Pickles that need more than tensors are refused, and their code never runs


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
@pytest.mark.parametrize("variant", ["reduce", "global", "legacy"])
def test_code_running_pickles_are_refused(
    tmp_path: Path, runner: CliRunner, suffix: str, variant: str
) -> None:
    marker = tmp_path / "pwned"
    path = hostile_torch_file(tmp_path / f"model{suffix}", marker, variant)
    for args in (
        ["scan", str(path)],
        ["smooth", str(path), "--out", str(tmp_path / f"out{suffix}"), "-q"],
        ["smooth", str(path), "--dry-run", "-q"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 3, (args, result.stderr)
        error, hint = result.stderr.splitlines()
        assert error.startswith("Error: ") and path.name in error
        assert "arbitrary pickle" in error and ("system" in error or "posix" in error)
        assert hint.startswith("Hint: ") and "torch.save(obj.state_dict()" in hint
        assert "Traceback" not in result.stderr
    check = runner.invoke(app, ["check", str(path), "-q"])
    assert check.exit_code == 1 and "PSS002" in check.stdout and "arbitrary pickle" in check.stdout
    assert not marker.exists()
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_pickled_module_needs_arbitrary_pickle(tmp_path: Path, runner: CliRunner) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(4, 4), path)  # a pickled nn.Module, not a state dict
    result = runner.invoke(app, ["scan", str(path)])
    assert result.exit_code == 3 and "torch.nn.modules.linear.Linear" in result.stderr


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_damaged_files_are_refused(tmp_path: Path, runner: CliRunner, how: str) -> None:
    path = tmp_path / "model.pt"
    torch.save(model_state(), path)
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"hello" * 20}[how]
    )
    result = runner.invoke(app, ["scan", str(path)])
    assert result.exit_code == 3, result.stderr
    error, hint = result.stderr.splitlines()
    assert "model.pt" in error and hint.startswith("Hint: ")
    assert "Traceback" not in result.stderr


def test_flipped_bytes_inside_a_tensor_record_are_caught(tmp_path: Path, runner: CliRunner) -> None:
    # torch.load does not check a zip record's CRC: 64 flipped bytes in a tensor's data loaded
    # silently, and the scan reported other numbers for that layer with exit 0.
    path = tmp_path / "model.pt"
    torch.save(model_state(), path)
    flip_bytes_in_largest_record(path)
    for command in (["scan", str(path)], ["smooth", str(path), "--out", str(tmp_path / "o.pt")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 3, result.output
        assert "does not match its CRC-32 checksum" in result.stderr
    assert not (tmp_path / "o.pt").exists()


def test_a_file_without_tensors_fails_the_gate(tmp_path: Path, runner: CliRunner) -> None:
    path = tmp_path / "empty_dict.pt"
    torch.save({"epoch": 3}, path)
    result = runner.invoke(app, ["check", str(path), "-q"])
    assert result.exit_code == 1 and "PSS002" in result.stdout


def test_scan_re_maps_files_without_changing_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The backend forgets a mapped file every REMAP_BYTES read (bounded RSS); every read then
    # re-maps it, which must not change a single number.
    from pss_cli.checkpoint.formats.torch import torch_file

    model = model_state()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    expected = stable_ranks(path)
    monkeypatch.setattr(torch_file, "REMAP_BYTES", 0)
    assert stable_ranks(path) == expected == safetensors_reference(tmp_path, model)


def test_concurrent_loads_leave_the_process_wide_state_as_it_was(tmp_path: Path) -> None:
    # warnings.catch_warnings() is process-wide: two threads loading legacy pickles once left
    # ('ignore', 'Detected pickle protocol') in warnings.filters for good.
    import sys
    import threading
    import warnings

    path = tmp_path / "legacy.pt"
    torch.save(model_state(), path, _use_new_zipfile_serialization=False)
    filters, stderr = list(warnings.filters), sys.stderr
    errors: list[BaseException] = []

    def scan_a_few() -> None:
        try:
            for _ in range(4):
                scan_checkpoint(path, ScanConfig())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=scan_a_few) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert warnings.filters == filters and sys.stderr is stderr


@pytest.mark.parametrize(
    ("model_key", "other_key"), [("model", "ema"), ("state_dict", "state_dict_ema")]
)
def test_a_second_weight_set_beside_the_model_is_reported(
    tmp_path: Path, model_key: str, other_key: str
) -> None:
    # {"model", "ema"} or timm's {"state_dict", "state_dict_ema"}: the model's weights are
    # analysed; the other set is named under skipped (it was left out without a word).
    generator = torch.Generator().manual_seed(0)
    weights = {"fc.weight": torch.randn(64, 64, generator=generator), "fc.bias": torch.zeros(64)}
    path = tmp_path / "ckpt.pt"
    torch.save(
        {model_key: weights, other_key: {k: v.clone() for k, v in weights.items()}, "step": 3},
        path,
    )
    report = scan_checkpoint(path, ScanConfig())
    assert [layer.name for layer in report.layers] == ["fc.weight"]
    (other,) = [entry for entry in report.skipped if entry.name == other_key]
    assert "a second set of 2 weights" in other.reason and f"ckpt['{other_key}']" in other.reason
    table = CliRunner().invoke(app, ["scan", str(path)]).stdout
    assert "note: ckpt.pt: a second set of 2 weights" in table
    # Optimizer state and plain values beside the model are not weight sets.
    torch.save({"model": weights, "optimizer": {"state": {0: {"exp_avg": torch.ones(4, 4)}}}}, path)
    assert not [e for e in scan_checkpoint(path, ScanConfig()).skipped if "second set" in e.reason]
