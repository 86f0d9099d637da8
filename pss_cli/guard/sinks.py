"""TensorBoard and Weights & Biases sinks for the guard (`pss_cli.guard.telemetry.Sink`).

Both are optional: each imports its package when constructed and says how to install it when it
is missing; nothing else in pss imports them.

    guard = Guard(model, optimizer, GuardConfig(), sinks=[TensorBoardSink("runs/exp1")])

What they record: every guard step's scalars under `pss_guard/` (grad_norm, grad_norm_l2,
grad_norm_sum, loss, skipped, triggered, spike_ema, zscore), the monitor's per-matrix readings
(`pss_guard/stable_rank/<name>`, `pss_guard/sigma_max/<name>`, `pss_guard/sje/<name>` on smooth
steps), and each event as `pss_guard/events/<kind>` = 1 (trigger, skip, smooth, nonfinite,
raise), with its reason as text on TensorBoard. Non-finite values are not written (a NaN grad
norm is recorded as the `nonfinite` event instead).

Steps: guard step k is written at step k + `step_offset`. Left at None (the default) it is 1,
the optimizer step counted from 1, which is the `global_step` HF Trainer logs that step's
numbers at; the Lightning adapter sets 0, the step Lightning logs a training step's metrics at
(its global_step before the optimizer step). So the guard's curves line up with the
framework's in the same TensorBoard / W&B run.
"""

from __future__ import annotations

import math
import os
from typing import Any

from pss_cli.errors import GuardConfigError
from pss_cli.guard.results import GuardEvent

DEFAULT_PREFIX = "pss_guard"


def _offset(step_offset: int | None) -> int:
    return 1 if step_offset is None else step_offset


class TensorBoardSink:
    """Writes to a `torch.utils.tensorboard.SummaryWriter` (needs the tensorboard package)."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        writer: Any = None,
        prefix: str = DEFAULT_PREFIX,
        step_offset: int | None = None,
        layers: bool = True,
    ) -> None:
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise GuardConfigError(
                    f"TensorBoardSink needs the tensorboard package ({error})",
                    "pip install tensorboard, or leave TensorBoardSink out of sinks=",
                ) from None
            writer = SummaryWriter(log_dir=None if log_dir is None else os.fspath(log_dir))
        self.writer = writer
        self.prefix = prefix
        self.step_offset = step_offset
        self.layers = layers

    def record(self, step: int, metrics: dict[str, float], event: GuardEvent | None) -> None:
        at = step + _offset(self.step_offset)
        if event is not None:
            self.writer.add_scalar(f"{self.prefix}/events/{event.kind}", 1.0, at)
            self.writer.add_text(f"{self.prefix}/events", f"{event.kind}: {event.reason}", at)
            return
        for key, value in metrics.items():
            if ("/" in key and not self.layers) or not math.isfinite(value):
                continue
            self.writer.add_scalar(f"{self.prefix}/{key}", value, at)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Logs to a Weights & Biases run (needs the wandb package; `wandb.init()` first, or pass
    `run=`).

    The guard's numbers get their own x-axis, `pss_guard/step` (W&B's `define_metric`), and are
    logged without `step=`: W&B refuses steps that go backwards, and HF Trainer's or Lightning's
    W&B logger advances the run's own step on its own schedule.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        step_offset: int | None = None,
        layers: bool = True,
    ) -> None:
        if run is None:
            try:
                import wandb  # type: ignore[import-not-found]
            except ImportError as error:
                raise GuardConfigError(
                    f"WandbSink needs the wandb package ({error})",
                    "pip install wandb, or leave WandbSink out of sinks=",
                ) from None
            run = wandb.run
            if run is None:
                raise GuardConfigError(
                    "WandbSink: no active W&B run", "call wandb.init(...) first, or pass run="
                )
        self.run = run
        self.prefix = prefix
        self.step_offset = step_offset
        self.layers = layers
        self.step_key = f"{prefix}/step"
        run.define_metric(self.step_key)
        run.define_metric(f"{prefix}/*", step_metric=self.step_key)

    def record(self, step: int, metrics: dict[str, float], event: GuardEvent | None) -> None:
        data: dict[str, float | int] = {self.step_key: step + _offset(self.step_offset)}
        if event is not None:
            data[f"{self.prefix}/events/{event.kind}"] = 1
        else:
            for key, value in metrics.items():
                if ("/" in key and not self.layers) or not math.isfinite(value):
                    continue
                data[f"{self.prefix}/{key}"] = value
        self.run.log(data)
