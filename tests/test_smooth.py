"""`pss smooth` end to end: layouts, dtypes, methods, optimizer state, refusals, verification."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.config import ComputeDtype, OptimizerPolicy, ScanConfig, SmoothingMethod
from pss_cli.core.smoothing import SmoothingParams
from pss_cli.errors import UsageError
from pss_cli.pipeline import scan_checkpoint
from pss_cli.repair import SmoothConfig, smooth_checkpoint
from tests.safetensors_factory import write_index, write_tensors
from tests.spectra_factory import power_law, with_spectrum

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
DIVERGED = SAMPLES / "diverged" / "model.safetensors"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_hashes(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): _sha(p) for p in files}


class TinyMLP(torch.nn.Module):
    """A model whose state dict matches `_model_tensors` (for load_state_dict + forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(48, 160)
        self.down = torch.nn.Linear(160, 48)
        self.norm = torch.nn.LayerNorm(48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(torch.relu(self.up(x))))


def _model_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model = TinyMLP()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Healthy power-law spectra, then one collapsed matrix: a spike 8x the bulk.
    state["up.weight"] = with_spectrum(160, 48, power_law(48, 0.3), seed=1).float()
    spiky = power_law(48, 0.3).clone()
    spiky[0] = 8.0
    state["down.weight"] = with_spectrum(48, 160, spiky, seed=2).float()
    return {k: v.to(dtype) for k, v in state.items()}


def _config(**kwargs: object) -> SmoothConfig:
    params = kwargs.pop("params", SmoothingParams(target_stable_rank=6.0))
    return SmoothConfig(params=params, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_file_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    source = (
        write_tensors(tmp_path / "in" / "model.safetensors", _model_tensors(dtype))
        if ((tmp_path / "in").mkdir() or True)
        else None
    )
    assert source is not None
    before = _tree_hashes(source)
    out = tmp_path / "out"
    report = smooth_checkpoint(source, out, _config())
    assert _tree_hashes(source) == before  # input untouched
    assert [layer.name for layer in report.layers] == ["down.weight"]
    layer = report.layers[0]
    assert layer.verified and layer.stable_rank_after is not None
    assert layer.stable_rank_after == pytest.approx(6.0, rel=2e-2)
    assert layer.sigma_max_after is not None and layer.sigma_max_after < layer.sigma_max_before
    original, repaired = load_file(str(source)), load_file(str(out / "model.safetensors"))
    assert set(original) == set(repaired)
    for name in original:
        assert repaired[name].dtype == original[name].dtype
        assert repaired[name].shape == original[name].shape
        if name != "down.weight":
            assert torch.equal(repaired[name], original[name])
    assert report.untouched_tensors_verified == len(original) - 1
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    assert metadata["pss.modified_tensors"] == "down.weight"
    assert metadata["pss.method"] == "cap"
    model = TinyMLP().to(dtype)
    model.load_state_dict(repaired)
    assert torch.isfinite(model(torch.randn(3, 48).to(dtype))).all()


def test_singular_vectors_and_small_values_are_kept(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    tensors = _model_tensors(torch.float64)
    source = write_tensors(tmp_path / "in" / "m.safetensors", tensors)
    float64 = ScanConfig(compute_dtype=ComputeDtype.FLOAT64)
    smooth_checkpoint(source, tmp_path / "out", _config(scan=float64))
    new = load_file(str(tmp_path / "out" / "m.safetensors"))["down.weight"]
    old = tensors["down.weight"]
    s_old, s_new = torch.linalg.svdvals(old), torch.linalg.svdvals(new)
    level = float(s_new[0])
    # Values under the cap are untouched; those above come down to the cap level.
    torch.testing.assert_close(s_new[s_old < level], s_old[s_old < level], rtol=1e-9, atol=1e-12)
    assert (s_new <= s_old + 1e-12).all()
    u, _, vh = torch.linalg.svd(old)
    # The top singular vectors still are singular vectors of the new matrix.
    torch.testing.assert_close(new @ vh[0], u[:, 0] * level, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", list(SmoothingMethod))
def test_every_method_runs_and_verifies(tmp_path: Path, method: SmoothingMethod) -> None:
    out = tmp_path / "out.safetensors"
    report = smooth_checkpoint(DIVERGED, out, SmoothConfig(params=SmoothingParams(method=method)))
    assert len(report.layers) == 3
    assert all(layer.verified for layer in report.layers), report.layers
    if method is not SmoothingMethod.SOFTMAX:
        assert all(
            layer.sigma_max_after is not None and layer.sigma_max_after < layer.sigma_max_before
            for layer in report.layers
        )


def test_default_target_is_the_median_of_healthy_peers(tmp_path: Path) -> None:
    scan = scan_checkpoint(DIVERGED, ScanConfig())
    peers = sorted(
        x.stable_rank
        for x in scan.layers
        if x.role == "mlp_up" and not x.flags and x.stable_rank is not None
    )
    report = smooth_checkpoint(DIVERGED, None, SmoothConfig(dry_run=True))
    fc = next(x for x in report.layers if x.name == "transformer.h.2.mlp.c_fc.weight")
    assert fc.target_stable_rank == pytest.approx(
        peers[len(peers) // 2]
        if len(peers) % 2
        else (peers[len(peers) // 2 - 1] + peers[len(peers) // 2]) / 2
    )
    assert "median" in (fc.target_source or "")


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = smooth_checkpoint(DIVERGED, out, SmoothConfig(dry_run=True))
    assert report.dry_run and len(report.layers) == 3
    assert all(layer.verified is None for layer in report.layers)
    assert not out.exists()


def test_sharded_round_trip_keeps_names_and_index(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    tensors = _model_tensors(torch.bfloat16)
    first = {k: v for k, v in tensors.items() if k.startswith("up")}
    second = {k: v for k, v in tensors.items() if not k.startswith("up")}
    write_tensors(source / "model-00001-of-00002.safetensors", first)
    write_tensors(source / "model-00002-of-00002.safetensors", second)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    write_index(source / "model.safetensors.index.json", weight_map)
    (source / "config.json").write_text('{"hidden": 48}')
    before = _tree_hashes(source)
    out = tmp_path / "out"
    smooth_checkpoint(source, out, _config())
    assert _tree_hashes(source) == before
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert _sha(out / "config.json") == _sha(source / "config.json")
    assert _sha(out / "model-00001-of-00002.safetensors") != ""  # written
    assert torch.equal(
        load_file(str(out / "model-00001-of-00002.safetensors"))["up.weight"], first["up.weight"]
    )


def _trainer_folder(tmp_path: Path) -> Path:
    """A HF-Trainer-like folder with a real AdamW optimizer.pt after a few steps."""
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    model = TinyMLP()
    model.load_state_dict(_model_tensors(torch.float32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 48)).pow(2).mean().backward()
        optimizer.step()
    write_tensors(
        folder / "model.safetensors", {k: v.detach() for k, v in model.state_dict().items()}
    )
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save({"last_epoch": 10}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text('{"global_step": 10, "log_history": []}')
    return folder


def test_trainer_folder_resets_exactly_the_modified_moments(tmp_path: Path) -> None:
    folder = _trainer_folder(tmp_path)
    before = _tree_hashes(folder)
    out = tmp_path / "repaired"
    report = smooth_checkpoint(folder, out, _config(optimizer_state=OptimizerPolicy.RESET))
    assert _tree_hashes(folder) == before
    assert report.optimizer["mapping"] == "exact"
    state = torch.load(out / "optimizer.pt", weights_only=True)
    # named_parameters order: up.weight 0, up.bias 1, down.weight 2, down.bias 3, norm 4, 5.
    assert report.optimizer["reset_param_ids"] == [2]
    assert torch.count_nonzero(state["state"][2]["exp_avg"]) == 0
    assert torch.count_nonzero(state["state"][0]["exp_avg"]) > 0
    assert float(state["state"][2]["step"]) == 3.0
    for name in ("scheduler.pt", "trainer_state.json"):
        assert _sha(out / name) == _sha(folder / name)
    fresh = TinyMLP()
    fresh.load_state_dict(load_file(str(out / "model.safetensors")))
    torch.optim.AdamW(fresh.parameters(), lr=1e-3).load_state_dict(state)


@pytest.mark.parametrize("policy", [OptimizerPolicy.KEEP, OptimizerPolicy.DROP])
def test_optimizer_keep_and_drop(tmp_path: Path, policy: OptimizerPolicy) -> None:
    folder = _trainer_folder(tmp_path)
    out = tmp_path / "repaired"
    report = smooth_checkpoint(folder, out, _config(optimizer_state=policy))
    if policy is OptimizerPolicy.KEEP:
        assert _sha(out / "optimizer.pt") == _sha(folder / "optimizer.pt")
    else:
        assert not (out / "optimizer.pt").exists()
    assert report.messages  # both warn


def test_deepspeed_master_weights_are_refused(tmp_path: Path) -> None:
    folder = _trainer_folder(tmp_path)
    (folder / "global_step10").mkdir()
    (folder / "global_step10" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(UsageError, match="master"):
        smooth_checkpoint(folder, tmp_path / "out", _config())
    assert not (tmp_path / "out").exists()
    report = smooth_checkpoint(folder, tmp_path / "out", _config(allow_master_weights=True))
    assert report.layers


def test_refuses_to_overwrite_the_input_or_an_existing_output(tmp_path: Path) -> None:
    folder = _trainer_folder(tmp_path)
    with pytest.raises(UsageError):
        smooth_checkpoint(folder, folder, _config())
    with pytest.raises(UsageError):
        smooth_checkpoint(folder, folder / "inside", _config())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists"):
        smooth_checkpoint(folder, out, _config())
    # --force replaces a previous pss output, never an arbitrary folder (a typo'd --out).
    with pytest.raises(UsageError, match="holds no pss output"):
        smooth_checkpoint(folder, out, _config(force=True))
    assert (out / "keep.txt").read_text() == "mine"
    previous = tmp_path / "previous"
    smooth_checkpoint(folder, previous, _config())
    (previous / "stale.txt").write_text("from an earlier repair")
    smooth_checkpoint(folder, previous, _config(force=True))
    assert (previous / "model.safetensors").exists() and not (previous / "stale.txt").exists()


def test_stacked_experts_are_smoothed_one_by_one(tmp_path: Path) -> None:
    healthy = with_spectrum(40, 32, power_law(32, 0.3), seed=1).float()
    spiky_values = power_law(32, 0.3).clone()
    spiky_values[0] = 10.0
    collapsed = with_spectrum(40, 32, spiky_values, seed=2).float()
    stack = torch.stack([healthy, collapsed, healthy * 1.1])
    source = write_tensors(tmp_path / "moe.safetensors", {"layers.0.mlp.experts.down_proj": stack})
    report = smooth_checkpoint(source, tmp_path / "out.safetensors", SmoothConfig())
    assert [(x.name, x.index) for x in report.layers] == [("layers.0.mlp.experts.down_proj", 1)]
    new = load_file(str(tmp_path / "out.safetensors"))["layers.0.mlp.experts.down_proj"]
    assert torch.equal(new[0], stack[0]) and torch.equal(new[2], stack[2])
    assert not torch.equal(new[1], stack[1])
    assert report.layers[0].verified
    # One expert by the name the report prints for it ("[2]" alone would be a glob class), or
    # by a glob on the name followed by the index (one expert of every matching tensor).
    for position, pattern in enumerate(
        ("layers.0.mlp.experts.down_proj[2]", "*.experts.down_proj[2]")
    ):
        named = smooth_checkpoint(
            source,
            tmp_path / f"named{position}.safetensors",
            SmoothConfig(layers=(pattern,), params=SmoothingParams(target_stable_rank=25.0)),
        )
        assert [(x.name, x.index) for x in named.layers] == [("layers.0.mlp.experts.down_proj", 2)]


def test_cli_smooth_json_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "fixed"
    result = runner.invoke(app, ["smooth", str(DIVERGED), "--out", str(out), "-f", "json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["command"] == "smooth" and len(data["layers"]) == 3
    assert all(layer["verified"] for layer in data["layers"])
    again = runner.invoke(app, ["smooth", str(DIVERGED), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr
    missing = runner.invoke(app, ["smooth", str(DIVERGED)])
    assert missing.exit_code == 2 and "--out is required" in missing.stderr
    rescan = runner.invoke(app, ["scan", str(out), "-f", "json", "-q"])
    assert json.loads(rescan.stdout)["summary"]["flagged"] == 0


def test_healthy_checkpoint_writes_nothing(tmp_path: Path) -> None:
    healthy = SAMPLES / "healthy" / "model.safetensors"
    out = tmp_path / "out"
    report = smooth_checkpoint(healthy, out, SmoothConfig())
    assert report.layers == () and report.output is None
    assert any("nothing was written" in m for m in report.messages)
    assert not out.exists()


def test_out_problems_are_found_before_any_work(tmp_path: Path, monkeypatch) -> None:
    import pss_cli.repair as repair

    def no_scan(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("scanned before checking --out")

    monkeypatch.setattr(repair, "scan_checkpoint", no_scan)
    with pytest.raises(UsageError, match="does not exist"):
        smooth_checkpoint(DIVERGED, tmp_path / "missing" / "out", SmoothConfig())
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "x").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        smooth_checkpoint(DIVERGED, tmp_path / "exists", SmoothConfig())


@pytest.mark.parametrize("scale", [1e300, 1e-50])
def test_extreme_float64_weights_are_smoothed(tmp_path: Path, scale: float) -> None:
    (tmp_path / "in").mkdir()
    tensors = {k: v.double() for k, v in _model_tensors(torch.float32).items()}
    tensors["down.weight"] = tensors["down.weight"] * scale
    source = write_tensors(tmp_path / "in" / "m.safetensors", tensors)
    report = smooth_checkpoint(source, tmp_path / "out", _config())
    layer = report.layers[0]
    assert layer.verified and layer.stable_rank_after == pytest.approx(6.0, rel=1e-3)
    assert layer.sigma_max_after is not None and layer.sigma_max_after < layer.sigma_max_before


def test_glob_characters_in_tensor_names(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    tensors = _model_tensors(torch.float32)
    tensors["h.0.mlp.w[0]*"] = tensors.pop("down.weight")
    source = write_tensors(tmp_path / "in" / "m.safetensors", tensors)
    report = smooth_checkpoint(source, tmp_path / "out", _config())
    assert [x.name for x in report.layers] == ["h.0.mlp.w[0]*"]
    assert report.layers[0].verified


def test_bad_method_options_are_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    for argv in (
        ["--method", "softmax", "--temperature", "0"],
        ["--method", "clip", "--clip-count", "0"],
        ["--target-stable-rank", "nan"],
        ["--target-stable-rank", "0.5"],
    ):
        result = runner.invoke(app, ["smooth", str(DIVERGED), "--dry-run", *argv])
        assert result.exit_code == 2, (argv, result.output)
        assert "internal error" not in result.stderr
    result = runner.invoke(
        app, ["smooth", str(DIVERGED), "--dry-run", "--method", "clip", "--clip-count", "64"]
    )
    assert result.exit_code == 2 and "--clip-count" in result.stderr


def test_quantized_matrices_are_left_alone(tmp_path: Path) -> None:
    spiky = power_law(48, 0.3).clone()
    spiky[0] = 8.0
    weight = with_spectrum(64, 48, spiky, seed=2).float()
    scale = weight.abs().amax(dim=1, keepdim=True) / 127.0
    tensors = {
        "w.qweight": torch.round(weight / scale).to(torch.int8),
        "w.scale": scale,
    }
    source = write_tensors(tmp_path / "q.safetensors", tensors)
    report = smooth_checkpoint(source, tmp_path / "out", SmoothConfig())
    assert report.layers == ()
    assert "quantized" in report.not_smoothed[0].reason
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["file", "folder", "pt", "dcp"])
def test_verification_runs_before_publishing_and_a_failure_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    import pss_cli.repair.verify as repair

    tensors = load_file(str(DIVERGED))
    if layout == "file":
        source, out = DIVERGED, tmp_path / "out.safetensors"
    elif layout == "folder":
        source, out = SAMPLES / "trainer" / "checkpoint-100", tmp_path / "out"
    elif layout == "pt":
        source, out = tmp_path / "model.pt", tmp_path / "out.pt"
        torch.save(tensors, source)
    else:
        import torch.distributed.checkpoint as dcp

        source, out = tmp_path / "dcp", tmp_path / "out"
        with pytest.warns(UserWarning):
            dcp.save(dict(tensors), checkpoint_id=str(source), no_dist=True)
    before = _tree_hashes(source) if source.is_dir() else {"": _sha(source)}
    seen: list[tuple[Path, bool]] = []
    real_verify = repair._verify

    def spy(layout_: object, staged: Path, *args: object) -> object:
        seen.append((staged, out.exists()))
        return real_verify(layout_, staged, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(repair, "_verify", spy)
    smooth_checkpoint(source, out, _config(all_layers=True))
    assert len(seen) == 1 and seen[0][0] != out and not seen[0][1]  # staged, OUT not there yet
    assert out.exists()

    # A failed verification with --force: the previous output stays, nothing new appears.
    previous = _tree_hashes(out) if out.is_dir() else {"": _sha(out)}
    monkeypatch.setattr(repair, "_verified", lambda *_: False)
    result = CliRunner().invoke(
        app, ["smooth", str(source), "--all", "--out", str(out), "--force", "--quiet"]
    )
    assert result.exit_code == 3, result.output
    assert "verification failed" in result.output and "nothing was written" in result.output
    assert (_tree_hashes(out) if out.is_dir() else {"": _sha(out)}) == previous
    assert not [p for p in tmp_path.iterdir() if ".pss-tmp-" in p.name]
    assert (_tree_hashes(source) if source.is_dir() else {"": _sha(source)}) == before


def test_the_default_keeps_the_optimizer_state_byte_for_byte(tmp_path: Path) -> None:
    # keep is the default since docs/EXPERIMENTS.md: reset resumes at the same LR exploded.
    folder = _trainer_folder(tmp_path)
    report = smooth_checkpoint(folder, tmp_path / "repaired", _config())
    assert report.optimizer["policy"] == "keep"
    assert _sha(tmp_path / "repaired" / "optimizer.pt") == _sha(folder / "optimizer.pt")


@pytest.mark.parametrize("factor", [1.0, 10.0, 0.1])
def test_softmax_follows_the_documented_formula_at_every_scale(
    tmp_path: Path, factor: float
) -> None:
    # s' = softmax(s / t) * sum(s) over the top ceil(SR) values of W itself (the paper's code,
    # t = 4): not scale-invariant. Applied to W / ||W||_F it once gave W, 10 W and 0.1 W the
    # same predicted stable rank.
    (tmp_path / "in").mkdir()
    spectrum = power_law(48, 0.3).clone()
    spectrum[0] = 8.0
    weight = (with_spectrum(48, 160, spectrum, seed=2) * factor).double()
    source = write_tensors(tmp_path / "in" / "m.safetensors", {"down.weight": weight})
    params = SmoothingParams(method=SmoothingMethod.SOFTMAX, temperature=4.0)
    report = smooth_checkpoint(source, tmp_path / "out", _config(params=params))
    assert [x.name for x in report.layers] == ["down.weight"]
    written = load_file(tmp_path / "out" / "m.safetensors")["down.weight"]
    s = torch.linalg.svdvals(weight)
    window = math.ceil(float(weight.square().sum() / s[0] ** 2) - 1e-12)
    expected = s.clone()
    expected[:window] = torch.softmax(s[:window] / 4.0, dim=0) * s[:window].sum()
    expected = expected.sort(descending=True).values
    got = torch.linalg.svdvals(written)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9 * float(s[0]))


def test_a_change_that_wipes_the_matrix_out_is_reported(tmp_path: Path) -> None:
    # A near rank-1 matrix capped to stable rank 6 keeps only what lay below sigma_1.
    (tmp_path / "in").mkdir()
    tensors = _model_tensors(torch.float32)
    generator = torch.Generator().manual_seed(3)
    u, v = torch.randn(48, 1, generator=generator), torch.randn(1, 160, generator=generator)
    tensors["down.weight"] = u @ v + 1e-4 * torch.randn(48, 160, generator=generator)
    source = write_tensors(tmp_path / "in" / "m.safetensors", tensors)
    report = smooth_checkpoint(source, tmp_path / "out", _config())
    layer = next(x for x in report.layers if x.name == "down.weight")
    assert layer.relative_change > 0.99
    assert any("'down.weight' changes by" in message for message in report.messages)
    healthy = smooth_checkpoint(
        SAMPLES / "diverged" / "model.safetensors", tmp_path / "o2", SmoothConfig()
    )
    assert healthy.layers and all(x.relative_change < 0.9 for x in healthy.layers)
    assert not any("of its norm" in message for message in healthy.messages)


@pytest.mark.parametrize(
    ("dtype", "kind"),
    [
        (torch.float32, "exact"),
        (torch.float32, "outer"),
        (torch.float32, "noise"),
        (torch.bfloat16, "outer"),
        (torch.float16, "outer"),
    ],
    ids=[
        "F32-identical-columns",
        "F32-outer-product",
        "F32-outer-product-with-1e-6-noise",
        "BF16-outer-product",
        "F16-outer-product",
    ],
)
@pytest.mark.parametrize("method", [SmoothingMethod.CAP, SmoothingMethod.CLIP])
def test_a_rank_one_matrix_is_left_alone_and_the_rest_is_smoothed(
    tmp_path: Path, dtype: torch.dtype, kind: str, method: SmoothingMethod
) -> None:
    # What lies below its sigma_1 is rounding (of the measurement, or of the stored entries:
    # 2e-3 of the norm in bf16), which cap and clip would make the whole matrix. Before, F32
    # failed the verification and wrote nothing for the whole run (also with noise at 1e-6 of
    # the norm: stable rank 5.994 for 6); BF16 and F16 were written at 2e-3 and 2e-4 of their
    # norms.
    (tmp_path / "in").mkdir()
    tensors = _model_tensors(dtype)
    generator = torch.Generator().manual_seed(5)
    column = torch.randn(96, 1, generator=generator)
    if kind == "exact":
        rank_one = column.expand(96, 80).contiguous()  # identical columns: exactly rank one
    else:
        rank_one = column @ torch.randn(1, 80, generator=generator)  # rank one, then rounded
    if kind == "noise":
        noise = torch.randn(96, 80, generator=generator)
        rank_one = rank_one + noise * (1e-6 * rank_one.norm() / noise.norm())
    tensors["rank_one.weight"] = rank_one.to(dtype)
    source = write_tensors(tmp_path / "in" / "m.safetensors", tensors)
    params = SmoothingParams(method=method, target_stable_rank=6.0)
    report = smooth_checkpoint(source, tmp_path / "out", _config(params=params))
    assert [layer.name for layer in report.layers] == ["down.weight"]
    assert all(layer.verified for layer in report.layers)
    (left,) = [x for x in report.not_smoothed if x.name == "rank_one.weight"]
    assert left.reason.startswith("numerically of low rank")
    written = load_file(str(tmp_path / "out" / "m.safetensors"))
    assert torch.equal(written["rank_one.weight"], tensors["rank_one.weight"])


def test_a_flagged_embedding_left_alone_is_named_with_the_way_to_smooth_it(
    tmp_path: Path,
) -> None:
    # `check` fails on a collapsed embedding; a default smooth leaves it (role), and says so
    # with the --layers to use, instead of an unexplained "nothing to change".
    generator = torch.Generator().manual_seed(0)
    spike = torch.randn(200, 1, generator=generator) @ torch.randn(1, 64, generator=generator)
    source = write_tensors(
        tmp_path / "m.safetensors",
        {
            "model.embed_tokens.weight": torch.randn(200, 64, generator=generator) + 5 * spike,
            "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=generator),
        },
    )
    report = smooth_checkpoint(source, tmp_path / "out.safetensors", SmoothConfig())
    assert report.layers == () and report.output is None
    (left,) = report.not_smoothed
    assert left.name == "model.embed_tokens.weight"
    assert "--layers 'model.embed_tokens.weight'" in left.reason
    named = smooth_checkpoint(
        source,
        tmp_path / "named.safetensors",
        SmoothConfig(layers=("model.embed_tokens.weight",)),
    )
    assert [layer.name for layer in named.layers] == ["model.embed_tokens.weight"]
    assert named.not_smoothed == ()


def test_dry_run_refuses_the_outputs_the_real_run_refuses(tmp_path: Path) -> None:
    # --dry-run is the preflight of the same command: an OUT the write would refuse (existing,
    # the input itself, in a missing folder) is refused by the dry run too, before computing.
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"x")
    for out, message in (
        (existing, "already exists"),
        (DIVERGED, ""),
        (tmp_path / "missing" / "out.safetensors", ""),
    ):
        with pytest.raises(UsageError, match=message):
            smooth_checkpoint(DIVERGED, out, SmoothConfig(dry_run=True))
        with pytest.raises(UsageError, match=message):
            smooth_checkpoint(DIVERGED, out, SmoothConfig())
    assert existing.read_bytes() == b"x"


def test_a_method_that_leaves_the_matrix_more_singular_says_so(tmp_path: Path) -> None:
    # softmax sharpens: on a near rank-1 matrix it moves sigma_2 into sigma_1 and the stable
    # rank falls; the result is "verified" (it matches its prediction), so a note says it.
    (tmp_path / "in").mkdir()
    spectrum = power_law(48, 0.3).clone()
    spectrum[0] = 60.0
    weight = with_spectrum(48, 160, spectrum, seed=4).float()
    source = write_tensors(tmp_path / "in" / "m.safetensors", {"down.weight": weight})
    params = SmoothingParams(method=SmoothingMethod.SOFTMAX, temperature=4.0)
    report = smooth_checkpoint(source, tmp_path / "out", _config(params=params))
    (layer,) = report.layers
    assert layer.stable_rank_after is not None
    assert layer.stable_rank_after < layer.stable_rank_before
    assert any("'down.weight' is more singular after smoothing" in m for m in report.messages)
    capped = smooth_checkpoint(source, tmp_path / "capped", _config())
    assert not any("more singular" in m for m in capped.messages)
