"""Which dtype the Krylov products use on a device: measured, not assumed from the vendor.

The CPUs under this project differ by two orders of magnitude in what a bf16 GEMM costs (torch
2.13 CPU wheel, 2 threads; docs/BENCHMARKS.md): an AVX2-only AMD EPYC has no native bf16 kernel
(50-300x *slower* than fp32), an AMD EPYC Zen 4 with AVX512_BF16 ran (4096x4096)@(4096x32)
~2.2-2.7x faster in bf16, an Intel Xeon with AMX 4-5x faster. CPU flags do not settle it (torch
may or may not have a kernel for a flag), so `auto` times both on a small representative
product once per process and device, and keeps bf16 only when it is clearly faster
(config.BF16_MIN_SPEEDUP).

On CUDA the same measurement runs (bf16 tensor cores win on every recent GPU). TF32 is left as
the user's torch settings have it: pss neither enables it nor relies on it. With
`torch.backends.cuda.matmul.allow_tf32` on, the "fp32" products would be TF32 (10-bit mantissa,
between bf16's 7 and fp32's 23); the final Rayleigh-Ritz step below is the safety net either way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The calibration product: a Krylov step's shape, (n x n) @ (n x block). 2048 is large enough to
# reach a GEMM's steady speed (1024 ran at ~60 % of it here) and small enough for milliseconds
# in fp32; a first single product at 1024 settles CPUs without a bf16 kernel before the larger
# product could cost them ~0.1-1 s.
_PROBE_SMALL = 1024
_PROBE_LARGE = 2048
_PROBE_WIDTH = 32
_REPEATS = 5
# bf16 this much slower than fp32 on the small probe: no kernel, stop measuring.
_CLEARLY_SLOWER = 4.0

_CACHE: dict[str, float] = {}
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class PrecisionChoice:
    """The product dtype chosen for a scan, and why.

    requested: auto | fp32 | bf16. basis: measured (auto), requested (an explicit option),
    compute-dtype (a float64 scan keeps float64 products). bf16_time_ratio: time of a bf16
    product over an fp32 one on the device (< 1: bf16 faster), None when not measured.
    """

    products: str  # fp32 | bf16 | fp64
    requested: str
    basis: str
    bf16_time_ratio: float | None

    @property
    def dtype(self) -> torch.dtype | None:
        """torch.bfloat16 for bf16 products, else None (products in the compute dtype)."""
        return torch.bfloat16 if self.products == "bf16" else None


def bf16_time_ratio(device: torch.device) -> float:
    """Measured time of a bf16 (n x n)@(n x 32) product over the fp32 one on `device`, cached
    per process and device (the first call costs a few milliseconds, ~0.1 s on a CPU without
    a bf16 kernel)."""
    key = str(device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _measure(device)
        return _CACHE[key]


def choose_precision(
    requested: str, device: torch.device, compute_dtype: torch.dtype, min_speedup: float
) -> PrecisionChoice:
    """`requested` (auto | fp32 | bf16) -> the products a scan on `device` uses.

    A float64 scan asked for float64 everywhere: its products stay float64 unless bf16 is
    requested explicitly. `auto` measures (see `bf16_time_ratio`) and picks bf16 only when it is
    at least `min_speedup` times faster.
    """
    if requested == "bf16":
        return PrecisionChoice("bf16", requested, "requested", None)
    compute = "fp64" if compute_dtype == torch.float64 else "fp32"
    if requested == "fp32":
        return PrecisionChoice(compute, requested, "requested", None)
    if compute_dtype == torch.float64:
        return PrecisionChoice(compute, requested, "compute-dtype", None)
    ratio = bf16_time_ratio(device)
    products = "bf16" if ratio * min_speedup <= 1.0 else "fp32"
    return PrecisionChoice(products, requested, "measured", ratio)


def _measure(device: torch.device) -> float:
    generator = torch.Generator(device="cpu").manual_seed(0)

    def operands(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(1, n, n, generator=generator).to(device=device, dtype=dtype)
        v = torch.randn(1, n, _PROBE_WIDTH, generator=generator).to(device=device, dtype=dtype)
        return a, v

    a32, v32 = operands(_PROBE_SMALL, torch.float32)
    a16, v16 = a32.to(torch.bfloat16), v32.to(torch.bfloat16)
    fp32 = _fastest_seconds(lambda: a32 @ v32, device, _REPEATS)
    bf16 = _fastest_seconds(lambda: a16 @ v16, device, 1)
    if bf16 > _CLEARLY_SLOWER * fp32:
        return bf16 / fp32
    a32, v32 = operands(_PROBE_LARGE, torch.float32)
    a16, v16 = a32.to(torch.bfloat16), v32.to(torch.bfloat16)
    fp32 = _fastest_seconds(lambda: a32 @ v32, device, _REPEATS)
    bf16 = _fastest_seconds(lambda: a16 @ v16, device, _REPEATS)
    return bf16 / fp32


def _fastest_seconds(work: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    work()  # warm-up: first-call dispatch, kernel selection, page faults
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        work()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    # The fastest, not the median: on a shared machine other processes only ever add time, and
    # the minimum is what the kernel itself costs (a stable choice from run to run).
    return max(min(times), 1e-9)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
