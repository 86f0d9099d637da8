"""Two batches solved at once on a CPU with two or more threads (pss_cli/pipeline/solve.py:
`_compute_concurrently`): the same results as one batch at a time, within the memory budget,
each matrix on its fixed share of the threads, errors propagated and the thread count restored.

Wall time is the benchmark's business (benchmarks/bench_scan.py); these tests check the schedule.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pss_cli import pipeline
from pss_cli.config import ProductPrecision, ScanConfig
from pss_cli.core.spectra import KrylovSettings
from pss_cli.pipeline import scan_checkpoint
from pss_cli.pipeline import solve as pipeline_solve
from pss_cli.report.json_report import render_json
from tests.safetensors_factory import write_tensors
from tests.spectra_factory import power_law, with_spectrum

# Six 600 x 520 matrices (short side > 512: the Krylov path), BF16 so that the bf16 path loads
# them as stored; each batch holds one under the budgets below.
SHAPE = (600, 520)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tensors = {
        f"layers.{i}.mlp.up_proj.weight": with_spectrum(
            *SHAPE, power_law(SHAPE[1], 0.4 + i / 10), i
        ).to(torch.bfloat16)
        for i in range(6)
    }
    return write_tensors(tmp_path_factory.mktemp("concurrent") / "model.safetensors", tensors)


@pytest.fixture
def threads() -> Iterator[None]:
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _json(report: object) -> str:
    data = json.loads(render_json(report))  # type: ignore[arg-type]
    data.pop("timings")
    return json.dumps(data, sort_keys=True)


def _one_matrix_budget() -> int:
    # A budget whose half (each solver's share) holds one batch of one matrix.
    return 3 * SHAPE[0] * SHAPE[1] * 4 * 2


class _Recorder:
    """Wraps `_solve` and `_Loader.load`: who solved what, on how many threads, when; and the
    buffer bytes alive when each load started."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pause: float = 0.0) -> None:
        self.solves: list[tuple[str, int, float, float]] = []
        self.loads: list[tuple[int, int]] = []  # (buffer bytes alive, this batch's buffer)
        self.alive: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
        self.lock = threading.Lock()
        solve, load = pipeline_solve._solve, pipeline._Loader.load

        def recorded_solve(loaded, plan):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            time.sleep(pause)  # long enough for the other solver to start beside it
            results = solve(loaded, plan)
            with self.lock:
                name = threading.current_thread().name
                self.solves.append((name, torch.get_num_threads(), start, time.perf_counter()))
            return results

        def recorded_load(loader, batch):  # type: ignore[no-untyped-def]
            with self.lock:
                alive = sum(t.numel() * t.element_size() for t in self.alive)
            loaded = load(loader, batch)
            with self.lock:
                self.loads.append((alive, loaded.buffer.numel() * loaded.buffer.element_size()))
                self.alive.add(loaded.buffer)
            return loaded

        monkeypatch.setattr(pipeline_solve, "_solve", recorded_solve)
        monkeypatch.setattr(pipeline._Loader, "load", recorded_load)

    def overlapping(self) -> bool:
        spans = sorted((start, end) for _, _, start, end in self.solves)
        return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


@pytest.mark.parametrize("precision", [ProductPrecision.FP32, ProductPrecision.BF16])
def test_two_threads_solve_two_batches_at_once_with_the_results_of_one_thread(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch, precision: ProductPrecision
) -> None:
    config = ScanConfig(device="cpu", precision=precision, cpu_batch_bytes=_one_matrix_budget())
    torch.set_num_threads(1)
    one = _json(scan_checkpoint(checkpoint, config))
    torch.set_num_threads(2)
    recorder = _Recorder(monkeypatch, pause=0.05)
    two = scan_checkpoint(checkpoint, config)
    assert len(recorder.solves) == 6
    assert recorder.overlapping(), recorder.solves
    # Each matrix on one of the two threads, in the solvers' own threads, whatever ran beside it:
    # the JSON is byte for byte that of a one-thread scan (bf16 products included).
    assert {count for _, count, _, _ in recorder.solves} == {1}
    assert all(name.startswith("pss-solver") for name, _, _, _ in recorder.solves)
    assert _json(two) == one
    assert torch.get_num_threads() == 2  # the caller's count, restored
    assert 0 < two.timings["compute_seconds"] <= two.timings["total_seconds"]


def test_each_solver_takes_an_equal_share_of_the_threads(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(5)
    recorder = _Recorder(monkeypatch)
    scan_checkpoint(checkpoint, ScanConfig(device="cpu", cpu_batch_bytes=_one_matrix_budget()))
    assert {count for _, count, _, _ in recorder.solves} == {2}  # 5 // 2, never 3 and 2
    assert torch.get_num_threads() == 5


def test_a_batch_is_loaded_only_when_its_peak_fits_beside_those_in_flight(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A budget that holds one batch's peak but not two: never two at once, and each batch is
    # loaded only after the one before it was solved and freed.
    torch.set_num_threads(2)
    one_peak = pipeline.batch_peak_bytes(1, SHAPE, 4, KrylovSettings(), 16, False)
    recorder = _Recorder(monkeypatch, pause=0.02)
    config = ScanConfig(device="cpu", precision=ProductPrecision.FP32, cpu_batch_bytes=one_peak)
    report = scan_checkpoint(checkpoint, config)
    assert report.summary.matrices == 6
    assert not recorder.overlapping()
    assert [alive for alive, _ in recorder.loads] == [0] * 6


def test_loads_never_exceed_the_budget_when_two_fit(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(2)
    recorder = _Recorder(monkeypatch, pause=0.02)
    config = ScanConfig(device="cpu", cpu_batch_bytes=_one_matrix_budget())
    scan_checkpoint(checkpoint, config)
    assert recorder.overlapping()
    for alive, own in recorder.loads:
        assert alive == 0 or alive + own <= config.cpu_batch_bytes


def test_the_batch_of_fewest_bytes_is_loaded_first_and_the_rest_largest_first(
    checkpoint: Path, tmp_path: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A solver starts as soon as the quickest load is done, while the loader reads the large
    # batches (largest first, for the balance at the end). The order never changes a result.
    tensors = {
        f"big.{i}.weight": with_spectrum(900, 700, power_law(700, 0.5), i).to(torch.bfloat16)
        for i in range(3)
    }
    tensors["small.weight"] = with_spectrum(*SHAPE, power_law(SHAPE[1], 0.5), 9).to(torch.bfloat16)
    tensors["mid.weight"] = with_spectrum(800, 600, power_law(600, 0.5), 8).to(torch.bfloat16)
    path = write_tensors(tmp_path / "m.safetensors", tensors)
    torch.set_num_threads(1)
    config = ScanConfig(device="cpu", precision=ProductPrecision.BF16, cpu_batch_bytes=1)
    in_turn = _json(scan_checkpoint(path, config))
    torch.set_num_threads(2)
    recorder = _Recorder(monkeypatch)
    two = _json(scan_checkpoint(path, config))
    sizes = [own for _, own in recorder.loads]
    assert sizes[0] == min(sizes)
    assert sizes[1:] == sorted(sizes[1:], reverse=True)
    assert two == in_turn


def test_a_failing_solve_stops_the_scan_and_restores_the_threads(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(2)
    calls = []
    solve = pipeline_solve._solve

    def failing(loaded, plan):  # type: ignore[no-untyped-def]
        calls.append(loaded.batch)
        if len(calls) == 2:
            raise MemoryError("out of memory in the second batch")
        return solve(loaded, plan)

    monkeypatch.setattr(pipeline_solve, "_solve", failing)
    config = ScanConfig(device="cpu", cpu_batch_bytes=_one_matrix_budget())
    with pytest.raises(MemoryError, match="second batch"):
        scan_checkpoint(checkpoint, config)
    assert torch.get_num_threads() == 2
    assert len(calls) < 6  # the batches not started were dropped


@pytest.mark.parametrize("in_turn", [False, True], ids=["two-at-once", "in-turn"])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_loader_runs_torch_on_one_thread(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch, count: int, in_turn: bool
) -> None:
    # Its work overlaps the solvers', which have every thread: more would oversubscribe.
    if in_turn:
        monkeypatch.setattr(pipeline_solve, "_address_space_limited", lambda: True)
    seen: list[tuple[str, int]] = []
    load = pipeline._Loader.load

    counts: list[int] = []  # of threads started during and after the scan

    def probe() -> None:
        prober = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
        prober.start()
        prober.join()

    def recorded_load(self, batch):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        if len(seen) == 1:
            # Before any solve: later, a solve in turn on the caller's thread sets one thread
            # around each LAPACK call (core/lapack.py), which the new-thread count follows.
            probe()
        return load(self, batch)

    monkeypatch.setattr(pipeline._Loader, "load", recorded_load)
    torch.set_num_threads(count)
    scan_checkpoint(checkpoint, ScanConfig(device="cpu", cpu_batch_bytes=_one_matrix_budget()))
    assert len(seen) == 6
    assert {threads for _, threads in seen} == {1}
    assert all(name.startswith("pss-loader") for name, _ in seen)
    assert torch.get_num_threads() == count
    probe()
    # A thread started during the first load, or after the scan, takes the caller's count.
    assert counts == [count, count], counts


def test_one_thread_is_solved_in_turn(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    recorder = _Recorder(monkeypatch)
    scan_checkpoint(checkpoint, ScanConfig(device="cpu", cpu_batch_bytes=_one_matrix_budget()))
    assert {name for name, _, _, _ in recorder.solves} == {threading.current_thread().name}


@pytest.mark.parametrize("precision", [ProductPrecision.FP32, ProductPrecision.BF16])
def test_a_matrix_gets_the_same_threads_however_the_scan_is_batched(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch, precision: ProductPrecision
) -> None:
    # One batch of all six, six batches of one, one matrix alone (--include): every matrix on
    # one of the two threads, so its numbers do not depend on the batching (products that
    # round differently with the thread count, bf16 on some CPUs, included).
    torch.set_num_threads(2)
    config = ScanConfig(device="cpu", precision=precision, cpu_batch_bytes=2**30)
    recorder = _Recorder(monkeypatch)
    whole = json.loads(render_json(scan_checkpoint(checkpoint, config)))
    assert len(recorder.solves) == 2  # the lone batch, cut in two: both solvers have work
    split = json.loads(render_json(scan_checkpoint(checkpoint, replace(config, cpu_batch_bytes=1))))
    alone = json.loads(
        render_json(scan_checkpoint(checkpoint, replace(config, include=("layers.3.*",))))
    )
    assert {count for _, count, _, _ in recorder.solves} == {1}
    assert all(name.startswith("pss-solver") for name, _, _, _ in recorder.solves)
    layers = {x["name"]: x for x in whole["layers"]}
    assert layers == {x["name"]: x for x in split["layers"]}
    assert alone["layers"] == [layers["layers.3.mlp.up_proj.weight"]]


def test_threads_started_during_a_scan_get_the_callers_count(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.set_num_threads also sets the count new threads take: a host program's thread
    # started while the solvers run must not inherit their one thread.
    # (The solver threads' start is a moment in which the count new threads take is theirs:
    # torch has no other way to set a thread's own count. Probes begin once solving has.)
    torch.set_num_threads(2)
    solving = threading.Event()
    solve = pipeline_solve._solve

    def slow_solve(loaded, plan):  # type: ignore[no-untyped-def]
        solving.set()
        time.sleep(0.05)
        return solve(loaded, plan)

    monkeypatch.setattr(pipeline_solve, "_solve", slow_solve)
    counts: list[int] = []
    config = ScanConfig(device="cpu", cpu_batch_bytes=_one_matrix_budget())
    scan = threading.Thread(target=scan_checkpoint, args=(checkpoint, config))

    def probe() -> None:
        counts.append(torch.get_num_threads())

    scan.start()
    solving.wait(timeout=60)
    while scan.is_alive():
        prober = threading.Thread(target=probe)
        prober.start()
        prober.join()
        time.sleep(0.005)
    scan.join()
    assert len(counts) > 10
    assert set(counts) == {2}, counts


def test_covered_seconds_counts_overlaps_once() -> None:
    covered = pipeline_solve._covered_seconds
    assert covered([]) == 0.0
    assert covered([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
    assert covered([(0.0, 5.0), (1.0, 2.0)]) == pytest.approx(5.0)


def test_the_memory_plan_counts_a_bf16_buffer_at_its_own_size() -> None:
    settings = replace(KrylovSettings(), bf16_products=True)
    shape = (11008, 4096)
    as_fp32 = pipeline.batch_peak_bytes(1, shape, 4, settings, 16, False)
    as_stored = pipeline.batch_peak_bytes(1, shape, 4, settings, 16, False, buffer_itemsize=2)
    matrix = shape[0] * shape[1]
    # float32 buffer + its bf16 copy, against the bf16 buffer and one float32 slab
    assert as_fp32 - as_stored == matrix * 4 + matrix * 2 - matrix * 2 - 2**22 // 4096 * 4096 * 4


def test_a_solver_thread_that_cannot_start_fails_the_scan_without_a_hang(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A thread or process limit: the second solver thread does not start. The first one waited
    # at the start barrier forever, and the pool's shutdown with it.
    import concurrent.futures.thread as pool_threads

    torch.set_num_threads(2)
    original = pool_threads.ThreadPoolExecutor._adjust_thread_count
    started: list[int] = []

    def adjust(self):  # type: ignore[no-untyped-def]
        if self._thread_name_prefix.startswith("pss-solver"):
            started.append(1)
            if len(started) == 2:
                raise RuntimeError("can't start new thread")
        return original(self)

    monkeypatch.setattr(pool_threads.ThreadPoolExecutor, "_adjust_thread_count", adjust)
    config = ScanConfig(device="cpu", cpu_batch_bytes=_one_matrix_budget())
    outcome: list[BaseException] = []

    def scan() -> None:
        try:
            scan_checkpoint(checkpoint, config)
        except BaseException as exc:  # recorded for the assertion
            outcome.append(exc)

    runner = threading.Thread(target=scan, daemon=True)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "the scan hung"
    assert isinstance(outcome[0], RuntimeError) and "start new thread" in str(outcome[0])
    assert torch.get_num_threads() == 2


def test_an_address_space_limit_solves_one_batch_at_a_time(
    checkpoint: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under `ulimit -v` every thread's stack and BLAS buffers count: two solvers hung in
    # OpenBLAS where one finished. Such a process solves in turn.
    import resource

    torch.set_num_threads(2)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (8 * 2**30, resource.RLIM_INFINITY))
    recorder = _Recorder(monkeypatch)
    scan_checkpoint(checkpoint, ScanConfig(device="cpu", cpu_batch_bytes=_one_matrix_budget()))
    assert {name for name, _, _, _ in recorder.solves} == {threading.current_thread().name}
