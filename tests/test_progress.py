"""Scan progress: the callback reports matrices and bytes; the bar draws them on a terminal."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch

from pss_cli.config import ScanConfig
from pss_cli.pipeline import scan_checkpoint
from pss_cli.report.progress import stderr_progress
from tests.safetensors_factory import write_tensors


def test_callback_counts_matrices_and_bytes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(64, 48, generator=g),  # 12288 bytes
        "b.weight": torch.randn(40, 30, generator=g).bfloat16(),  # 2400 bytes
        "experts.w1": torch.randn(4, 20, 10, generator=g).half(),  # 4 matrices, 400 bytes each
        "b.bias": torch.randn(30, generator=g),  # skipped: not counted
    }
    path = write_tensors(tmp_path / "m.safetensors", tensors)
    calls: list[tuple[int, int, str, int, int]] = []

    def record(done: int, total: int, name: str, bytes_done: int = 0, bytes_total: int = 0) -> None:
        calls.append((done, total, name, bytes_done, bytes_total))

    report = scan_checkpoint(path, ScanConfig(cpu_batch_bytes=40_000), record)
    assert report.summary.matrices == 6
    assert calls[0] == (0, 6, "", 0, 12288 + 2400 + 1600)
    assert calls[-1][0] == 6 and calls[-1][3] == calls[-1][4] == 12288 + 2400 + 1600
    done = [c[0] for c in calls]
    moved = [c[3] for c in calls]
    assert done == sorted(done) and moved == sorted(moved) and len(calls) > 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_draws_on_a_terminal_and_stays_silent_elsewhere(monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with stderr_progress() as update:
        assert update is not None
        update(0, 4, "", 0, 4 * 2**20)
        update(2, 4, "layers.1.w", 2**20, 4 * 2**20)
        update(4, 4, "layers.3.w")  # a caller without byte counts still works
    assert "matrices" in terminal.getvalue()
    with stderr_progress(enabled=False) as update:
        assert update is None
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    with stderr_progress() as update:
        assert update is None
    assert piped.getvalue() == ""
