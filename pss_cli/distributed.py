"""Scans spread over several processes with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node=N -m pss_cli scan CKPT --format json -o report.json

torchrun starts N processes and sets WORLD_SIZE, RANK and LOCAL_RANK (plus the rendezvous
address); each process opens the checkpoint's headers, takes a static, cost-balanced share of the
matrices (`assign_shares`: longest processing time first, cost m * n * k), analyses it on its own
device (cuda:LOCAL_RANK, or the CPU), and sends its results to rank 0, which builds the one
report exactly as a single-process scan orders it and is the only process that prints or writes.

Every step that can fail runs on every rank inside `Session.run`/`Session.rank0`, which exchange
a status afterwards: an error on any rank becomes the same error on all of them at the same point,
so no process waits forever for a peer that gave up. Rank 0 reports it (once); the others exit
silently with the same exit code. A process that dies outright is torchrun's to handle: it stops
the other workers.

Only small Python objects cross the wire (statuses and LayerResults), so the control group is
gloo on every device kind: NCCL would add device staging for kilobytes, and one more way to fail.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pss_cli.config import DISTRIBUTED_TIMEOUT_SECONDS, ScanConfig
from pss_cli.errors import ComputeError, ExitCode, PssError, UsageError
from pss_cli.results import ScanReport

if TYPE_CHECKING:  # torch stays unimported until a scan runs (`pss check report.json` never does)
    import torch

    from pss_cli.core.spectra import KrylovSettings
    from pss_cli.pipeline import ComputeOutcome, MatrixItem, ProgressCallback

T = TypeVar("T")

# Cost of a Krylov solve per matrix entry, in units of products: ~15 iterations of two width-32
# products on the flat bulks that set the iteration count (docs/BENCHMARKS.md). An exact SVD
# costs ~min(m, n) per entry instead; only the ratio between items matters for balancing.
KRYLOV_COST_WIDTH = 2 * 15 * 32
_TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class Launch:
    """What torchrun told this process."""

    world_size: int
    rank: int
    local_rank: int


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The torchrun launch this process is part of, or None for a plain single-process run.

    WORLD_SIZE=1 (torchrun --nproc_per_node=1) is a plain run too.
    """
    env = os.environ if environ is None else environ
    if not all(name in env for name in _TORCHRUN_VARIABLES):
        return None
    try:
        world, rank, local = (int(env[name]) for name in _TORCHRUN_VARIABLES)
    except ValueError:
        raise UsageError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers "
            f"(got {', '.join(repr(env[n]) for n in _TORCHRUN_VARIABLES)})",
            "launch distributed scans with torchrun, which sets them",
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(
            f"inconsistent torchrun variables WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}",
            "launch distributed scans with torchrun, which sets them",
        )
    return Launch(world, rank, local) if world > 1 else None


def refuse_torchrun(command: str) -> None:
    """Commands that run in one process only: N copies of them would do the same work N times
    (and `smooth` would race N writers to one OUT)."""
    if launch_from_env() is not None:
        raise UsageError(
            f"pss {command} runs in one process; it cannot be started under torchrun",
            f"run `pss {command} ...` directly (only scan and check are distributed)",
        )


def rank_device(spec: str, local_rank: int) -> torch.device:
    """The device of one rank: cuda:LOCAL_RANK for `auto` (with CUDA) and `cuda`, else the CPU."""
    import torch

    from pss_cli.pipeline import resolve_device

    if spec.startswith("cuda:"):
        raise UsageError(
            f"--device {spec} names one GPU, but every torchrun process would then use it",
            "pass --device cuda (or auto): process i uses cuda:LOCAL_RANK",
        )
    device = resolve_device(spec)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UsageError(
            f"LOCAL_RANK {local_rank} has no GPU (this node has {count} CUDA devices)",
            "start at most one process per GPU (--nproc_per_node), or use --device cpu",
        )
    return torch.device("cuda", local_rank)


def item_cost(item: MatrixItem, config: ScanConfig, settings: KrylovSettings) -> int:
    """Work of one matrix, ~ m * n * k: k = min(m, n) for a full SVD, else the Krylov width."""
    from pss_cli.pipeline.plan import krylov_path

    m, n = item.tall_shape
    if not krylov_path(item.tall_shape, config, settings):
        return m * n * n
    return m * n * min(n, KRYLOV_COST_WIDTH)


def assign_shares(costs: list[int], world_size: int) -> list[list[int]]:
    """Static, cost-balanced shares of item positions: longest processing time first.

    Items in decreasing cost (ties: earlier position first) each go to the least-loaded rank
    (ties: lowest rank). Deterministic, so every rank computes the same assignment on its own;
    each share is returned in item order. LPT is within 4/3 of the optimal makespan (Graham 1969).
    """
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for position in sorted(range(len(costs)), key=lambda p: (-costs[p], p)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += costs[position]
        shares[rank].append(position)
    return [sorted(share) for share in shares]


@dataclass(frozen=True)
class _Failure:
    """An exception as it crosses processes: PssError subclasses are rebuilt with their hint."""

    rank: int
    kind: type[BaseException]
    message: str
    hint: str | None
    exit_code: int

    @classmethod
    def of(cls, rank: int, exc: Exception) -> _Failure:
        if isinstance(exc, PssError):
            return cls(rank, type(exc), exc.message, exc.hint, int(exc.exit_code))
        return cls(rank, type(exc), str(exc), None, int(ExitCode.INPUT))

    def rebuild(self) -> Exception:
        if issubclass(self.kind, PssError):
            try:
                error = self.kind(self.message, self.hint)
                if isinstance(error, PssError):
                    return error
            except Exception:  # a subclass with another constructor: keep text and exit code
                pass
            generic = ComputeError(self.message, self.hint)
            generic.exit_code = ExitCode(self.exit_code)
            return generic
        if issubclass(self.kind, MemoryError):
            return MemoryError(self.message)
        detail = self.message.splitlines()[0] if self.message else ""
        return ComputeError(
            f"internal error on rank {self.rank}: {self.kind.__name__}: {detail}",
            "this is a bug in pss; rerun with PSS_DEBUG=1 for a traceback and report it",
        )


class Session:
    """A single-process run: every step simply runs here. See `TorchrunSession`."""

    rank = 0
    world_size = 1

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return None

    def run(self, step: Callable[[], T]) -> T:
        """Run `step` on every rank; raise everywhere if it failed anywhere."""
        return step()

    def rank0(self, step: Callable[[], T], share: bool = True) -> T | None:
        """Run `step` on rank 0 only; its error (and, with `share`, its result) reaches every
        rank, where the result is None without `share`."""
        return step()

    def scan(
        self, path: Path, config: ScanConfig, progress: ProgressCallback | None = None
    ) -> ScanReport | None:
        """The report on rank 0, None on the other ranks."""
        from pss_cli.pipeline import scan_checkpoint

        return scan_checkpoint(path, config, progress)


class TorchrunSession(Session):
    """One process of a torchrun launch; a context manager around the process group."""

    def __init__(self, launch: Launch) -> None:
        self.rank = launch.rank
        self.world_size = launch.world_size
        self.local_rank = launch.local_rank

    def __enter__(self) -> TorchrunSession:
        import torch.distributed as dist

        if not dist.is_available():
            raise UsageError(
                "this torch build has no torch.distributed", "run pss without torchrun"
            )
        # env:// rendezvous (MASTER_ADDR/MASTER_PORT from torchrun). The timeout bounds every
        # collective, and ranks wait in one while the slowest share computes: it is long.
        try:
            dist.init_process_group(
                backend="gloo",
                timeout=dt.timedelta(seconds=DISTRIBUTED_TIMEOUT_SECONDS),
                rank=self.rank,
                world_size=self.world_size,
            )
        except (RuntimeError, ValueError) as exc:  # DistNetworkError, a missing MASTER_ADDR...
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ComputeError(
                f"rank {self.rank} cannot join the torchrun process group: {detail}",
                "start pss with torchrun (it sets MASTER_ADDR/MASTER_PORT); on several nodes "
                "check --rdzv_endpoint and that every node can reach it",
            ) from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if self.rank == 0 or exc is None:
            return None  # rank 0 reports; a clean exit stays clean
        # Every rank raised the same (synchronised) error: only rank 0 prints it.
        raise SystemExit(_exit_code(exc)) from None

    def run(self, step: Callable[[], T]) -> T:
        import torch.distributed as dist

        value: Any = None
        failure: _Failure | None = None
        original: Exception | None = None
        try:
            value = step()
        except Exception as exc:
            failure = _Failure.of(self.rank, exc)
            original = exc
        statuses: list[Any] = [None] * self.world_size
        dist.all_gather_object(statuses, failure)
        first = next((s for s in statuses if s is not None), None)
        if first is not None:
            if original is not None and first.rank == self.rank:
                raise original
            raise first.rebuild()
        result: T = value
        return result

    def rank0(self, step: Callable[[], T], share: bool = True) -> T | None:
        import torch.distributed as dist

        box: list[Any] = [None]
        value: T | None = None
        original: Exception | None = None
        if self.rank == 0:
            try:
                value = step()
                box[0] = ("ok", value if share else None)
            except Exception as exc:
                original = exc
                box[0] = ("failed", _Failure.of(0, exc))
        dist.broadcast_object_list(box, src=0)
        status, payload = box[0]
        if status == "failed":
            if original is not None:
                raise original
            raise payload.rebuild()
        result: T | None = value if self.rank == 0 else payload
        return result

    def scan(
        self, path: Path, config: ScanConfig, progress: ProgressCallback | None = None
    ) -> ScanReport | None:
        import torch.distributed as dist

        from pss_cli.pipeline import (
            assemble_report,
            compute_items,
            plan_scan,
            precision_timings,
            with_precision,
        )

        started = time.perf_counter()
        plan = self.run(
            lambda: plan_scan(path, config, rank_device(config.device, self.local_rank))
        )
        # Every rank measured its own bf16/fp32 ratio (--precision auto); all adopt rank 0's
        # choice, so that no matrix's value depends on which rank computed it.
        choice: list[Any] = [plan.precision]
        dist.broadcast_object_list(choice, src=0)
        plan = with_precision(plan, choice[0])
        if plan.device.type == "cuda":
            import torch

            # Make it this process's current GPU too, so that no rank opens a context (and
            # spends memory) on cuda:0 as a side effect.
            torch.cuda.set_device(plan.device)
        costs = [item_cost(item, config, plan.settings) for item in plan.items]
        mine = [plan.items[p] for p in assign_shares(costs, self.world_size)[self.rank]]
        outcome: ComputeOutcome | _Failure
        try:
            # Only rank 0 draws progress: its share stands for the whole (the shares are
            # balanced by cost).
            outcome = compute_items(plan, mine, progress if self.rank == 0 else None)
        except Exception as exc:
            outcome = _Failure.of(self.rank, exc)
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(outcome, gathered, dst=0)

        def assemble() -> ScanReport:
            assert gathered is not None
            failures = [x for x in gathered if isinstance(x, _Failure)]
            if failures:
                if isinstance(outcome, _Failure) and failures[0].rank == 0:
                    raise outcome.rebuild()
                raise failures[0].rebuild()
            outcomes: list[ComputeOutcome] = gathered
            results = {key: r for o in outcomes for key, r in o.results.items()}
            timings = {
                "total_seconds": round(time.perf_counter() - started, 6),
                # The slowest rank's, which sets the wall time.
                "compute_seconds": round(max(o.compute_seconds for o in outcomes), 6),
                "read_seconds": round(max(o.read_seconds for o in outcomes), 6),
                **precision_timings(plan.precision),
            }
            return assemble_report(plan, results, timings, world_size=self.world_size)

        return self.rank0(assemble, share=False)


def open_session(environ: Mapping[str, str] | None = None) -> Session:
    """A `TorchrunSession` under torchrun with WORLD_SIZE > 1, else a plain `Session`."""
    launch = launch_from_env(environ)
    return Session() if launch is None else TorchrunSession(launch)


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, PssError):
        return int(exc.exit_code)
    if isinstance(exc, SystemExit):
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    exit_code = getattr(exc, "exit_code", None)  # typer.Exit
    if isinstance(exit_code, int):
        return exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return int(ExitCode.INPUT)
