"""The guard's TensorBoard sink (a real event file, read back) and W&B sink."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

from pss_cli.errors import GuardConfigError
from pss_cli.guard import Guard, GuardConfig, TriggerAction
from pss_cli.guard.results import GuardEvent
from pss_cli.guard.sinks import TensorBoardSink, WandbSink
from tests.guard_factory import make_model, make_optimizer, train

STEPS, TRIGGER = 12, 4
CONFIG = GuardConfig(
    spike_factor=1e-6,
    warmup_steps=TRIGGER,
    cooldown_steps=1000,
    spike_action=TriggerAction.SKIP,
    check_every=1,
    matrices_per_check=2,
)


def run_guarded(sink: Any) -> Guard:
    model = make_model()
    optimizer = make_optimizer(model)
    guard = Guard(model, optimizer, CONFIG, sinks=[sink])
    train(model, STEPS, guard.step, lambda: optimizer.zero_grad(set_to_none=True))
    return guard


def test_tensorboard_event_file_holds_metrics_layers_and_events(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "tb")
    guard = run_guarded(sink)
    sink.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    grad = events.Scalars("pss_guard/grad_norm")
    # One point per guard step, at the optimizer step counted from 1 (as HF/Lightning log).
    assert [e.step for e in grad] == list(range(1, STEPS + 1))
    triggers = [e for e in guard.events if e.kind == "trigger"]
    assert triggers and triggers[0].step == TRIGGER
    assert [e.step for e in events.Scalars("pss_guard/events/skip")] == [TRIGGER + 1]
    assert [e.value for e in events.Scalars("pss_guard/skipped")][TRIGGER] == 1.0
    layer_tags = {t for t in tags if t.startswith("pss_guard/stable_rank/")}
    assert len(layer_tags) >= 2  # the monitor's round-robin over the matrices
    name = next(iter(layer_tags)).removeprefix("pss_guard/stable_rank/")
    assert f"pss_guard/sigma_max/{name}" in tags
    assert all(e.value >= 1.0 - 1e-4 for e in events.Scalars(f"pss_guard/stable_rank/{name}"))
    texts = events.Tags()["tensors"]
    assert "pss_guard/events/text_summary" in texts


class RecordingRun:
    """Stands in for a `wandb` Run: records the calls WandbSink makes (`define_metric`, `log`)."""

    def __init__(self) -> None:
        self.defined: list[tuple[str, str | None]] = []
        self.logged: list[dict[str, Any]] = []

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.defined.append((name, step_metric))

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(dict(data))


def test_wandb_sink_logs_on_its_own_step_axis() -> None:
    run = RecordingRun()
    sink = WandbSink(run=run)
    assert ("pss_guard/*", "pss_guard/step") in run.defined
    sink.record(
        3, {"grad_norm": 2.0, "stable_rank/h.0.c_fc.weight": 7.5, "loss": float("nan")}, None
    )
    sink.record(4, {}, GuardEvent(4, "skip", "grad norm spike", {}))
    assert run.logged == [
        {
            "pss_guard/step": 4,
            "pss_guard/grad_norm": 2.0,
            "pss_guard/stable_rank/h.0.c_fc.weight": 7.5,
        },
        {"pss_guard/step": 5, "pss_guard/events/skip": 1},
    ]


def test_missing_packages_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(GuardConfigError, match="WandbSink needs the wandb package"):
        WandbSink()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(GuardConfigError, match="TensorBoardSink needs the tensorboard package"):
        TensorBoardSink("unused")
