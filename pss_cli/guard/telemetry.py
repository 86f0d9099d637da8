"""Where the guard's numbers go: the `Sink` protocol, and the JSONL event log.

A sink's `record(step, metrics, event)` is called once per guard step with the step's metrics
(event None), and once per event (metrics {}). Metric keys: "grad_norm" (the watched norm),
"grad_norm_l2", "grad_norm_sum", "loss", "skipped" and "triggered" (0/1), "spike_ema", "zscore",
and per matrix "stable_rank/<name>", "sigma_max/<name>" (monitor checks), "sje/<name>" (smooth
steps). Sinks must never stop training: the guard catches what a sink raises, warns once per
sink and carries on. TensorBoard and W&B sinks live beside this module (pss_cli.guard.sinks),
used when those packages are installed.

JSONL format (docs/GUARD.md): a header line {"schema": "pss-guard-events", "version": 1,
"config": {...}, "started": "<ISO time>"}, then one object per line with "step" and "kind":
"decision" (grad_norm, grad_norm_sum, grad_norm_l2, loss, skipped, triggered, spike_ema, zscore),
"metrics" ({"layers": {name: {"stable_rank", "sigma_max", "sje"}}}), and the events "trigger",
"skip", "smooth", "nonfinite", "raise", "restart" (reason and detail fields). Non-finite numbers are
written as null (strict JSON).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from pss_cli.guard.results import GuardEvent

EVENT_LOG_SCHEMA = "pss-guard-events"
EVENT_LOG_VERSION = 1


@runtime_checkable
class Sink(Protocol):
    """Receives each step's metrics (event None) and each event (metrics {})."""

    def record(self, step: int, metrics: dict[str, float], event: GuardEvent | None) -> None: ...


def json_safe(value: Any) -> Any:
    """NaN/Inf -> None, tuples -> lists, recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class JsonlSink:
    """Appends records to a JSONL file, line-buffered; an I/O error warns once and disables it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: dict[str, object] | None = None,
        every: int = 1,
    ) -> None:
        self.path = Path(path)
        self.every = max(1, every)
        self._file: IO[str] | None = None
        self._failed = False
        self._config = config or {}

    def _open(self) -> IO[str] | None:
        if self._file is None and not self._failed:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
                if self._file.tell() == 0:
                    self._write_line(
                        {
                            "schema": EVENT_LOG_SCHEMA,
                            "version": EVENT_LOG_VERSION,
                            "config": self._config,
                            "started": datetime.now(UTC).isoformat(timespec="seconds"),
                        }
                    )
            except OSError as error:
                self._fail(error)
        return self._file

    def _fail(self, error: OSError) -> None:
        if not self._failed:
            warnings.warn(
                f"pss guard: cannot write the event log {self.path} ({error}); "
                "training continues without it",
                RuntimeWarning,
                stacklevel=3,
            )
        self._failed = True
        self.close()

    def _write_line(self, obj: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(json_safe(obj), allow_nan=False) + "\n")
        except OSError as error:
            self._fail(error)

    def write(self, obj: dict[str, Any]) -> None:
        """One record (a dict with at least "step" and "kind")."""
        if self._open() is not None:
            self._write_line(obj)

    def record(self, step: int, metrics: dict[str, float], event: GuardEvent | None) -> None:
        """Events as their own record; a step's metrics as a "decision" record (every
        `every` steps, and always on a trigger or skip) plus, when the monitor measured
        matrices, one "metrics" record."""
        if event is not None:
            self.write({"step": step, "kind": event.kind, "reason": event.reason, **event.detail})
            return
        scalars: dict[str, Any] = {}
        layers: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            metric, _, name = key.partition("/")
            if name:
                layers.setdefault(name, {})[metric] = value
            elif key in ("skipped", "triggered"):
                scalars[key] = bool(value)
            else:
                scalars[key] = value
        if step % self.every == 0 or scalars.get("skipped") or scalars.get("triggered"):
            self.write({"step": step, "kind": "decision", **scalars})
        if layers:
            self.write({"step": step, "kind": "metrics", "layers": layers})

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
