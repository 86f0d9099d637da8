"""Bounded memory: the batch planner's invariants, the scan loop that obeys them, and the
streaming path (positional reads through a staging buffer) against the memory-mapped one.

Wall time and RSS are the benchmark's business (benchmarks/bench_memory.py); these tests check
the plan that bounds them.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pss_cli import pipeline
from pss_cli.checkpoint.model import TensorEntry
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.checkpoint.selection import select
from pss_cli.config import DEFAULT_CPU_BATCH_BYTES, DEFAULT_TOP_K, ComputeDtype, ScanConfig
from pss_cli.core.norms import sum_of_squares
from pss_cli.core.spectra import KrylovSettings
from pss_cli.pipeline import (
    Batch,
    MatrixItem,
    batch_peak_bytes,
    matrix_seed,
    plan_batches,
    scan_checkpoint,
)
from pss_cli.pipeline import loader as pipeline_loader
from pss_cli.report.json_report import render_json
from tests.safetensors_factory import write_index, write_tensors
from tests.spectra_factory import power_law, with_spectrum

GIB = 2**30
SETTINGS = KrylovSettings()
ITEMSIZE = {"F32": 4, "F64": 8, "BF16": 2, "F16": 2}


def _items(specs: list[tuple[str, str, tuple[int, ...]]]) -> list[MatrixItem]:
    """MatrixItems for header-only entries (no file is ever read by the planner)."""
    entries = []
    offset = 0
    for name, dtype, shape in specs:
        size = ITEMSIZE[dtype]
        for dim in shape:
            size *= dim
        entries.append(
            TensorEntry(name, Path("x.safetensors"), dtype, shape, (offset, offset + size))
        )
        offset += size
    targets, _ = select(entries)
    pairs = [(t, i) for t in targets for i in (range(t.batch) if t.batch > 1 else [None])]
    return [
        MatrixItem(t, i, matrix_seed(0, t.entry.name, i), position)
        for position, (t, i) in enumerate(pairs)
    ]


def _llama_70b_like() -> list[tuple[str, str, tuple[int, ...]]]:
    """Many big entries: 80 blocks of Llama-70B shapes, a 128k vocabulary, MoE stacks, small
    matrices; ~1000 matrices and ~140 GB as BF16."""
    specs: list[tuple[str, str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", "BF16", (128256, 8192)),
        ("lm_head.weight", "BF16", (128256, 8192)),
    ]
    for block in range(80):
        p = f"model.layers.{block}."
        specs += [
            (p + "self_attn.q_proj.weight", "BF16", (8192, 8192)),
            (p + "self_attn.k_proj.weight", "BF16", (1024, 8192)),
            (p + "self_attn.v_proj.weight", "BF16", (1024, 8192)),
            (p + "self_attn.o_proj.weight", "BF16", (8192, 8192)),
            (p + "mlp.gate_proj.weight", "BF16", (28672, 8192)),
            (p + "mlp.up_proj.weight", "BF16", (28672, 8192)),
            (p + "mlp.down_proj.weight", "BF16", (8192, 28672)),
        ]
    specs += [("moe.experts.w1", "BF16", (64, 1408, 2048)), ("tiny.proj.weight", "F32", (64, 48))]
    specs += [(f"adapters.{i}.weight", "F32", (768, 768)) for i in range(40)]
    return specs


def _check_invariants(batches: list[Batch], items: list[MatrixItem], budget: int) -> None:
    seen = [item.position for batch in batches for item in batch.items]
    assert sorted(seen) == [item.position for item in items]  # every matrix exactly once
    for position, batch in enumerate(batches):
        shapes = {item.tall_shape for item in batch.items}
        assert len(shapes) == 1  # one shape per batch (they are stacked)
        assert [i.position for i in batch.items] == sorted(i.position for i in batch.items)
        if len(batch.items) > 1:
            # A batch of several matrices always leaves room for the next one to load.
            assert 3 * batch.peak_bytes <= 2 * budget
            assert 3 * batch.buffer_bytes <= budget
        assert batch.peak_bytes >= batch.buffer_bytes
        if batch.prefetch:
            # Loaded while the previous batch is solved: both together stay within the budget.
            assert position > 0
            assert batches[position - 1].peak_bytes + batch.buffer_bytes <= budget
        elif position == 0 or batches[position - 1].peak_bytes + batch.buffer_bytes <= budget:
            # Not prefetched although it would fit: only the first batch may be like that.
            assert position == 0


@pytest.mark.parametrize("budget", [64 * 2**20, DEFAULT_CPU_BATCH_BYTES, 4 * GIB, 40 * GIB])
@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("exact", [False, True])
def test_plan_never_exceeds_the_budget(budget: int, itemsize: int, exact: bool) -> None:
    items = _items(_llama_70b_like())
    assert len(items) > 600
    batches = plan_batches(items, itemsize, budget, SETTINGS, DEFAULT_TOP_K, exact)
    _check_invariants(batches, items, budget)


def test_plan_matches_the_measured_cpu_layout() -> None:
    """On the default 512 MiB budget: 4096^2 fp32 matrices go two by two, 11008x4096 alone but
    overlapped with the next load, and a 32000x4096 embedding alone with nothing beside it."""
    items = _items(
        [("embed_tokens.weight", "BF16", (32000, 4096))]
        + [(f"layers.{i}.q_proj.weight", "BF16", (4096, 4096)) for i in range(4)]
        + [(f"layers.{i}.up_proj.weight", "BF16", (11008, 4096)) for i in range(2)]
    )
    batches = plan_batches(items, 4, DEFAULT_CPU_BATCH_BYTES, SETTINGS, DEFAULT_TOP_K)
    assert [len(b.items) for b in batches] == [1, 1, 1, 2, 2]
    assert [b.items[0].tall_shape for b in batches] == [
        (32000, 4096),
        (11008, 4096),
        (11008, 4096),
        (4096, 4096),
        (4096, 4096),
    ]
    assert [b.prefetch for b in batches] == [False, False, True, True, True]
    assert batches[0].peak_bytes > DEFAULT_CPU_BATCH_BYTES * 2 // 3  # too big to share memory


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(st.integers(2, 40000), st.integers(2, 9000), st.integers(1, 5)),
        min_size=1,
        max_size=12,
    ),
    budget=st.integers(2**20, 64 * GIB),
    itemsize=st.sampled_from([4, 8]),
)
def test_plan_invariants_hold_for_any_layout(shapes, budget: int, itemsize: int) -> None:
    specs = [
        (f"t{i}.weight", "F32", (count, m, n) if count > 1 else (m, n))
        for i, (m, n, count) in enumerate(shapes)
    ]
    items = _items(specs)
    if not items:
        return
    batches = plan_batches(items, itemsize, budget, SETTINGS, DEFAULT_TOP_K)
    _check_invariants(batches, items, budget)


def test_peak_estimate_grows_with_the_batch() -> None:
    for shape in [(4096, 4096), (11008, 4096), (768, 768), (50257, 768)]:
        peaks = [batch_peak_bytes(c, shape, 4, SETTINGS, 16, False) for c in range(1, 6)]
        assert peaks == sorted(peaks)
        assert all(p >= c * shape[0] * shape[1] * 4 for c, p in enumerate(peaks, start=1))


def test_scan_loop_keeps_at_most_the_planned_batches_alive(tmp_path: Path, monkeypatch) -> None:
    """On one thread (one batch solved at a time) the driver loads a batch early only where the
    plan allows it; otherwise every earlier batch buffer is gone before the next one is
    allocated. With two threads: tests/test_concurrent_scan.py."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_scan_loop(tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(saved)


def _check_scan_loop(tmp_path: Path, monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.w": torch.randn(96, 80, generator=g) for i in range(6)}
    tensors.update({f"layers.{i}.big": torch.randn(300, 200, generator=g) for i in range(3)})
    path = write_tensors(tmp_path / "m.safetensors", tensors)
    config = ScanConfig(cpu_batch_bytes=1_500_000)  # a few matrices per batch
    alive: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
    observed: list[tuple[bool, int]] = []
    original = pipeline._Loader.load

    def load(self, batch):  # type: ignore[no-untyped-def]
        observed.append((batch.prefetch, sum(t.numel() * t.element_size() for t in alive)))
        loaded = original(self, batch)
        alive.add(loaded.buffer)
        return loaded

    monkeypatch.setattr(pipeline._Loader, "load", load)
    report = scan_checkpoint(path, config)
    assert report.summary.matrices == 9
    assert len(observed) >= 3
    for prefetch, alive_bytes in observed:
        if not prefetch:
            assert alive_bytes == 0
        else:
            assert alive_bytes <= config.cpu_batch_bytes


def _json(report) -> dict:
    data = json.loads(render_json(report))
    del data["timings"]
    return data


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("compute", [ComputeDtype.FLOAT32, ComputeDtype.FLOAT64])
def test_streamed_reads_equal_mapped_reads(
    tmp_path: Path, monkeypatch, dtype: torch.dtype, compute: ComputeDtype
) -> None:
    """Every view (tall, wide, conv, stacked experts, sharded) gives the very same numbers
    through positional reads as through the memory map, for every stored and compute dtype."""
    g = torch.Generator().manual_seed(1)
    shard1 = {
        "layers.0.mlp.up_proj.weight": with_spectrum(700, 600, power_law(600), seed=1).to(dtype),
        "layers.0.mlp.down_proj.weight": with_spectrum(600, 700, power_law(600), 2).to(dtype),
        "layers.0.conv.weight": torch.randn(24, 8, 3, 3, generator=g).to(dtype),
    }
    shard2 = {
        "layers.1.experts.w1": torch.randn(3, 40, 56, generator=g).to(dtype),
        "layers.1.attn.q_proj.weight": torch.randn(64, 64, generator=g).to(dtype),
        # int8 with per-channel scales, one matrix and a stack: dequantized slice by slice.
        "layers.1.attn.o_proj.weight": torch.randint(-127, 128, (48, 40), generator=g).to(
            torch.int8
        ),
        "layers.1.attn.o_proj.weight_scale": torch.rand(48, 1, generator=g) / 100,
        "layers.1.experts.w2": torch.randint(-127, 128, (2, 24, 20), generator=g).to(torch.int8),
        "layers.1.experts.w2_scale": torch.rand(2, 24, 1, generator=g) / 100,
    }
    write_tensors(tmp_path / "a.safetensors", shard1)
    write_tensors(tmp_path / "b.safetensors", shard2)
    write_index(
        tmp_path / "model.safetensors.index.json",
        {**dict.fromkeys(shard1, "a.safetensors"), **dict.fromkeys(shard2, "b.safetensors")},
    )
    # A staging buffer of a few rows, so that every matrix crosses it in several chunks.
    monkeypatch.setattr(pipeline_loader, "STAGING_BUFFER_BYTES", 4096)
    config = ScanConfig(exact_max_dim=0, compute_dtype=compute, cpu_batch_bytes=3_000_000)
    streamed = scan_checkpoint(tmp_path, config)
    monkeypatch.setattr(TensorReader, "can_read_into", lambda self, entry: False)
    mapped = scan_checkpoint(tmp_path, config)
    assert _json(streamed) == _json(mapped)
    assert streamed.summary.matrices == 2 + 1 + 3 + 1 + 1 + 2
    scales = {x.scale_tensor for x in streamed.layers} - {None}
    assert scales == {"layers.1.attn.o_proj.weight_scale", "layers.1.experts.w2_scale"}


def test_streamed_nonfinite_zero_and_huge_values(tmp_path: Path) -> None:
    bad = torch.ones(40, 30)
    bad[3, 4] = float("nan")
    bad[5, 6] = float("inf")
    huge = with_spectrum(40, 30, power_law(30), seed=0) * 1e300
    tiny = with_spectrum(40, 30, power_law(30), seed=0) * 1e-300
    tensors = {"bad": bad, "zero": torch.zeros(30, 40), "huge": huge, "tiny": tiny}
    path = write_tensors(tmp_path / "m.safetensors", tensors)
    report = scan_checkpoint(path, ScanConfig(compute_dtype=ComputeDtype.FLOAT64))
    by_name = {x.name: x for x in report.layers}
    assert by_name["bad"].nonfinite_count == 2 and by_name["bad"].flags == ("nonfinite",)
    assert by_name["zero"].flags == ("zero_matrix",)
    expected = float((power_law(30) ** 2).sum())
    assert by_name["huge"].sigma_max == pytest.approx(1e300, rel=1e-9)
    assert by_name["huge"].stable_rank == pytest.approx(expected, rel=1e-9)
    assert by_name["tiny"].stable_rank == pytest.approx(expected, rel=1e-9)


def test_norm_does_not_depend_on_the_thread_count() -> None:
    """A distributed scan runs one thread per process: the norm must round the same way."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3_000_001, generator=g, dtype=torch.float64) * 1e3
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(sum_of_squares(values))
    finally:
        torch.set_num_threads(before)
    assert results[0] == results[1] == results[2]
    assert results[0] == pytest.approx(float((values**2).sum()), rel=1e-12)


def test_a_scan_config_budget_change_does_not_change_results(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    tensors = {f"w{i}": with_spectrum(640, 600, power_law(600), seed=i) for i in range(3)}
    tensors["x"] = torch.randn(5, 600, 640, generator=g)
    path = write_tensors(tmp_path / "m.safetensors", tensors)
    config = ScanConfig(exact_max_dim=0)
    one = scan_checkpoint(path, config)
    tiny = scan_checkpoint(path, replace(config, cpu_batch_bytes=1))
    assert _json(one) == _json(tiny)
