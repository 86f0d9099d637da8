"""Optimizer state after a repair: reset/keep/drop, shape mapping, refusal of unsafe pickles."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.checkpoint.model import TensorEntry
from pss_cli.checkpoint.optimizer import (
    OptimizerOutcome,
    detect_master_weights,
    find_optimizer_file,
    rewrite_optimizer_state,
)
from pss_cli.config import OptimizerPolicy
from pss_cli.errors import CheckpointError


def unique_shapes_model() -> torch.nn.Module:
    # named_parameters order: 0.weight (8,4)=id0, 0.bias (8,)=id1, 2.weight (3,8)=id2,
    # 2.bias (3,)=id3; the safetensors file sorts names: 0.bias, 0.weight, 2.bias, 2.weight.
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def duplicate_shapes_model() -> torch.nn.Module:
    # 0.weight and 1.weight are both (4, 4); 0.bias and 1.bias both (4,); 2.* unique.
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def train_and_save(
    folder: Path, model: torch.nn.Module, steps: int = 3, named: bool = False
) -> tuple[Path, list[TensorEntry]]:
    """A Trainer-like folder: model.safetensors + optimizer.pt after a few AdamW steps.
    `named`: the optimizer is built from named_parameters(), so torch saves `param_names`."""
    torch.manual_seed(0)
    folder.mkdir(exist_ok=True)
    params = model.named_parameters() if named else model.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(steps):
        loss = model(torch.randn(5, 4)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    return folder / "optimizer.pt", list(open_checkpoint(folder).entries)


def load(path: Path) -> dict[str, object]:
    loaded: dict[str, object] = torch.load(path, map_location="cpu", weights_only=True)
    return loaded


def moments_zero(state: dict[int, dict[str, torch.Tensor]], pid: int) -> bool:
    return bool((state[pid]["exp_avg"] == 0).all() and (state[pid]["exp_avg_sq"] == 0).all())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reset_exact_zeroes_only_the_modified_ids(tmp_path: Path) -> None:
    model = unique_shapes_model()
    src, entries = train_and_save(tmp_path / "ck", model)
    before = sha(src)
    dst = tmp_path / "optimizer.pt"
    outcome = rewrite_optimizer_state(
        src, dst, OptimizerPolicy.RESET, entries, ["2.weight", "0.bias"]
    )
    assert outcome.mapping == "exact" and outcome.reset_param_ids == (1, 2)
    assert outcome.policy is OptimizerPolicy.RESET and outcome.file == src
    assert any("x lr" in m and "lower learning rate" in m for m in outcome.messages)
    old, new = load(src), load(dst)
    old_state, new_state = old["state"], new["state"]
    assert isinstance(old_state, dict) and isinstance(new_state, dict)
    for pid in range(4):
        assert torch.equal(new_state[pid]["step"], old_state[pid]["step"])  # step kept
        if pid in (1, 2):
            assert moments_zero(new_state, pid)
        else:
            assert torch.equal(new_state[pid]["exp_avg"], old_state[pid]["exp_avg"])
            assert torch.equal(new_state[pid]["exp_avg_sq"], old_state[pid]["exp_avg_sq"])
    assert new["param_groups"] == old["param_groups"]
    assert sha(src) == before
    # the rewritten state loads into a fresh AdamW for the same model and can step
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(new)
    model(torch.randn(2, 4)).sum().backward()
    fresh.step()


def test_reset_falls_back_to_all_when_shapes_repeat(tmp_path: Path) -> None:
    model = duplicate_shapes_model()
    src, entries = train_and_save(tmp_path / "ck", model)
    dst = tmp_path / "optimizer.pt"
    outcome = rewrite_optimizer_state(src, dst, OptimizerPolicy.RESET, entries, ["0.weight"])
    assert outcome.mapping == "all" and outcome.reset_param_ids == tuple(range(6))
    assert any(
        "cannot tell which optimizer parameters" in m and "0.weight" in m for m in outcome.messages
    )
    assert any("ALL 6 parameters" in m for m in outcome.messages)
    new, old = load(dst), load(src)
    new_state, old_state = new["state"], old["state"]
    assert isinstance(new_state, dict) and isinstance(old_state, dict)
    for pid in range(6):
        assert moments_zero(new_state, pid)
        assert torch.equal(new_state[pid]["step"], old_state[pid]["step"])
    torch.optim.AdamW(model.parameters()).load_state_dict(new)


def test_reset_unique_shape_in_duplicate_model_is_exact(tmp_path: Path) -> None:
    src, entries = train_and_save(tmp_path / "ck", duplicate_shapes_model())
    outcome = rewrite_optimizer_state(
        src, tmp_path / "o.pt", OptimizerPolicy.RESET, entries, ["2.weight"]
    )
    assert outcome.mapping == "exact" and outcome.reset_param_ids == (4,)


def test_reset_all_when_shape_missing_from_optimizer(tmp_path: Path) -> None:
    # A float buffer of unique shape that the optimizer does not hold (frozen/buffer).
    model = unique_shapes_model()
    src, entries = train_and_save(tmp_path / "ck", model)
    extra = TensorEntry("buf", entries[0].file, "F32", (7, 7), (0, 196))
    outcome = rewrite_optimizer_state(
        src, tmp_path / "o.pt", OptimizerPolicy.RESET, [*entries, extra], ["buf"]
    )
    assert outcome.mapping == "all" and outcome.reset_param_ids == (0, 1, 2, 3)


def test_keep_is_byte_identical(tmp_path: Path) -> None:
    src, entries = train_and_save(tmp_path / "ck", unique_shapes_model())
    dst = tmp_path / "optimizer.pt"
    outcome = rewrite_optimizer_state(src, dst, OptimizerPolicy.KEEP, entries, ["2.weight"])
    assert sha(dst) == sha(src)
    assert outcome == OptimizerOutcome(OptimizerPolicy.KEEP, src, (), "none", outcome.messages)
    assert any("old values" in m for m in outcome.messages)


def test_drop_writes_nothing(tmp_path: Path) -> None:
    src, entries = train_and_save(tmp_path / "ck", unique_shapes_model())
    dst = tmp_path / "out" / "optimizer.pt"
    (tmp_path / "out").mkdir()
    outcome = rewrite_optimizer_state(src, dst, OptimizerPolicy.DROP, entries, ["2.weight"])
    assert not dst.exists() and list((tmp_path / "out").iterdir()) == []
    assert outcome.mapping == "none" and outcome.reset_param_ids == ()
    assert any("restart the LR schedule" in m and "scheduler.pt" in m for m in outcome.messages)


class Malicious:
    """Unpickling this would create the marker file: the attack weights_only must block."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))  # open(..., "w") creates the marker file


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    src = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": Malicious(marker)}, src)
    with pytest.raises(CheckpointError) as info:
        rewrite_optimizer_state(src, tmp_path / "o.pt", OptimizerPolicy.RESET, [], ["a"])
    assert "needs pickle" in info.value.message and "refuses to unpickle" in info.value.message
    assert "Unsupported global: GLOBAL io.open" in info.value.message
    assert str(src) in info.value.message and "\n" not in info.value.message
    assert info.value.hint is not None and "drop" in info.value.hint
    assert not marker.exists() and not (tmp_path / "o.pt").exists()
    # a raw pickle (not torch's zip format) with the same payload is refused too
    src.write_bytes(pickle.dumps(Malicious(marker)))
    with pytest.raises(CheckpointError):
        rewrite_optimizer_state(src, tmp_path / "o.pt", OptimizerPolicy.RESET, [], ["a"])
    assert not marker.exists()


def test_non_adam_state_is_refused(tmp_path: Path) -> None:
    model = unique_shapes_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    src = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), src)
    with pytest.raises(CheckpointError, match="not an Adam-style optimizer"):
        rewrite_optimizer_state(src, tmp_path / "o.pt", OptimizerPolicy.RESET, [], ["x"])


def test_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "optimizer.pt"
    torch.save({"weights": torch.ones(2)}, src)
    with pytest.raises(CheckpointError, match="not a torch optimizer state_dict"):
        rewrite_optimizer_state(src, tmp_path / "o.pt", OptimizerPolicy.RESET, [], ["x"])


def test_find_optimizer_file(tmp_path: Path) -> None:
    assert find_optimizer_file(tmp_path) is None
    (tmp_path / "optimizer.bin").write_bytes(b"x")
    assert find_optimizer_file(tmp_path) == tmp_path / "optimizer.bin"
    (tmp_path / "optimizer.pt").write_bytes(b"x")
    assert find_optimizer_file(tmp_path) == tmp_path / "optimizer.pt"
    assert find_optimizer_file(tmp_path / "optimizer.pt") is None


def test_detect_master_weights(tmp_path: Path) -> None:
    assert detect_master_weights(tmp_path) == []
    step = tmp_path / "global_step100"
    step.mkdir()
    names = [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "notes.txt",
    ]
    for name in names:
        (step / name).write_bytes(b"x")
    (tmp_path / "zero_to_fp32.py").write_text("# script")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    found = detect_master_weights(tmp_path)
    assert found == sorted([step / names[0], step / names[1], tmp_path / "zero_to_fp32.py"])


def test_reset_maps_repeated_shapes_exactly_by_saved_param_names(tmp_path: Path) -> None:
    # Every shape repeats (as in any model with repeated blocks): by shape alone pss would
    # have to reset everything; the param_names torch saved make the map exact.
    src, entries = train_and_save(tmp_path / "ck", duplicate_shapes_model(), named=True)
    dst = tmp_path / "out.pt"
    outcome = rewrite_optimizer_state(src, dst, OptimizerPolicy.RESET, entries, ["1.weight"])
    assert outcome.mapping == "exact" and outcome.reset_param_ids == (2,)
    assert any("param_names" in m for m in outcome.messages)
    state = load(dst)["state"]
    assert isinstance(state, dict)
    assert moments_zero(state, 2)
    assert not any(moments_zero(state, pid) for pid in (0, 1, 3, 4, 5))


def test_reset_without_param_names_and_repeated_shapes_resets_all(tmp_path: Path) -> None:
    src, entries = train_and_save(tmp_path / "ck", duplicate_shapes_model(), named=False)
    outcome = rewrite_optimizer_state(
        src, tmp_path / "out.pt", OptimizerPolicy.RESET, entries, ["1.weight"]
    )
    assert outcome.mapping == "all" and len(outcome.reset_param_ids) == 6


@pytest.mark.parametrize("steps", [3, 50, 3000])
def test_the_reset_note_states_the_first_update_adam_really_takes(
    tmp_path: Path, steps: int
) -> None:
    # The note said ~3.2 x lr whatever the step; at step 50 Adam's bias correction still damps
    # the update to ~0.7 x lr (measured on a resumed HF Trainer run: 0.71). Here the resumed
    # optimizer takes one real step and the median |dW| / lr is compared with the note.
    import re

    model = unique_shapes_model()
    src, entries = train_and_save(tmp_path / "ck", model, steps=steps)
    dst = tmp_path / "optimizer.pt"
    outcome = rewrite_optimizer_state(src, dst, OptimizerPolicy.RESET, entries, ["0.weight"])
    stated = float(re.search(r"about ([0-9.]+) x lr", " ".join(outcome.messages)).group(1))  # type: ignore[union-attr]
    lr = 1e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    optimizer.load_state_dict(load(dst))
    before = model[0].weight.detach().clone()
    model(torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    measured = float((model[0].weight.detach() - before).abs().median()) / lr
    assert stated == pytest.approx(measured, abs=0.051)  # the note's one decimal
